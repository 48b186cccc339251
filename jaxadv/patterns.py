"""Patterns read as the operators they are: the rewriting pass run before any analysis' rules.

    jaxpr, consts = graph.flatten(jax.make_jaxpr(logits_fn)(example))
    jaxpr = graph.simplify(jaxpr, consts, PATTERNS)   # convolutions as one `CONVOLUTION` equation each

As jax_verify's simplifier does, each pattern replaces a run of equations by
one `graph.Synthetic` equation that holds them (so it evaluates as they did):

- `xla_convolutions`: `conv_general_dilated` with a kernel that does not
  depend on the input.
- `im2col_convolutions`: shifted slices of one value concatenated along the
  channels and multiplied by a matrix (`jaxadv.models.conv2d`), the
  convolution it is, its kernel rebuilt from the matrix.
- `padded_convolutions`: a zero `pad` (a static zero) or a wrap padding
  (`jnp.pad(mode="wrap")`, flax's `padding="CIRCULAR"`: slices of one value
  concatenated around it) just before a convolution, folded into its padding,
  or into a circular convolution of the unpadded value.

A `CONVOLUTION` equation's inputs are (x, the weights it was given, the
constants the replaced equations read), and its params: `kernel`, a function
weights -> kernel [*spatial, C / groups, D]; `spatial_axes`, `strides`,
`padding`, `input_dilation`, `kernel_dilation`, `groups`, `out_extent` (as
`lax.conv_general_dilated` has them, on x's axes); `circular`, per spatial
axis, whether x is wrapped around along it; `primitive`, the name of the
equation it replaced last (the layer's primitive in the user's trace); and
`jaxpr`, the equations.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxadv.graph import Equation, FlatJaxpr, Synthetic, depends_on_input, evaluate

__all__ = ["CONVOLUTION", "LEAKY_RELU", "AVERAGE", "PATTERNS", "xla_convolutions", "im2col_convolutions",
           "padded_convolutions", "leaky_relus", "averages"]

CONVOLUTION = Synthetic("convolution")
LEAKY_RELU = Synthetic("leaky_relu")
AVERAGE = Synthetic("average")


class _Part(NamedTuple):
    """A slice: start, limit and strides per axis."""
    start: tuple
    limit: tuple
    strides: tuple


def _producers(jaxpr: FlatJaxpr) -> dict:
    return {var: eqn for eqn in jaxpr.eqns for var in eqn.outvars}


def _producer(var, producers: dict):
    """The equation that computes `var`, or None (an input, a constant, a literal)."""
    return None if isinstance(var, jex_core.Literal) else producers.get(var)


def _reads_input(var, depends: set) -> bool:
    return not isinstance(var, jex_core.Literal) and var in depends


def _replace(jaxpr: FlatJaxpr, replaced: dict) -> FlatJaxpr:
    """`jaxpr` with the equations in `replaced` (by id) swapped for their replacements."""
    return jaxpr._replace(eqns=[replaced.get(id(eqn), eqn) for eqn in jaxpr.eqns])


def _synthetic(inputs: Sequence, out, eqns: Sequence, **params) -> Equation:
    """A `CONVOLUTION` equation computing `out` from `inputs` by `eqns` (in trace order)."""
    inner = FlatJaxpr([], list(inputs), [out], list(eqns))
    return Equation(CONVOLUTION, list(inputs), [out], {**params, "jaxpr": inner})


def _equations_between(jaxpr: FlatJaxpr, out, inputs: Sequence) -> tuple[list, list]:
    """(the equations computing `out` from `inputs`, in trace order; the other variables they read)."""
    reached = set(inputs)
    for eqn in jaxpr.eqns:
        if any(var in reached for var in eqn.invars if not isinstance(var, jex_core.Literal)):
            reached.update(eqn.outvars)
    needed, eqns, free = {out}, [], []
    for eqn in reversed(jaxpr.eqns):
        if not any(var in needed for var in eqn.outvars):
            continue
        eqns.append(eqn)
        for var in eqn.invars:
            if isinstance(var, jex_core.Literal) or var in inputs:
                continue
            if var in reached:
                needed.add(var)
            elif var not in free:
                free.append(var)
    return eqns[::-1], free


# -- conv_general_dilated -----------------------------------------------------------------

def xla_convolutions(jaxpr: FlatJaxpr, consts: Sequence) -> FlatJaxpr:
    """Every `conv_general_dilated` of the input by a kernel that does not depend on it, as `CONVOLUTION`."""
    depends, replaced = depends_on_input(jaxpr), {}
    for eqn in jaxpr.eqns:
        if (eqn.primitive.name != "conv_general_dilated" or not _reads_input(eqn.invars[0], depends)
                or _reads_input(eqn.invars[1], depends) or eqn.params["batch_group_count"] != 1):
            continue
        p = eqn.params
        lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
        order = tuple(rhs_spec[2:]) + (rhs_spec[1], rhs_spec[0])
        out_shape = eqn.outvars[0].aval.shape
        replaced[id(eqn)] = _synthetic(
            eqn.invars, eqn.outvars[0], [eqn], kernel=lambda rhs, order=order: jnp.transpose(jnp.asarray(rhs), order),
            spatial_axes=tuple(lhs_spec[2:]), strides=tuple(p["window_strides"]),
            padding=tuple(tuple(pad) for pad in p["padding"]), input_dilation=tuple(p["lhs_dilation"]),
            kernel_dilation=tuple(p["rhs_dilation"]), groups=p["feature_group_count"],
            out_extent=tuple(out_shape[a] for a in out_spec[2:]), circular=(False,) * len(lhs_spec[2:]),
            extent=tuple((eqn.invars[1].aval.shape[a] - 1) * d + 1 for a, d in zip(rhs_spec[2:], p["rhs_dilation"])),
            primitive=eqn.primitive.name)
    return _replace(jaxpr, replaced)


# -- im2col ----------------------------------------------------------------------------------

def _as_part_of(var, producers: dict) -> tuple:
    """(the value sliced, the slice) for a slice's output; (the value itself, all of it) otherwise."""
    eqn = _producer(var, producers)
    if eqn is not None and eqn.primitive.name == "slice":
        source = eqn.invars[0]
        strides = eqn.params["strides"] or (1,) * len(source.aval.shape)
        return source, _Part(tuple(eqn.params["start_indices"]), tuple(eqn.params["limit_indices"]), tuple(strides))
    shape = tuple(var.aval.shape)
    return var, _Part((0,) * len(shape), shape, (1,) * len(shape))


