"""Supervised training of the zoo: minibatch Adam on cross-entropy + the paper's weight decay.

    params = train(model, images, labels, jax.random.PRNGKey(0), TrainConfig(epochs=20))
    err = error_rate(model, params, test.images, test.labels)

The paper trained its MNIST models with L-BFGS to convergence; we use Adam with
a cosine-decayed learning rate, which reaches comparable optima in minutes on a
CPU. The loss is mean cross-entropy + `weight_decay_penalty` (λ_l Σ W_l² / k_l).
An epoch is one jitted `lax.scan` over shuffled minibatches (the remainder that
does not fill a batch is dropped each epoch; a different one each epoch).
Everything is a pure function of the key, so training is deterministic.

AE400-10 (`model.pretrain == "sparse_autoencoder"`) first learns its first dense
layer as the encoder of a 784-400-784 sparse sigmoid autoencoder without labels;
that layer is frozen (named in `model.frozen`) while the softmax on top is trained.

`train` takes a `jaxadv.models.ZooModel` (a flax module plus the zoo's recipe);
`error_rate` takes any model, as every analysis does (`jaxadv.functional`).
"""
from __future__ import annotations

import sys
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadv import checks
from jaxadv.functional import layer_kind
from jaxadv.models import ZooModel, weight_decay_penalty


class TrainConfig(NamedTuple):
    """How `train` fits a zoo model: epochs, batch, Adam's peak step, and the autoencoder's pretraining."""
    epochs: int = 20
    batch_size: int = 128
    learning_rate: float = 1e-3   # peak Adam step, cosine-decayed to 0 over the run
    verbose: bool = True          # one log line per epoch on stderr
    # Sparse autoencoder pretraining (AE400-10 only), after Ng's UFLDL notes:
    ae_epochs: int = 20
    ae_learning_rate: float = 3e-3
    ae_sparsity: float = 0.05       # ρ, the target mean activation of each hidden unit
    ae_sparsity_weight: float = 3.0  # β, the weight of Σ_j KL(ρ ‖ ρ̂_j)
    ae_weight_decay: float = 1e-4    # λ_AE in (λ_AE / 2)(‖W_enc‖² + ‖W_dec‖²)


def zoo_config(model: ZooModel, quick: bool = False, verbose: bool = True) -> TrainConfig:
    """The training schedule `train_zoo` uses for `model` (chosen to train in minutes on 2 cores).

    Linear softmax models are cheap and convex: many epochs at a larger step to
    get close to the optimum, so that the ordering by λ is the regulariser's and
    not the optimiser's. `quick` is a smoke-test schedule (one or two epochs).
    """
    _check_model(model)
    kinds = {layer_kind(layer) for layer in model.module.layers} & {"dense", "conv", "sigmoid", "relu"}
    if model.pretrain == "sparse_autoencoder":
        config = TrainConfig(epochs=40, learning_rate=1e-2, ae_epochs=20)
    elif kinds == {"dense"}:  # softmax regression
        config = TrainConfig(epochs=40, learning_rate=3e-3)
    elif "conv" in kinds:     # about a minute per epoch on 2 shared cores
        config = TrainConfig(epochs=4, learning_rate=2e-3)
    else:                     # sigmoid MLPs
        config = TrainConfig(epochs=60, learning_rate=2e-3)
    if quick:
        config = config._replace(epochs=1 if "conv" in kinds else 2, ae_epochs=1)
    return config._replace(verbose=verbose)


def train(model: ZooModel, images, labels, key: jax.Array, config: TrainConfig = TrainConfig()):
    """Train `model` on `images` [N, 28, 28, 1] in [0, 1] and int `labels` [N]; return its variables."""
    _check_config(config)
    _check_model(model)
    init_key, pretrain_key, shuffle_key = jax.random.split(key, 3)
    variables = model.init(init_key)
    images, labels = _check_training_data(model.module, variables, images, labels, model.input_shape)
    if model.pretrain == "sparse_autoencoder":
        (encoder_name,) = model.frozen
        features = variables["params"][encoder_name]["kernel"].shape[-1]
        encoder = pretrain_sparse_autoencoder(images, pretrain_key, config, features, name=model.name)
        variables = {**variables, "params": {**variables["params"],
                                             encoder_name: {"kernel": encoder["w"], "bias": encoder["b"]}}}
    elif model.pretrain is not None:
        raise ValueError(f"model {model.name!r} has unknown pretrain {model.pretrain!r}")

    def loss_fn(variables, x, y):
        # stop_gradient lets XLA skip the frozen layers' weight gradients altogether.
        params = {name: jax.lax.stop_gradient(p) if name in model.frozen else p
                  for name, p in variables["params"].items()}
        variables = {**variables, "params": params}
        logits = model.module.apply(variables, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return ce + weight_decay_penalty(model, variables)

    adam = _adam(config.learning_rate, config.epochs * _num_batches(len(labels), config.batch_size))
    labels_tree = {**jax.tree.map(lambda _: "train", variables),
                   "params": {name: jax.tree.map(lambda _: "frozen" if name in model.frozen else "train", p)
                              for name, p in variables["params"].items()}}
    optimizer = optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels_tree)
    return fit(loss_fn, variables, (images, labels), shuffle_key, optimizer, config.epochs,
               config.batch_size, name=model.name, verbose=config.verbose)


