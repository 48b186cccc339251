"""Shared fixtures: the real-data folder (or a skip) and a tiny synthetic problem."""
from __future__ import annotations

import gzip
import itertools
import os
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaxadv.data import DATA_DIR_ENV, Dataset, environment_data_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
# `experiments` is a top-level package that is not installed: make it importable from the tests.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# The README's command gives a relative $JAXADV_DATA_DIR (../shared/data): it means the folder relative to where
# pytest started, also for the subprocesses tests start in other folders (tests/test_readme.py sets it relative
# again, to test exactly that).
if os.environ.get(DATA_DIR_ENV):
    os.environ[DATA_DIR_ENV] = str(environment_data_dir())


@pytest.fixture(scope="session")
def data_dir() -> str:
    """$JAXADV_DATA_DIR, else <repo>/../shared/data if it exists; skip the test otherwise."""
    candidate = os.environ.get(DATA_DIR_ENV) or str(REPO_ROOT.parent / "shared" / "data")
    if not Path(candidate).is_dir():
        pytest.skip(f"no real data: set {DATA_DIR_ENV} to a folder holding mnist/ and fashion_mnist/")
    return candidate


def make_synthetic(n: int, seed: int = 0, num_classes: int = 10) -> Dataset:
    """Images in [0, 1] whose class is the brightest of `num_classes` horizontal bands, plus noise.

    Linearly separable, so a softmax learns it in a few epochs.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    images = rng.uniform(0.0, 0.3, (n, 28, 28, 1)).astype(np.float32)
    rows = np.array_split(np.arange(28), num_classes)
    for i, label in enumerate(labels):
        images[i, rows[label], :, 0] += 0.6
    return Dataset(np.clip(images, 0.0, 1.0), labels)


@pytest.fixture(scope="session")
def synthetic() -> Dataset:
    return make_synthetic(512)


@pytest.fixture(scope="session")
def tiny_trained_softmax(synthetic):
    """(model, params) of FC10(1e-4) trained briefly on `synthetic`: a real model for downstream tests."""
    from jaxadv.models import get_model
    from jaxadv.train import TrainConfig, train

    model = get_model("FC10(1e-4)")
    params = train(model, synthetic.images, synthetic.labels, jax.random.PRNGKey(0),
                   TrainConfig(epochs=5, batch_size=64, learning_rate=1e-2, verbose=False))
    return model, params


def train_on_fashion_mnist(data_dir: str, name: str, num_train: int, epochs: int):
    """(logits_fn, params, test set): zoo model `name` trained briefly on the first Fashion-MNIST images."""
    from jaxadv.data import load_dataset
    from jaxadv.models import get_model
    from jaxadv.train import TrainConfig, train

    train_set = load_dataset("fashion_mnist", "train", data_dir)
    model = get_model(name)
    params = train(model, train_set.images[:num_train], train_set.labels[:num_train], jax.random.PRNGKey(0),
                   TrainConfig(epochs=epochs, verbose=False))
    return jax.tree_util.Partial(model.apply, params), params, load_dataset("fashion_mnist", "test", data_dir)


def write_idx_split(folder: Path, stem: str, data: Dataset) -> None:
    """`data` as the gzipped IDX files <stem>-images-idx3-ubyte.gz and <stem>-labels-idx1-ubyte.gz in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    images = np.round(data.images[..., 0] * 255).astype(np.uint8)
    for kind, array in (("images-idx3", images), ("labels-idx1", data.labels.astype(np.uint8))):
        header = struct.pack(">I", 0x0800 | array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
        (folder / f"{stem}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))


def tiny_sigmoid_net(seed=0):
    """A 16-12-10 sigmoid net on 4×4 images, as a jax.tree_util.Partial (the sparse and fast attacks' tests)."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = (jax.random.normal(k1, (16, 12)) * 1.5, jax.random.normal(k2, (12, 10)) * 1.5)

    def logits(params, x):
        return jax.nn.sigmoid(x.reshape(x.shape[0], -1) @ params[0] - 1.0) @ params[1]

    return jax.tree_util.Partial(logits, params)


@pytest.fixture(autouse=True, scope="module")
def fresh_compilation_caches():
    """Each test module leaves the compilation caches empty behind it.

    XLA:CPU maps memory for every compiled program it keeps, and the whole suite's programs alive in
    one process passed Linux's limit of 65,530 mappings (vm.max_map_count): LLVM then aborted in the
    middle of a compilation. Measured: 30,000 mappings after four test files, 4,600 after the first.
    """
    yield
    from jaxadv import sharding
    sharding.clear_compilations()
    jax.clear_caches()


# -- a small ReLU net and its exact untargeted minimum (test_boundary, test_minnorm, test_certify) --------

def small_relu_net(seed, inputs=5, hidden=6, classes=3):
    rng = np.random.default_rng(seed)
    w, b = rng.normal(size=(hidden, inputs)), 0.5 * rng.normal(size=hidden)
    v, d = rng.normal(size=(classes, hidden)), 0.5 * rng.normal(size=classes)

    def logits_fn(x):
        cast = lambda a: jnp.asarray(a, x.dtype)
        return jnp.maximum(x @ cast(w.T) + cast(b), 0.0) @ cast(v.T) + cast(d)
    return logits_fn, (w, b, v, d)


def exact_relu_untargeted_minimum(x, label, w, b, v, d):
    """min ‖z − x‖ over z in [0, 1]^n with some class above `label`: on each activation pattern the net is
    linear, so the minimum is the smallest of one QP per (pattern, class), each solved by scipy's SLSQP."""
    best = np.inf
    for pattern in itertools.product((0.0, 1.0), repeat=w.shape[0]):
        on = np.array(pattern)
        sign = 2 * on - 1
        for j in range(v.shape[0]):
            if j == label:
                continue
            g = (v[j] - v[label]) * on
            a = np.vstack([sign[:, None] * w, (g @ w)[None]])            # a z >= rhs: the pattern, then Z_j >= Z_label
            rhs = np.concatenate([-sign * b, [-(g @ b) - (d[j] - d[label])]])
            r = scipy.optimize.minimize(lambda z: 0.5 * np.sum((z - x) ** 2), x, jac=lambda z: z - x, method="SLSQP",
                                        bounds=[(0, 1)] * len(x), options=dict(ftol=1e-12, maxiter=200),
                                        constraints=[dict(type="ineq", fun=lambda z: a @ z - rhs, jac=lambda z: a)])
            if r.success and np.min(a @ r.x - rhs) >= -1e-8:
                best = min(best, float(np.linalg.norm(r.x - x)))
    return best


@pytest.fixture
def compilations():
    """A counter of XLA compilations (backend compiles), read before and after a loop."""
    from jax import monitoring
    events = []

    def listen(name, _duration, **_):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    monitoring.register_event_duration_secs_listener(listen)
    yield events
    monitoring.unregister_event_duration_listener(listen)