def _patches(var, producers: dict, depends: set):
    """(source, parts, axis) when `var` is slices of one value concatenated along `axis`, else None."""
    eqn = _producer(var, producers)
    if eqn is None or eqn.primitive.name != "concatenate" or not all(_reads_input(v, depends) for v in eqn.invars):
        return None
    pieces = [_as_part_of(v, producers) for v in eqn.invars]
    if len({id(source) for source, _ in pieces}) != 1:
        return None
    return pieces[0][0], [part for _, part in pieces], eqn.params["dimension"]


def _im2col_kernel(parts: Sequence[_Part], spatial: tuple, channels: int, w_contract: int, extent: tuple) -> Callable:
    """matrix [k·k·C, D] (contracted on `w_contract`) -> kernel [*extent, C, D], each part's taps at its offset."""
    starts = [tuple(part.start[a] for a in spatial) for part in parts]

    def kernel(w):
        matrix = np.moveaxis(np.asarray(jnp.asarray(w)), w_contract, 0).reshape(len(parts), channels, -1)
        out = np.zeros(extent + matrix.shape[1:], matrix.dtype)
        for start, taps in zip(starts, matrix):
            out[start] += taps
        return jnp.asarray(out)
    return kernel


def im2col_convolutions(jaxpr: FlatJaxpr, consts: Sequence) -> FlatJaxpr:
    """Every dot_general of concatenated shifted slices of one value by a constant matrix, as `CONVOLUTION`."""
    depends, producers, replaced = depends_on_input(jaxpr), _producers(jaxpr), {}
    for eqn in jaxpr.eqns:
        if (eqn.primitive.name != "dot_general" or not _reads_input(eqn.invars[0], depends)
                or _reads_input(eqn.invars[1], depends)):
            continue
        (x_contract, w_contract), (x_batch, _) = eqn.params["dimension_numbers"]
        found = _patches(eqn.invars[0], producers, depends)
        if found is None or x_batch or tuple(x_contract) != (found[2],):
            continue
        source, parts, axis = found
        spec = _im2col_spec(source, parts, axis)
        if spec is None:
            continue
        spatial, strides, extent = spec
        n = len(spatial)
        eqns, _ = _equations_between(jaxpr, eqn.invars[0], [source])
        replaced[id(eqn)] = _synthetic(
            [source, eqn.invars[1]], eqn.outvars[0], [*eqns, eqn],
            kernel=_im2col_kernel(parts, spatial, source.aval.shape[axis], w_contract[0], extent),
            spatial_axes=spatial, strides=strides, padding=((0, 0),) * n, input_dilation=(1,) * n,
            kernel_dilation=(1,) * n, groups=1, out_extent=tuple(eqn.invars[0].aval.shape[a] for a in spatial),
            circular=(False,) * n, extent=extent, primitive=eqn.primitive.name)
    return _replace(jaxpr, replaced)