def pretrain_sparse_autoencoder(images, key: jax.Array, config: TrainConfig = TrainConfig(),
                                features: int = 400, name: str = "autoencoder") -> dict:
    """Encoder {"w": [784, features], "b": [features]} of a sparse sigmoid autoencoder.

    Loss (per example, averaged over the batch): ½‖x̂ − x‖² + β Σ_j KL(ρ ‖ ρ̂_j)
    + (λ_AE / 2)(‖W_enc‖² + ‖W_dec‖²), with h = σ(W_enc x + b), x̂ = σ(W_dec h + c)
    and ρ̂_j the mean activation of hidden unit j over the minibatch.
    """
    x = jnp.asarray(images, jnp.float32).reshape(len(images), -1)
    init_key, shuffle_key = jax.random.split(key)
    k_enc, k_dec = jax.random.split(init_key)
    glorot = jax.nn.initializers.glorot_uniform()
    params = {"enc": {"w": glorot(k_enc, (x.shape[1], features), jnp.float32), "b": jnp.zeros(features)},
              "dec": {"w": glorot(k_dec, (features, x.shape[1]), jnp.float32), "b": jnp.zeros(x.shape[1])}}
    rho, beta, lam = config.ae_sparsity, config.ae_sparsity_weight, config.ae_weight_decay

    def loss_fn(params, xb):
        h = jax.nn.sigmoid(xb @ params["enc"]["w"] + params["enc"]["b"])
        x_hat = jax.nn.sigmoid(h @ params["dec"]["w"] + params["dec"]["b"])
        reconstruction = 0.5 * jnp.sum((x_hat - xb) ** 2, axis=1).mean()
        rho_hat = jnp.clip(h.mean(axis=0), 1e-6, 1 - 1e-6)
        kl = jnp.sum(rho * jnp.log(rho / rho_hat) + (1 - rho) * jnp.log((1 - rho) / (1 - rho_hat)))
        decay = 0.5 * lam * (jnp.sum(params["enc"]["w"] ** 2) + jnp.sum(params["dec"]["w"] ** 2))
        return reconstruction + beta * kl + decay

    optimizer = _adam(config.ae_learning_rate, config.ae_epochs * _num_batches(len(x), config.batch_size))
    params = fit(loss_fn, params, (x,), shuffle_key, optimizer, config.ae_epochs, config.batch_size,
                 name=f"{name} sparse autoencoder", verbose=config.verbose)
    return params["enc"]


def fit(loss_fn: Callable, params, data: tuple, key: jax.Array, optimizer: optax.GradientTransformation,
        epochs: int, batch_size: int, name: str = "", verbose: bool = True):
    """Minimise `loss_fn(params, *batch)` over `epochs` shuffled passes through `data`.

    `data` is a tuple of arrays sharing their leading axis. Each epoch is one
    jitted `lax.scan` over minibatches; the data go in as arguments (not closed
    over) so they are not baked into the compiled program as constants.
    """
    n = len(data[0])
    batch_size = min(batch_size, n)
    num_batches = n // batch_size

    @jax.jit
    def run_epoch(params, opt_state, data, key):
        order = jax.random.permutation(key, n)[: num_batches * batch_size].reshape(num_batches, batch_size)

        def step(carry, idx):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *(d[idx] for d in data))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), order)
        return params, opt_state, losses.mean()

    data = tuple(jnp.asarray(d) for d in data)
    opt_state = optimizer.init(params)
    for epoch, epoch_key in enumerate(jax.random.split(key, epochs), start=1):
        start = time.perf_counter()
        params, opt_state, loss = run_epoch(params, opt_state, data, epoch_key)
        loss = float(loss)  # waits for the epoch to finish, so the time below is honest
        if verbose:
            print(f"[{name}] epoch {epoch}/{epochs}  loss {loss:.4f}  {time.perf_counter() - start:.1f}s",
                  file=sys.stderr, flush=True)
        if not np.isfinite(loss):
            raise FloatingPointError(f"[{name}] training diverged at epoch {epoch} (loss {loss})")
    return params


