"""One way in for any model: a flax module with its variables, or a pure function with its parameters.

    logits_fn = logits_function(module, variables)   # a flax linen module
    logits_fn = logits_function(apply, params)       # apply(params, x) -> logits, params any pytree
    logits_fn = logits_function(f)                   # f(x) -> logits
    result = lbfgs_attack(logits_fn, images, targets)  # every analysis takes logits_fn (or model, params=)

The result is a `jax.tree_util.Partial`: the function is its static part and
the parameters are its pytree leaves, so jit traces them as arrays. A second
parameter set of the same architecture (the next checkpoint, the next
adversarial-training refresh) then reuses the compiled attack; a closure
written afresh per call is a new function to jit, and each call would
recompile the whole attack (seconds per call).
`tests/test_functional.py` counts the compilations.

A flax module is applied through `ModuleApply`, which compares equal for equal
modules (two `FC(100)` instances), where bound `module.apply` methods compare
by identity.

`check_logits_call` turns the wrong call into an error that names the
argument and the fix: `module.apply` passed without its variables (which today
dies deep inside flax), a function that drops the batch axis.

The paper's hidden layers (§3, §4.2) need a network cut in two. For an
`nn.Sequential` (the zoo, or a user's) `split_sequential` cuts it at layer k:
`LayersBelow` gives φ(x), the output of layer k, and `LayersAbove` the logits
from φ. Both take the whole variables, so gradients reach the right layers.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

#: Index of the input image as a representation (the "layer" before layer 0).
INPUT = -1


class _ModuleCallable:
    """A callable over a flax module that is a jit cache key: equal for equal modules.

    A module holding a list (`nn.Sequential([...])`) cannot be hashed; it is then keyed by identity.
    """
    __slots__ = ()

    def _key(self):
        try:
            hash(self.module)
            return (type(self), self.module) + tuple(self)[1:]
        except TypeError:
            return (type(self), id(self.module)) + tuple(self)[1:]

    def __eq__(self, other):
        return type(self) is type(other) and (tuple(self) == tuple(other) if self.module is other.module
                                              else self._key() == other._key())

    def __ne__(self, other):    # tuple's own __ne__ would compare fields alone: ModuleApply(m) != LastDenseInput(m)
        return not self == other

    def __hash__(self):
        return hash(self._key())


class ModuleApply(_ModuleCallable, NamedTuple("ModuleApply", [("module", nn.Module)])):
    """`module.apply(variables, x)`, keyed by the module (so equal modules share compilations)."""

    def __call__(self, variables, x):
        return self.module.apply(variables, x)


def logits_function(model, params=None, *, argument: str = "model") -> jax.tree_util.Partial:
    """`model` as a pure logits function x -> [batch, classes] whose parameters jit traces.

    model: a flax linen module (params: its variables, as `module.init` returns
      them); a function apply(params, x) (params: any pytree of arrays); or a
      function of x alone (params None; a `jax.tree_util.Partial` keeps its
      arrays traced, a functools.partial over arrays is converted to one).
    argument: the name to put in error messages.
    """
    if isinstance(model, _ModuleCallable) and params is None:
        raise TypeError(f"{argument}: {type(model).__name__} is a function of (variables, x): pass params=variables")
    if isinstance(model, nn.Module):
        if params is None:
            raise TypeError(f"{argument}: a flax module needs its variables: pass params=variables "
                            f"(from {type(model).__name__}(...).init(key, x))")
        return jax.tree_util.Partial(ModuleApply(model), params)
    if _is_module_apply(model):
        if params is None:
            raise TypeError(f"{argument}: {type(model.__self__).__name__}.apply takes the variables first, "
                            "apply(variables, x): pass them as params=variables, or pass "
                            "jax.tree_util.Partial(module.apply, variables)")
        return jax.tree_util.Partial(ModuleApply(model.__self__), params)
    if not callable(model):
        hint = " (a zoo model: pass model.module with its variables)" if isinstance(getattr(model, "module", None),
                                                                                    nn.Module) else ""
        raise TypeError(f"{argument}: expected a flax module or a function, got {type(model).__name__}{hint}")
    if params is not None:
        return jax.tree_util.Partial(model, params)
    if isinstance(model, jax.tree_util.Partial):
        return model
    if isinstance(model, functools.partial):
        leaves = jax.tree.leaves((model.args, model.keywords))
        if leaves and all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in leaves):
            return jax.tree_util.Partial(model.func, *model.args, **model.keywords)
    return jax.tree_util.Partial(model)


def failed_call(argument: str, shape, error: Exception) -> TypeError:
    """The error for a model that fails on a batch of `shape`: what failed, and the two usual fixes."""
    return TypeError(
        f"{argument}: calling it on a batch of shape {tuple(shape)} failed with {type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}. It must map a batch [batch, *image_shape] to "
        "[batch, ...]: a function of one image needs jax.vmap; a flax module or a function apply(params, x) "
        "needs its parameters: pass params=... (a module's variables as init returns them, {'params': ...})")


def check_logits_call(logits_fn: Callable, example_shape, dtype=jnp.float32, *, argument: str = "logits_fn") -> int:
    """The number of classes of `logits_fn` on inputs [batch, *example_shape]; a wrong call is named with its fix.

    Runs `jax.eval_shape` on a batch of two, so nothing is computed.
    """
    batch = jax.ShapeDtypeStruct((2,) + tuple(example_shape), dtype)
    try:
        out = jax.eval_shape(logits_fn, batch)
    except Exception as error:   # noqa: BLE001 - any failure of the user's function is reported with the fix
        raise failed_call(argument, batch.shape, error) from error
    if not hasattr(out, "shape") or len(out.shape) != 2 or out.shape[0] != 2:
        raise ValueError(f"{argument}: returned shape {getattr(out, 'shape', type(out).__name__)} for a batch of 2 "
                         "inputs; it must return logits [batch, classes], keeping the batch axis (wrap a function "
                         "of one image in jax.vmap)")
    return int(out.shape[1])


def _is_module_apply(fn) -> bool:
    return getattr(fn, "__name__", None) == "apply" and isinstance(getattr(fn, "__self__", None), nn.Module)


# -- cutting an nn.Sequential at a hidden layer ------------------------------------------------

def layer_kind(layer) -> str:
    """What a Sequential layer is, for the analyses that care: dense, conv, sigmoid, relu, tanh, pool, flatten, other."""
    fn = getattr(layer, "func", layer)      # functools.partial(max_pool, ...) is a pool
    if isinstance(layer, nn.Dense):
        return "dense"
    if isinstance(layer, nn.Conv):
        return "conv"
    if fn in (nn.sigmoid, jax.nn.sigmoid):
        return "sigmoid"
    if fn in (nn.relu, jax.nn.relu):
        return "relu"
    if fn in (nn.tanh, jnp.tanh):
        return "tanh"
    if "pool" in getattr(fn, "__name__", ""):
        return "pool"
    if getattr(fn, "__name__", "") == "flatten":
        return "flatten"
    return "other"


class LastDenseInput(_ModuleCallable, NamedTuple("LastDenseInput", [("module", nn.Module)])):
    """(variables, x) -> the input of the module's last `nn.Dense` call: the features its softmax reads.

    "The last feature layer" of the paper's §3, for any flax module whose head is a dense layer (a
    Sequential's last hidden layer, or a compact module's), read with `nn.intercept_methods`.
    """

    def __call__(self, variables, x):
        inputs = []

        def record(next_fun, args, kwargs, context):
            if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
                inputs.append(args[0])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(record):
            self.module.apply(variables, x)
        if not inputs:
            raise ValueError(f"module: {type(self.module).__name__} calls no nn.Dense; pass its features as a function")
        return inputs[-1]


def check_sequential(module, argument: str = "module") -> nn.Sequential:
    """`module` if it is a flax nn.Sequential, else TypeError naming `argument` (cutting at a layer needs one)."""
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"{argument}: cutting a network at a hidden layer needs a flax nn.Sequential, got "
                        f"{type(module).__name__} (for another module, pass its features and head as functions)")
    return module


def hidden_layers(module: nn.Sequential) -> tuple[int, ...]:
    """Indices of the hidden representations φ(x): outputs of hidden nonlinearities and pools."""
    layers = check_sequential(module).layers
    return tuple(i for i, layer in enumerate(layers[:-1]) if layer_kind(layer) in ("sigmoid", "relu", "tanh", "pool"))


def apply_layers(module: nn.Sequential, variables, h: jax.Array, start: int = 0, stop: int | None = None,
                 after_layer: Callable[[int, jax.Array], jax.Array] | None = None) -> jax.Array:
    """layers[start:stop] of `module` on `h` (the output of layer start-1, or the input when start = 0).

    `after_layer(i, h)`, if given, may change each layer's output (dropout masks).
    Parameters are `variables["params"]["layers_i"]`, as `nn.Sequential` names them.
    """
    layers = check_sequential(module).layers
    params = variables.get("params", {}) if isinstance(variables, dict) else {}
    for index in range(start, len(layers) if stop is None else stop):
        layer = layers[index]
        if isinstance(layer, nn.Module):
            name = f"layers_{index}"
            h = layer.apply({"params": params[name]} if name in params else {}, h)
        else:
            h = layer(h)
        if after_layer is not None:
            h = after_layer(index, h)
    return h


class LayersBelow(_ModuleCallable, NamedTuple("LayersBelow", [("module", nn.Sequential), ("layer", int)])):
    """(variables, x) -> the output of layer `layer` of `module`: φ(x)."""

    def __call__(self, variables, x):
        return x if self.layer == INPUT else apply_layers(self.module, variables, x, 0, self.layer + 1)


class LayersAbove(_ModuleCallable, NamedTuple("LayersAbove", [("module", nn.Sequential), ("layer", int)])):
    """(variables, h) -> logits, with h the output of layer `layer` (INPUT: the image)."""

    def __call__(self, variables, h):
        return apply_layers(self.module, variables, h, self.layer + 1)


def split_sequential(module: nn.Sequential, layer: int) -> tuple[LayersBelow, LayersAbove]:
    """φ and the head of `module` cut after layer `layer`: above(v, below(v, x)) == module.apply(v, x)."""
    layers = check_sequential(module).layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not INPUT <= layer < len(layers) - 1:
        raise ValueError(f"layer: must be in [{INPUT}, {len(layers) - 1}) for this {len(layers)}-layer "
                         f"Sequential, got {layer!r}")
    return LayersBelow(module, int(layer)), LayersAbove(module, int(layer))


def representation_bounds(module: nn.Sequential, layer: int, lower: float = 0.0,
                          upper: float = 1.0) -> tuple[float, float]:
    """The interval every value of layer `layer`'s output lies in, for inputs in [lower, upper].

    Propagated layer by layer: a sigmoid's outputs lie in [0, 1], a ReLU's in [0, ∞), pools and flatten keep
    the interval, anything else (dense, conv) may give any value.
    """
    layers = check_sequential(module).layers
    for candidate in layers[:layer + 1]:
        kind = layer_kind(candidate)
        if kind == "sigmoid":
            lower, upper = 0.0, 1.0
        elif kind == "tanh":
            lower, upper = -1.0, 1.0
        elif kind == "relu":
            lower, upper = max(lower, 0.0), max(upper, 0.0)
        elif kind not in ("pool", "flatten"):
            lower, upper = -float("inf"), float("inf")
    return float(lower), float(upper)

