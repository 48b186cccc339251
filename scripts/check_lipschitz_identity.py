"""Table 5's Lipschitz figures, saved bit for bit, to show that a change of the tracer changes none of them.

    python scripts/check_lipschitz_identity.py --out before.json [--workdir runs/fashion_mnist] [--data-dir DIR]
    python scripts/check_lipschitz_identity.py --out after.json --compare before.json     # exit 1 on any difference

For Table 5's AlexNet-shaped net (`jaxadv.alexnet`), every zoo model stored under WORKDIR/models
(none is trained here: a missing one is skipped and named), and small nets written with the patterns
the tracer rewrites (an im2col convolution with and without zero padding, a wrap pad before an im2col
convolution and before flax's CIRCULAR convolution, a leaky ReLU, an average pool, a residual block):
`lipschitz.operator_bounds` with every row field, the network and features bounds, a hash of the dense
head, a few power-iteration steps per linear operator (from a fixed key: they run the traced operators
themselves), and Table 5's certified radii (paper's and pairwise) on the first --num-images test
images. Floats are written with `repr` (they round-trip), arrays as their float64 values and bytes'
SHA-256. `--compare OLD` lists every field that differs, exactly.

tests/data/lipschitz_identity.json was written by main at 4dc7474 (before the tracer became graph.py,
patterns.py and the rule modules), on this 2-core CPU with /work/runs/fashion_mnist's models; eigenvalue
routines may round otherwise on another CPU, so compare on the machine that wrote the reference.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxadv import lipschitz  # noqa: E402
from jaxadv.models import ALL_MODELS, conv2d  # noqa: E402
from experiments.cli import run_main  # noqa: E402

POWER_ITERATIONS = 3


def _digest(array) -> str:
    array = np.ascontiguousarray(np.asarray(array))
    return f"{array.dtype}{list(array.shape)}:{hashlib.sha256(array.tobytes()).hexdigest()}"


def _jsonable(value):
    if isinstance(value, (np.floating, float)):
        return repr(float(value))
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def figures(logits_fn, input_shape, images=None) -> dict:
    """Everything Table 5 reads from `operator_bounds` of `logits_fn`, as exact strings."""
    example = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    bounds = lipschitz.operator_bounds(logits_fn, example, power_iterations=POWER_ITERATIONS,
                                       key=jax.random.PRNGKey(7))
    out = {"rows": _jsonable(list(bounds.rows)), "network_bound": repr(bounds.network_bound),
           "features_bound": repr(bounds.features_bound),
           "head_weights": None if bounds.head_weights is None else _digest(bounds.head_weights)}
    if images is not None:
        logits = jax.jit(logits_fn)(jnp.asarray(images[:, :, :, :] if images.ndim == 4 else images))
        out["certified"] = _digest(bounds.certified_radius(logits))
        if bounds.head_weights is not None:
            out["certified_pairwise"] = _digest(bounds.pairwise_certified_radius(logits))
            out["median_certified_pairwise"] = repr(float(np.median(bounds.pairwise_certified_radius(logits))))
    return out


def pattern_nets(key) -> dict:
    """{name: (logits_fn, input shape)}: small nets written with each pattern the tracer rewrites."""
    import flax.linen as nn

    k = jax.random.split(key, 6)
    kernel = jax.random.normal(k[0], (3, 3, 2, 4)) * 0.3
    dense = jax.random.normal(k[1], (6 * 6 * 4, 10)) * 0.1
    flax_conv = nn.Conv(4, (3, 3), padding="CIRCULAR")
    flax_params = flax_conv.init(k[2], jnp.zeros((1, 6, 6, 2)))

    def head(h):
        return h.reshape(h.shape[0], -1) @ dense + 0.5

    def wrap(x):
        return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")

    def avg_pool(h):
        return jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 2, 1), (1, 1, 1, 1), "SAME") / 4.0

    return {
        "im2col-same": (lambda x: head(jax.nn.relu(conv2d(x, kernel, 1, "SAME"))), (6, 6, 2)),
        "im2col-valid-stride2": (lambda x: conv2d(x, kernel, 2, "VALID").reshape(x.shape[0], -1), (9, 9, 2)),
        "wrap-im2col": (lambda x: head(jax.nn.leaky_relu(conv2d(wrap(x), kernel, 1, "VALID"), 0.1)), (6, 6, 2)),
        "wrap-flax-circular": (lambda x: head(avg_pool(flax_conv.apply(flax_params, x))), (6, 6, 2)),
        "residual": (lambda x: head(x @ jnp.ones((2, 4)) * 0.1 + jnp.tanh(conv2d(x, kernel, 1, "SAME"))),
                     (6, 6, 2)),
    }


def compare(new: dict, old: dict, path: str = "") -> list[str]:
    """Every path where `new` and `old` differ."""
    if isinstance(new, dict) and isinstance(old, dict):
        out = [f"{path}/{k}: only in one" for k in sorted(set(new) ^ set(old))]
        for k in sorted(set(new) & set(old)):
            out += compare(new[k], old[k], f"{path}/{k}")
        return out
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [d for i, (a, b) in enumerate(zip(new, old)) for d in compare(a, b, f"{path}[{i}]")]
    return [] if new == old else [f"{path}: {old!r} -> {new!r}"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--compare", default=None, help="a file this script wrote before")
    parser.add_argument("--workdir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--num-images", type=int, default=100)
    parser.add_argument("--no-alexnet", action="store_true", help="skip the AlexNet-shaped net (about a minute)")
    args = parser.parse_args(argv)

    from jaxadv.data import load_dataset
    from jaxadv.functional import logits_function
    from jaxadv.zoo import load_meta, trained_models

    results = {}
    for name, (fn, shape) in pattern_nets(jax.random.PRNGKey(0)).items():
        results[f"pattern/{name}"] = figures(fn, shape)
        print(name, results[f"pattern/{name}"]["network_bound"], flush=True)
    images = load_dataset("fashion_mnist", "test", args.data_dir).images[:args.num_images]
    for name in ALL_MODELS:
        try:
            load_meta(args.workdir, name)
        except Exception:   # noqa: BLE001 - not stored: skipped, not trained
            print(f"{name}: not stored under {args.workdir}/models, skipped", flush=True)
            continue
        ((model, params),) = trained_models([name], "fashion_mnist", args.workdir, args.data_dir,
                                            verbose=False).values()
        results[f"zoo/{name}"] = figures(logits_function(model.module, params), images.shape[1:], images)
        print(name, results[f"zoo/{name}"]["network_bound"], flush=True)
    if not args.no_alexnet:
        from jaxadv.alexnet import ALEXNET_INPUT, AlexNetShaped, alexnet_variables
        fn = jax.tree_util.Partial(AlexNetShaped().apply, alexnet_variables())
        results["alexnet"] = figures(fn, ALEXNET_INPUT)
        print("AlexNet-shaped", results["alexnet"]["network_bound"], flush=True)

    Path(args.out).write_text(json.dumps(results, indent=1, sort_keys=True))
    if args.compare:
        differences = compare(results, json.loads(Path(args.compare).read_text()))
        print(f"{len(differences)} differences against {args.compare}")
        for line in differences:
            print("  " + line)
        return 1 if differences else 0
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