def error_rate(model, params, images, labels, batch_size: int = 2000) -> float:
    """Fraction of `images` whose argmax logit differs from `labels` (batched, jitted).

    model, params: any model (`jaxadv.functional.logits_function`): a flax module and its variables, a
    function apply(params, x), or a logits function with params None.
    """
    logits_fn, _ = checks.model(model, params, name="model")
    images, labels = _check_training_data(logits_fn, None, images, labels)
    n = len(labels)
    if n == 0:
        raise ValueError("images must hold at least one example")
    batch_size = min(batch_size, n)
    wrong = bad = 0
    for start in range(0, n, batch_size):
        x, y = images[start:start + batch_size], labels[start:start + batch_size]
        valid = len(y)
        if valid < batch_size:  # pad the last batch so that one compiled shape serves all
            x = jnp.concatenate([x, jnp.zeros((batch_size - valid,) + x.shape[1:], x.dtype)])
            y = jnp.concatenate([y, jnp.full((batch_size - valid,), -1, y.dtype)])
        mistakes, nonfinite = _count_wrong(logits_fn, x, y, valid)
        wrong, bad = wrong + int(mistakes), bad + int(nonfinite)
    if bad:    # argmax would read NaN logits as class 0: refused rather than counted
        raise ValueError(f"model: returned NaN or infinite logits for {bad} of {n} images")
    return wrong / n


@jax.jit
def _count_wrong(logits_fn, x, y, valid):
    """(mistakes, rows with a non-finite logit) among the first `valid` rows."""
    logits = logits_fn(x)
    counted = jnp.arange(len(y)) < valid
    nonfinite = ~jnp.all(jnp.isfinite(logits.reshape(logits.shape[0], -1)), axis=-1)
    return jnp.sum((jnp.argmax(logits, axis=-1) != y) & counted), jnp.sum(nonfinite & counted)


# -- helpers ------------------------------------------------------------------

def _adam(learning_rate: float, total_steps: int) -> optax.GradientTransformation:
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(total_steps, 1)))


def _num_batches(n: int, batch_size: int) -> int:
    return max(n // min(batch_size, n), 1)


def _check_config(config: TrainConfig) -> None:
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    for field in ("epochs", "batch_size", "ae_epochs"):
        value = getattr(config, field)
        if not isinstance(value, int) or value < (0 if field == "ae_epochs" else 1):
            raise ValueError(f"config.{field} must be a positive integer, got {value!r}")
    if not config.learning_rate > 0 or not config.ae_learning_rate > 0:
        raise ValueError("config.learning_rate and config.ae_learning_rate must be positive")
    if not 0 < config.ae_sparsity < 1:
        raise ValueError(f"config.ae_sparsity (ρ) must lie in (0, 1), got {config.ae_sparsity}")


def _check_model(model) -> None:
    if not isinstance(model, ZooModel):
        raise TypeError(f"model must be a jaxadv.models.ZooModel (get_model(name)), got {type(model).__name__}")


def _check_training_data(model, params, images, labels, input_shape=None):
    """images as float32 [N, *input_shape] in [0, 1] and labels as int32 [N] within the model's classes."""
    images, labels = np.asarray(images), np.asarray(labels)
    if np.issubdtype(images.dtype, np.floating) and images.ndim >= 2 and len(images):
        images = checks.images(images, "images")     # float64 -> the work dtype, finite after the cast
    if input_shape is not None and images.shape[1:] != tuple(input_shape):
        raise ValueError(f"images must have shape [N, {', '.join(map(str, input_shape))}], got {images.shape}")
    if images.ndim < 2:
        raise ValueError(f"images must have shape [N, *image_shape], got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    logits_fn, num_classes = checks.model(model, params, images, name="model")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels must have shape [{len(images)}] to match images, got {labels.shape}"
                         f"{checks.batch_axis_hint(logits_fn, images)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]")
    return jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
