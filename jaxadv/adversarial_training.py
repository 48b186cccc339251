"""Adversarial training with a pool of adversarial examples per layer (§4.2).

The paper's recipe for its 100-100-10 sigmoid net: keep a pool of adversarial
examples, continually replace a random part of it by fresh examples made
against the current model, and mix the pool into the training data all the
time. The "subtle, but essential" detail: adversarial examples are made *for
each layer's output* and used to train the layers above, with a separate pool
per layer.

A pool lives at a representation index `layer`: -1 is the input image, k >= 0
is the output of layer k of a flax `nn.Sequential`. Its examples are perturbed
representations h' with the true label y of the image they came from, and
they enter the loss through the layers above k
(`jaxadv.functional.LayersAbove`), so their gradient reaches only those.

    config = AdversarialTrainingConfig(pool_layers=(-1, 2, 4))
    params, history = adversarial_train(module, images, labels, key, config, make_adversarial)

`model` is any model, as for every analysis: a flax module (initialised from
`key` unless `params` are given) or a function apply(params, x) with its
`params`. Pools at hidden layers and dropout need the network cut at its
layers, so they need an `nn.Sequential` (the zoo's models are). `penalty(params)`
adds a regulariser to the loss (the zoo passes its weight decay).

`make_adversarial(logits_fn, inputs, labels, key, lower, upper) -> (adversarial, success)`
is any attack (the experiment passes the L-BFGS attack with random wrong
targets). It runs on the host between jitted chunks of training steps; the
steps themselves are a `lax.scan`. With no pools the same loop trains the
baselines: weight decay alone, or dropout (`dropout_rate > 0`).
"""
from __future__ import annotations

import functools
import time
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxadv import checks
from jaxadv.functional import (INPUT, LayersAbove, LayersBelow, ModuleApply, apply_layers, hidden_layers,
                               layer_kind, representation_bounds as _sequential_bounds)

Params = object   # any pytree of arrays (a flax module's variables)

MakeAdversarial = Callable[..., tuple]


class Examples(NamedTuple):
    """Representations fed to the layer above `layer`, with the true labels of their source images."""
    inputs: jax.Array   # [P, *representation_shape]
    labels: jax.Array   # int32 [P]


class AdversarialPool(NamedTuple):
    """A fixed-size pool of adversarial examples; `born[i]` is the refresh that put entry i there."""
    inputs: jax.Array   # [P, *representation_shape]
    labels: jax.Array   # int32 [P]
    born: jax.Array     # int32 [P]
    refreshes: jax.Array  # int32 scalar: how many refreshes the pool has seen


class AdversarialTrainingConfig(NamedTuple):
    """Everything the paper leaves open, in one place. Defaults: see the experiment's record."""
    epochs: int = 10
    batch_size: int = 128            # clean examples per step
    learning_rate: float = 1e-3      # peak Adam step, cosine-decayed to 0 (as jaxadv.train does)
    pool_layers: tuple = ()          # representation indices with a pool; () trains a baseline
    pool_size: int = 2000            # examples per pool
    pool_batch_size: int = 32        # examples drawn from each pool per step
    refresh_every: int = 100         # steps between refreshes
    refresh_fraction: float = 0.25   # share of each pool replaced per refresh
    dropout_rate: float = 0.0        # hidden-unit dropout (baseline); 0 disables it


class TrainState(NamedTuple):
    """What adversarial training carries from step to step: the parameters, the optimiser's state, the step."""
    params: Params
    opt_state: optax.OptState
    step: jax.Array


# -- the pool --------------------------------------------------------------------

def init_pool(examples: Examples) -> AdversarialPool:
    """A pool holding `examples`, all born at refresh 0."""
    inputs, labels = jnp.asarray(examples.inputs), jnp.asarray(examples.labels, jnp.int32)
    if labels.ndim != 1 or inputs.shape[0] != labels.shape[0] or labels.shape[0] == 0:
        raise ValueError(f"examples must hold as many labels as inputs (and at least one), "
                         f"got inputs {inputs.shape} and labels {labels.shape}")
    return AdversarialPool(inputs, labels, jnp.zeros(labels.shape, jnp.int32), jnp.int32(0))