def _im2col_spec(source, parts: Sequence[_Part], axis: int):
    """(spatial axes, strides, kernel extent) of the convolution the parts make, or None."""
    shape = tuple(source.aval.shape)
    channels = shape[axis]
    if any(p.start[axis] != 0 or p.limit[axis] != channels or p.strides[axis] != 1 for p in parts):
        return None
    spatial = tuple(a for a in range(len(shape)) if a != axis and any(
        p.start[a] != 0 or p.strides[a] != 1 or p.limit[a] != shape[a] for p in parts))
    strides = tuple(parts[0].strides[a] for a in spatial)
    if not spatial or any(tuple(p.strides[a] for a in spatial) != strides for p in parts):
        return None   # copies of one value side by side, or windows at different strides: not a convolution
    return spatial, strides, tuple(max(p.start[a] for p in parts) + 1 for a in spatial)


# -- padding before a convolution ----------------------------------------------------------

def _static_value(var, producers: dict, constants: dict, depth: int = 4):
    """The value of a variable that literals and concrete constants alone determine, else None."""
    if isinstance(var, jex_core.Literal):
        return var.val
    if var in constants:
        return constants[var]
    eqn = _producer(var, producers)
    if eqn is None or depth == 0 or math.prod(var.aval.shape) > 2 ** 20 or len(eqn.outvars) != 1:
        return None
    values = [_static_value(v, producers, constants, depth - 1) for v in eqn.invars]
    if any(v is None for v in values):
        return None
    with jax.ensure_compile_time_eval():   # concrete even while an outer jax.jit traces
        value = evaluate(eqn, values)[0]
    return None if isinstance(value, jax.core.Tracer) else value