def num_replaced(pool_size: int, fraction: float) -> int:
    """How many entries a refresh with `fraction` replaces (at least one)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, round(fraction * pool_size))


def refresh_pool(pool: AdversarialPool, key: jax.Array, fresh: Examples, fraction: float) -> AdversarialPool:
    """Replace a uniformly random `fraction` of the pool's entries by the first fresh examples.

    `fraction` fixes the number replaced, `num_replaced(len(pool), fraction)`;
    `fresh` must hold at least that many. The other entries are kept as they were.
    """
    size = pool.labels.shape[0]
    n = num_replaced(size, fraction)
    if fresh.labels.shape[0] < n:
        raise ValueError(f"fresh must hold at least {n} examples to replace {fraction} of a pool of {size}, "
                         f"got {fresh.labels.shape[0]}")
    if fresh.inputs.shape[1:] != pool.inputs.shape[1:]:
        raise ValueError(f"fresh inputs have shape {fresh.inputs.shape[1:]} per example, the pool's "
                         f"{pool.inputs.shape[1:]}")
    return _replace(pool, key, fresh.inputs[:n], jnp.asarray(fresh.labels[:n], jnp.int32))


@jax.jit
def _replace(pool, key, inputs, labels):
    slots = jax.random.permutation(key, pool.labels.shape[0])[:labels.shape[0]]
    refreshes = pool.refreshes + 1
    return AdversarialPool(pool.inputs.at[slots].set(inputs.astype(pool.inputs.dtype)),
                           pool.labels.at[slots].set(labels),
                           pool.born.at[slots].set(refreshes),
                           refreshes)


# -- forward passes and the loss ---------------------------------------------------

def _apply_fn(model):
    """(params, x) -> logits for a flax module or a function apply(params, x)."""
    return ModuleApply(model) if isinstance(model, nn.Module) else model


@functools.partial(jax.jit, static_argnums=(0, 3))
def representation(model, params: Params, images: jax.Array, layer: int) -> jax.Array:
    """The representation at index `layer` (-1: the images themselves)."""
    return images if layer == INPUT else LayersBelow(model, layer)(params, images)


def representation_bounds(model, layer: int) -> tuple[float, float]:
    """The box an adversarial representation must stay in: pixels lie in [0, 1], sigmoid outputs too, ReLUs in [0, ∞)."""
    return (0.0, 1.0) if layer == INPUT else _sequential_bounds(model, layer)


def dropout_layers(model: nn.Sequential) -> tuple[int, ...]:
    """Hidden outputs that feed a parametrised layer (or flatten): where dropout masks go.

    Skipping a nonlinearity directly followed by max-pooling masks each
    conv block once, at the pool's output.
    """
    return tuple(k for k in hidden_layers(model) if layer_kind(model.layers[k + 1]) in ("dense", "conv", "flatten"))


def forward(model, params: Params, h: jax.Array, start: int = 0,
            key: jax.Array | None = None, dropout_rate: float = 0.0) -> jax.Array:
    """Logits from the output of layer start-1, with inverted dropout on `dropout_layers` when `key` is given."""
    if not isinstance(model, nn.Sequential):
        return _apply_fn(model)(params, h)      # validate_config allows only start = 0, no dropout here
    masked = dropout_layers(model) if key is not None and dropout_rate > 0.0 else ()
    keys = dict(zip(masked, jax.random.split(key, len(masked)))) if masked else {}

    def drop(index, h):
        if index not in keys:
            return h
        keep = jax.random.bernoulli(keys[index], 1.0 - dropout_rate, h.shape)
        return jnp.where(keep, h / (1.0 - dropout_rate), 0.0)

    return apply_layers(model, params, h, start, after_layer=drop)


def pool_loss(model, params: Params, layer: int, examples: Examples,
              key: jax.Array | None = None, dropout_rate: float = 0.0) -> jax.Array:
    """Mean cross-entropy of examples that enter above representation `layer`."""
    logits = forward(model, params, examples.inputs, layer + 1, key, dropout_rate)
    return optax.softmax_cross_entropy_with_integer_labels(logits, examples.labels).mean()


def training_loss(model, params: Params, clean: Examples, pool_batches: tuple,
                  key: jax.Array, dropout_rate: float = 0.0, penalty: Callable | None = None) -> jax.Array:
    """Cross-entropy averaged over every example of the step (clean and pooled) plus `penalty(params)`.

    `pool_batches` is a tuple of (layer, Examples). Averaging over examples
    makes the pools simply more training data, mixed into every step.
    """
    keys = jax.random.split(key, len(pool_batches) + 1)
    total = pool_loss(model, params, INPUT, clean, keys[0], dropout_rate) * clean.labels.shape[0]
    count = clean.labels.shape[0]
    for (layer, batch), k in zip(pool_batches, keys[1:]):
        total = total + pool_loss(model, params, layer, batch, k, dropout_rate) * batch.labels.shape[0]
        count += batch.labels.shape[0]
    return total / count + (penalty(params) if penalty is not None else 0.0)


# -- training -------------------------------------------------------------------------

def make_optimizer(config: AdversarialTrainingConfig, total_steps: int) -> optax.GradientTransformation:
    """Adam with a cosine-decayed step, the schedule `jaxadv.train` uses, so baselines compare like for like."""
    return optax.adam(optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1)))


def init_state(params: Params, config: AdversarialTrainingConfig, total_steps: int) -> TrainState:
    """The state at step 0: `params` and a fresh optimiser for `total_steps` steps of `config`."""
    return TrainState(params, make_optimizer(config, total_steps).init(params), jnp.int32(0))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def run_steps(model, config: AdversarialTrainingConfig, total_steps: int, penalty: Callable | None,
              frozen: tuple[str, ...], state: TrainState, images, labels, batch_indices, pools: tuple, key: jax.Array):
    """`len(batch_indices)` optimiser steps as one `lax.scan`; returns (state, loss per step).

    Each step takes the clean batch `batch_indices[t]` and `pool_batch_size`
    uniform draws from each pool in `pools` (a tuple of AdversarialPool, one per
    `config.pool_layers`; empty before the pools are first filled).
    """
    optimizer = make_optimizer(config, total_steps)

    def step(state, xs):
        indices, step_key = xs
        pool_key, dropout_key = jax.random.split(step_key)
        clean = Examples(images[indices], labels[indices])
        pool_batches = []
        for layer, pool, k in zip(config.pool_layers, pools, jax.random.split(pool_key, max(1, len(pools)))):
            draw = jax.random.randint(k, (config.pool_batch_size,), 0, pool.labels.shape[0])
            pool_batches.append((layer, Examples(pool.inputs[draw], pool.labels[draw])))
        loss, grads = jax.value_and_grad(
            lambda p: training_loss(model, p, clean, tuple(pool_batches), dropout_key, config.dropout_rate, penalty)
        )(state.params)
        if frozen:     # frozen layers get no gradient, so Adam never moves them
            grads = {**grads, "params": {name: jax.tree.map(jnp.zeros_like, g) if name in frozen else g
                                         for name, g in grads["params"].items()}}
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), loss

    keys = jax.random.split(key, batch_indices.shape[0])
    state, losses = jax.lax.scan(step, state, (batch_indices, keys))
    return state, losses


def epoch_batches(key: jax.Array, num_examples: int, batch_size: int, epochs: int) -> np.ndarray:
    """Clean-batch indices for every step: a fresh permutation per epoch, last partial batch dropped."""
    if batch_size > num_examples:
        raise ValueError(f"batch_size {batch_size} exceeds the {num_examples} training examples")
    per_epoch = num_examples // batch_size
    keys = jax.random.split(key, epochs)
    perms = [np.asarray(jax.random.permutation(k, num_examples))[:per_epoch * batch_size] for k in keys]
    return np.concatenate(perms).reshape(epochs * per_epoch, batch_size).astype(np.int32)


def logits_above(model, params: Params, layer: int) -> jax.tree_util.Partial:
    """The logits as a function of the representation at index `layer`, its parameters traced.

    An attack compiled for one refresh is then reused by the next (new parameters, same program).
    """
    if layer == INPUT and not isinstance(model, nn.Sequential):
        return jax.tree_util.Partial(_apply_fn(model), params)
    return jax.tree_util.Partial(LayersAbove(model, layer), params)


def fresh_adversarial_examples(model, params: Params, layer: int, images, labels, key,
                               make_adversarial: MakeAdversarial) -> tuple[Examples, np.ndarray]:
    """Adversarial versions of `images`' representations at `layer` against the current model.

    Returns the examples (with the images' true labels) and the attack's success flags.
    """
    h = representation(model, params, jnp.asarray(images), layer)
    lower, upper = representation_bounds(model, layer)
    adversarial, success = make_adversarial(logits_above(model, params, layer), h, jnp.asarray(labels), key,
                                            lower, upper)
    return Examples(jnp.asarray(adversarial, h.dtype), jnp.asarray(labels, jnp.int32)), np.asarray(success)


def validate_config(model, config: AdversarialTrainingConfig) -> None:
    """Refuse a `config` that `model` cannot train with (ValueError / TypeError naming the field), before any work."""
    for name in ("epochs", "batch_size", "pool_size", "pool_batch_size", "refresh_every"):
        if getattr(config, name) < 1:
            raise ValueError(f"config.{name} must be positive, got {getattr(config, name)}")
    if not 0.0 <= config.dropout_rate < 1.0:
        raise ValueError(f"config.dropout_rate must lie in [0, 1), got {config.dropout_rate}")
    num_replaced(config.pool_size, config.refresh_fraction)
    if not isinstance(model, nn.Sequential):
        if any(layer != INPUT for layer in config.pool_layers) or config.dropout_rate:
            raise TypeError("model: pools at hidden layers and dropout cut the network at its layers: they need a "
                            f"flax nn.Sequential, got {type(model).__name__} (pool_layers=(-1,) works for any model)")
        return
    last = len(model.layers) - 1
    for layer in config.pool_layers:
        if not INPUT <= layer < last:
            raise ValueError(f"config.pool_layers entries must lie in [-1, {last}), got {layer}")
    if len(set(config.pool_layers)) != len(config.pool_layers):
        raise ValueError(f"config.pool_layers must not repeat a layer, got {config.pool_layers}")


#: Training images of the one forward pass at entry (`checks.finite_logits`): enough to see NaN parameters.
_ENTRY_PASS = 256


def adversarial_train(model, images, labels, key: jax.Array, config: AdversarialTrainingConfig,
                      make_adversarial: MakeAdversarial | None = None,
                      evaluate: Callable[[Params], dict] | None = None, *, params=None,
                      penalty: Callable[[Params], jax.Array] | None = None,
                      frozen: tuple[str, ...] = ()) -> tuple[Params, list[dict]]:
    """Train `model` on (images, labels), with adversarial pools at `config.pool_layers`.

    model: a flax module (nn.Sequential for hidden-layer pools and dropout) or a function apply(params, x).
    params: the initial parameters, or a function of a key that draws them (e.g. a `ZooModel`'s `init`);
      a flax module without them is initialised from `key` by `module.init`.
    penalty: params -> a scalar added to the loss (hashable: a jit cache key), e.g. the zoo's weight decay.
    frozen: names in `params["params"]` kept as they are (the zoo's `ZooModel.frozen`: AE400-10's encoder).

    Training runs in chunks of `refresh_every` steps. Before each chunk after
    the first, every pool is refreshed: fresh adversarial examples are made
    from random training images against the current parameters (the first
    time, the whole pool is filled at once, so the first chunk is clean
    training). After each chunk `evaluate(params)` (if given) adds its numbers
    to the history, one dict per chunk with step, epoch, loss and timings.
    """
    if not callable(model) and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a flax module or a function apply(params, x), got {type(model).__name__}")
    if params is None and not isinstance(model, nn.Module):
        raise TypeError("params: a function apply(params, x) needs its initial parameters")
    if isinstance(frozen, str) or not all(isinstance(name, str) for name in frozen):
        raise TypeError(f"frozen: expected a tuple of parameter names, got {frozen!r}")
    frozen = tuple(frozen)
    if isinstance(model, nn.Sequential) and not isinstance(model.layers, tuple):
        model = model.clone(layers=tuple(model.layers))     # a list of layers cannot key a jit cache
    if penalty is not None and not callable(penalty):
        raise TypeError(f"penalty: expected a function of the parameters, got {type(penalty).__name__}")
    validate_config(model, config)
    images = jnp.asarray(checks.images(images, "images"), jnp.float32)
    if config.pool_layers and make_adversarial is None:
        raise ValueError("make_adversarial is required when config.pool_layers is not empty")

    init_key, batch_key, loop_key = jax.random.split(key, 3)
    schedule = epoch_batches(batch_key, images.shape[0], config.batch_size, config.epochs)
    total_steps = schedule.shape[0]
    if params is None:
        params = model.init(init_key, images[:1])
    elif callable(params):
        params = params(init_key)
    missing = [name for name in frozen if name not in params.get("params", {})] if frozen else []
    if missing:
        raise ValueError(f"frozen: no parameters named {missing} in params['params']")
    logits_fn, num_classes = checks.model(model, params, images, name="model")
    checks.batch_mismatch(logits_fn, images, labels, "labels")
    labels = jnp.asarray(checks.labels(labels, images.shape[0], num_classes, "labels"), jnp.int32)
    checks.finite_logits(logits_fn, images[:_ENTRY_PASS], "model")
    state = init_state(params, config, total_steps)
    steps_per_epoch = images.shape[0] // config.batch_size
    pools: tuple = ()
    history: list[dict] = []
    train_seconds = attack_seconds = 0.0

    for chunk, start in enumerate(range(0, schedule.shape[0], config.refresh_every)):
        refresh_key, step_key = jax.random.split(jax.random.fold_in(loop_key, chunk))
        record: dict = {}
        if config.pool_layers and chunk > 0:
            tic = time.perf_counter()
            pools, success = _refresh_all(model, state.params, images, labels, refresh_key, config, pools,
                                          make_adversarial)
            attack_seconds += time.perf_counter() - tic
            record["fresh_success_rate"] = success
        tic = time.perf_counter()
        state, losses = run_steps(model, config, total_steps, penalty, frozen, state, images, labels,
                                  jnp.asarray(schedule[start:start + config.refresh_every]), pools, step_key)
        losses.block_until_ready()
        train_seconds += time.perf_counter() - tic
        record.update(step=int(state.step), epoch=int(state.step) / steps_per_epoch, loss=float(losses.mean()),
                      train_seconds=train_seconds, attack_seconds=attack_seconds)
        if evaluate is not None:
            record.update(evaluate(state.params))
        history.append(record)
    return state.params, history


def _refresh_all(model, params, images, labels, key, config, pools, make_adversarial):
    """Fill (first time) or refresh every pool; returns the pools and each pool's attack success rate.

    Attacks always run on batches of `num_replaced` examples (a first fill is
    several such batches), so one compiled attack serves the whole run.
    """
    first = not pools
    batch = num_replaced(config.pool_size, config.refresh_fraction)
    num_batches = -(-config.pool_size // batch) if first else 1
    new_pools, success_rates = [], {}
    for i, layer in enumerate(config.pool_layers):
        layer_key = jax.random.fold_in(key, i)
        source_key, slot_key = jax.random.split(layer_key)
        source = jax.random.choice(source_key, images.shape[0], (num_batches * batch,), replace=False)
        parts, successes = [], []
        for j in range(num_batches):
            rows = source[j * batch:(j + 1) * batch]
            fresh, success = fresh_adversarial_examples(model, params, layer, images[rows], labels[rows],
                                                        jax.random.fold_in(layer_key, 1000 + j), make_adversarial)
            parts.append(fresh)
            successes.append(success)
        if first:
            fresh = Examples(*(jnp.concatenate(field)[:config.pool_size] for field in zip(*parts)))
            new_pools.append(init_pool(fresh))
        else:
            new_pools.append(refresh_pool(pools[i], slot_key, parts[0], config.refresh_fraction))
        success_rates[str(layer)] = float(np.mean(np.concatenate(successes)))
    return tuple(new_pools), success_rates