def _wrap(var, producers: dict, depends: set):
    """(base, {axis: (low, high)}) when `var` is `base` padded by wrapping (jnp.pad(mode="wrap")), else None."""
    found = _patches(var, producers, depends)
    if found is None:
        return None
    source, parts, axis = found
    n, ndim, shape = source.aval.shape[axis], len(source.aval.shape), tuple(source.aval.shape)

    def covers(part, low, high):
        return (part.start[axis] == low and part.limit[axis] == high and all(s == 1 for s in part.strides)
                and all(part.start[a] == 0 and part.limit[a] == shape[a] for a in range(ndim) if a != axis))

    middle = [i for i, part in enumerate(parts) if covers(part, 0, n)]
    if len(middle) != 1 or len(parts) > 3:
        return None
    before, after = parts[:middle[0]], parts[middle[0] + 1:]
    if len(before) > 1 or len(after) > 1:
        return None
    low = before[0].limit[axis] - before[0].start[axis] if before else 0
    high = after[0].limit[axis] - after[0].start[axis] if after else 0
    if (before and not covers(before[0], n - low, n)) or (after and not covers(after[0], 0, high)) or low + high == 0:
        return None
    inner = _wrap(source, producers, depends)
    base, pads = inner if inner is not None else (source, {})
    return None if axis in pads else (base, {**pads, axis: (low, high)})


def _folded(eqn, producers: dict, depends: set, constants: dict):
    """(new input, params to change) when a zero or wrap padding of the convolution's input can be folded in."""
    p, x = eqn.params, eqn.invars[0]
    if any(d != 1 for d in p["input_dilation"]):
        return None
    pad = _producer(x, producers)
    if pad is not None and pad.primitive.name == "pad" and not _reads_input(pad.invars[1], depends):
        config = [tuple(int(n) for n in c) for c in pad.params["padding_config"]]
        value = _static_value(pad.invars[1], producers, constants)
        if (value is None or not np.all(np.asarray(value) == 0)
                or not all(low >= 0 and high >= 0 and interior == 0 for low, high, interior in config)
                or any(config[a][:2] != (0, 0) for a in range(len(config)) if a not in p["spatial_axes"])):
            return None
        padding = tuple((low + config[a][0], high + config[a][1]) for a, (low, high) in zip(p["spatial_axes"],
                                                                                           p["padding"]))
        return pad.invars[0], {"padding": padding}
    wrapped = _wrap(x, producers, depends)
    if wrapped is None:
        return None
    base, wraps = wrapped
    index = {a: i for i, a in enumerate(p["spatial_axes"])}
    # Output o reads base[(o·Δ + u − low) mod n]: a circular convolution, provided its outputs do not wrap too.
    if all(a in index and p["padding"][index[a]] == (0, 0) and p["extent"][index[a]] <= base.aval.shape[a]
           and (p["out_extent"][index[a]] - 1) * p["strides"][index[a]] < base.aval.shape[a] for a in wraps):
        return base, {"circular": tuple(a in wraps for a in p["spatial_axes"])}
    return None


def padded_convolutions(jaxpr: FlatJaxpr, consts: Sequence) -> FlatJaxpr:
    """Every `CONVOLUTION` of a zero-padded or wrapped value, with the padding folded in."""
    depends, producers, replaced = depends_on_input(jaxpr), _producers(jaxpr), {}
    constants = _concrete_constants(jaxpr, consts)
    for eqn in jaxpr.eqns:
        if eqn.primitive is not CONVOLUTION:
            continue
        folded = _folded(eqn, producers, depends, constants)
        if folded is None:
            continue
        base, changes = folded
        x = eqn.invars[0]
        eqns, free = _equations_between(jaxpr, x, [base])
        inputs = [base, *eqn.invars[1:], *(v for v in free if v not in eqn.invars)]
        params = {k: v for k, v in eqn.params.items() if k != "jaxpr"}
        replaced[id(eqn)] = _synthetic(inputs, eqn.outvars[0], [*eqns, eqn], **{**params, **changes})
    return _replace(jaxpr, replaced)


# -- leaky ReLU and average pooling ------------------------------------------------------------

def _case_slope(case, x, producers: dict, depends: set, constants: dict):
    """A case of jnp.where(x >= 0, ...) as its slope: 1.0 (x), 0.0 (a static 0), a scalar factor's variable
    (c·x), or None (anything else)."""
    if case is x:
        return 1.0
    if not _reads_input(case, depends):
        value = _static_value(case, producers, constants)
        return 0.0 if value is not None and np.all(np.asarray(value) == 0) else None
    eqn = _producer(case, producers)
    if eqn is None or eqn.primitive.name != "mul" or not any(v is x for v in eqn.invars):
        return None
    factor = eqn.invars[1] if eqn.invars[0] is x else eqn.invars[0]
    return factor if not _reads_input(factor, depends) and factor.aval.shape == () else None


def leaky_relus(jaxpr: FlatJaxpr, consts: Sequence) -> FlatJaxpr:
    """Every jnp.where(x >= 0, a·x, b·x) (a, b scalars or a static 0; any comparison of x with a static 0) as one
    `LEAKY_RELU` equation: inputs (x, the non-literal factors), params `slopes`: per case, a slope or the index of
    the input that holds it."""
    depends, producers, replaced = depends_on_input(jaxpr), _producers(jaxpr), {}
    constants = _concrete_constants(jaxpr, consts)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name != "select_n" or len(eqn.invars) != 3 or not _reads_input(eqn.invars[0], depends):
            continue
        test = _producer(eqn.invars[0], producers)
        if test is None or test.primitive.name not in ("ge", "gt", "le", "lt"):
            continue
        traced = [v for v in test.invars if _reads_input(v, depends)]
        others = [v for v in test.invars if not _reads_input(v, depends)]
        zero = _static_value(others[0], producers, constants) if len(traced) == 1 and others else None
        if zero is None or not np.all(np.asarray(zero) == 0):
            continue
        x, inputs, slopes = traced[0], [traced[0]], []
        for case in eqn.invars[1:]:
            slope = _case_slope(case, x, producers, depends, constants)
            if isinstance(slope, jex_core.Literal):
                slope = float(np.max(np.abs(np.asarray(slope.val))))
            elif slope is not None and not isinstance(slope, float):
                inputs.append(slope)
                slope = len(inputs) - 1
            slopes.append(slope)
        if None in slopes:
            continue
        eqns, free = _equations_between(jaxpr, eqn.outvars[0], inputs)
        inputs += [v for v in free if not any(v is u for u in inputs)]
        replaced[id(eqn)] = Equation(LEAKY_RELU, inputs, list(eqn.outvars),
                                     {"slopes": tuple(slopes), "jaxpr": FlatJaxpr([], inputs, list(eqn.outvars), eqns)})
    return _replace(jaxpr, replaced)


def averages(jaxpr: FlatJaxpr, consts: Sequence) -> FlatJaxpr:
    """Every sum (`reduce_sum`, `reduce_window_sum`) scaled by a constant (a mean, an average pool) as one
    `AVERAGE` equation: inputs (x, the constant), its jaxpr the sum and the scaling."""
    depends, producers, replaced = depends_on_input(jaxpr), _producers(jaxpr), {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name not in ("mul", "div"):
            continue
        positions = [i for i, v in enumerate(eqn.invars) if _reads_input(v, depends)]
        if len(positions) != 1 or (eqn.primitive.name == "div" and positions != [0]):
            continue
        pool = _producer(eqn.invars[positions[0]], producers)
        if pool is None or pool.primitive.name not in ("reduce_sum", "reduce_window_sum"):
            continue
        inputs = [pool.invars[0], *(v for v in eqn.invars if v is not pool.outvars[0]
                                    and not isinstance(v, jex_core.Literal))]
        replaced[id(eqn)] = Equation(AVERAGE, inputs, list(eqn.outvars),
                                     {"jaxpr": FlatJaxpr([], inputs, list(eqn.outvars), [pool, eqn])})
    return _replace(jaxpr, replaced)


def _concrete_constants(jaxpr: FlatJaxpr, consts: Sequence) -> dict:
    return {var: value for var, value in zip(jaxpr.constvars, consts) if not isinstance(value, jax.core.Tracer)}


#: The patterns the Lipschitz analysis rewrites, in order.
PATTERNS = (xla_convolutions, im2col_convolutions, padded_convolutions, leaky_relus, averages)
