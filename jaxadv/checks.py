"""Input checks for every public entry of jaxadv: one module, run before any work, in the dtype the work uses.

    logits_fn, classes = checks.model(model, params, images)      # the call, its parameters, its classes
    x = checks.images(images)                                     # cast to the work dtype, then checked
    y = checks.labels(labels, x.shape[0], classes)
    lower = checks.bound(0.7, x, "lower", "lower")                # rounded inward in the work dtype
    checks.finite_logits(logits_fn, x)                            # one forward pass: NaN, inf, probabilities

Every failure is a ValueError or TypeError whose message starts with the argument's name and says the fix.
NumPy's float64 images under jax's default (x64 off) are worked on in float32, so they are cast first and
checked after the cast; a bound is rounded inward, so every value inside it as rounded lies inside it as
given. Inside jit (traced inputs) only the static checks (shapes, dtypes) run.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.functional import check_logits_call, logits_function

SIDES = ("lower", "upper")
_NORMALISED = ("if your model normalises its inputs, put the normalisation inside the model and pass images "
               "in [lower, upper]")
_PASS_CHUNK = 1024   # images per forward pass of `finite_logits`


def is_traced(*values) -> bool:
    """Whether any of `values` (or their leaves) is a jax tracer: then only static checks can run."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(values))


def work_dtype(images) -> np.dtype:
    """The floating dtype the work on `images` runs in: theirs, as jax holds it (float64 is float32 with x64 off)."""
    dtype = np.dtype(images.dtype)
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"images: expected a floating dtype, got {dtype}")
    return np.dtype(jax.dtypes.canonicalize_dtype(dtype))


def images(x, name: str = "images"):
    """`x` [batch, ...] as an array of its work dtype, checked after the cast (finite, not empty).

    A traced `x` is returned as it is, checked for shape and dtype only.
    """
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        x = np.asarray(x)
    if not np.issubdtype(np.dtype(x.dtype), np.floating):
        raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name}: expected shape [batch, ...] with at least one feature axis, got {x.shape} "
                         "(for one image, add a batch axis: images[None])")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    if math.prod(x.shape[1:]) == 0:
        raise ValueError(f"{name}: images have no values (shape {x.shape})")
    if is_traced(x):
        return x
    dtype = work_dtype(x)
    with np.errstate(over="ignore"):
        cast = np.asarray(x).astype(dtype)
    bad = ~np.isfinite(cast)
    if np.any(bad):
        where = "" if np.all(np.isfinite(np.asarray(x))) else " as given"
        raise ValueError(f"{name}: {int(bad.sum())} values are NaN or infinite{where or f' in {dtype.name}'}")
    return cast


def in_range(given, x, lower, upper, box, name: str = "images"):
    """`x` (`given` cast to the work dtype) checked: `given` inside `box` = (lower, upper) as the caller wrote it;
    returned held inside `lower`, `upper` (the box rounded inward), which the cast can miss by an ulp."""
    if is_traced(given, x, lower, upper):
        return x
    original = np.asarray(given)
    if np.any(original < np.asarray(box[0])) or np.any(original > np.asarray(box[1])):
        raise ValueError(f"{name}: values must lie in [lower, upper]; got range [{original.min()}, "
                         f"{original.max()}] ({_NORMALISED})")
    return np.clip(x, np.asarray(lower), np.asarray(upper)).astype(x.dtype)


def bound(b, images, name: str, side: str):
    """`b` (scalar or broadcastable to `images`) in the images' work dtype, rounded inward (`side`: 'lower'
    rounds up, 'upper' rounds down), so a value inside the rounded bound lies inside `b` as given."""
    if side not in SIDES:
        raise ValueError(f"side: expected one of {SIDES}, got {side!r}")
    traced = is_traced(b)
    arr = b if traced else np.asarray(b)
    if not traced and (arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating)
                                                  or np.issubdtype(arr.dtype, np.integer))):
        raise TypeError(f"{name}: expected a real number or array, got dtype {arr.dtype}")
    try:
        shape = np.broadcast_shapes(arr.shape, images.shape)
    except ValueError:
        shape = None
    if shape != tuple(images.shape) or len(arr.shape) > len(images.shape):
        raise ValueError(f"{name}: shape {arr.shape} does not broadcast to images' shape {tuple(images.shape)}")
    dtype = work_dtype(images)
    if traced:
        return b.astype(dtype)
    if np.any(np.isnan(arr)):
        raise ValueError(f"{name}: contains NaN")
    return round_inward(arr, dtype, side)


def round_inward(value, dtype, side: str) -> np.ndarray:
    """`value` in `dtype`, rounded up ('lower') or down ('upper') where the nearest value lies outside; a
    subnormal result that a flush to zero would move outside becomes the smallest normal number."""
    exact = np.asarray(value)
    with np.errstate(over="ignore"):
        cast = exact.astype(dtype)
    outside = (cast < exact) if side == "lower" else (cast > exact)
    toward = np.asarray(np.inf if side == "lower" else -np.inf, dtype)
    rounded = np.where(outside, np.nextafter(cast, toward), cast).astype(dtype)
    # XLA on CPU flushes subnormals to zero: a lower bound in (0, tiny) would act as 0, below itself.
    tiny = np.finfo(dtype).tiny
    if side == "lower":
        return np.where((rounded > 0) & (rounded < tiny), tiny, rounded).astype(dtype)
    return np.where((rounded < 0) & (rounded > -tiny), -tiny, rounded).astype(dtype)


def box(lower, upper, images, *, scalar: bool = False, strict: bool = False):
    """(lower, upper) rounded inward in the images' work dtype, checked: lower <= upper (`strict`: <) and,
    with `scalar`, finite real numbers. An empty box in the work dtype is named."""
    if scalar:
        for name, value in (("lower", lower), ("upper", upper)):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
            if not np.isfinite(value):
                raise ValueError(f"{name}: must be finite, got {value}")
    lo, up = bound(lower, images, "lower", "lower"), bound(upper, images, "upper", "upper")
    if is_traced(lo, up):
        return lo, up
    given = np.asarray(lower) < np.asarray(upper) if strict else np.asarray(lower) <= np.asarray(upper)
    if not np.all(given):
        raise ValueError(f"lower, upper: lower must be below {'' if strict else 'or equal to '}upper everywhere, got "
                         f"lower={lower!r}, upper={upper!r}")
    rounded = lo < up if strict else lo <= up
    if not np.all(rounded):
        raise ValueError(f"lower, upper: no {np.dtype(lo.dtype).name} value (the images' work dtype) lies "
                         f"inside [{lower}, {upper}]: widen the box or pass images of a wider dtype")
    return lo, up


def labels(y, batch: int | None, num_classes: int | None, name: str = "labels"):
    """`y` as int32 [batch] in [0, num_classes) (batch or num_classes None: not checked)."""
    if not hasattr(y, "shape") or not hasattr(y, "dtype"):
        y = np.asarray(y)
    if not np.issubdtype(np.dtype(y.dtype), np.integer) or np.dtype(y.dtype) == bool:
        raise TypeError(f"{name}: expected an integer dtype, got {y.dtype}")
    if y.ndim != 1 or (batch is not None and y.shape[0] != batch):
        expected = f"({batch},)" if batch is not None else "[batch]"
        raise ValueError(f"{name}: expected shape {expected} (one per image), got {tuple(y.shape)}")
    if num_classes is not None and int(num_classes) < 2:
        raise ValueError(f"num_classes: must be >= 2, got {num_classes}")
    if is_traced(y):
        return y.astype(jnp.int32)
    arr = np.asarray(y)
    if num_classes is not None and arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        raise ValueError(f"{name}: must be in [0, {num_classes}) for this model; got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int32)


def positive_finite(value, dtype, name: str, *, shape=None, allow_zero: bool = False):
    """`value` (a scalar, or of `shape`) as `dtype`: real, finite and > 0 (>= 0 with allow_zero) after the cast
    (1e39 is inf in float32, 1e-50 is 0)."""
    if is_traced(value):
        return value
    arr = np.asarray(value)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    if arr.shape != () and arr.shape != tuple(shape or ()):
        raise ValueError(f"{name}: expected a scalar{f' or shape {tuple(shape)}' if shape else ''}, got {arr.shape}")
    dtype = np.dtype(jax.dtypes.canonicalize_dtype(dtype))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        cast = arr.astype(dtype)
    ok = (lambda a: a >= 0) if allow_zero else (lambda a: a > 0)
    if not np.all(np.isfinite(arr) & ok(arr) & np.isfinite(cast) & ok(cast)):
        raise ValueError(f"{name}: must be finite and {'>=' if allow_zero else '>'} 0 in {dtype.name} (the work "
                         f"dtype), got {value!r}")
    return cast


def int_at_least(value, name: str, minimum: int) -> int:
    """`value` as an int >= minimum (bool refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def one_of(value, choices, name: str):
    """`value`, which must be one of `choices`."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def path(value, name: str = "directory"):
    """`value` as a str path (a str or os.PathLike)."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a path, got {type(value).__name__}")
    return os.fspath(value)


def pytree(tree, name: str) -> None:
    """Refuse leaves jit cannot trace (a string, an object), naming the leaf's path and the fix."""
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(leaf, (jax.Array, np.ndarray, np.generic, int, float, complex, bool)):
            continue
        raise TypeError(f"{name}{jax.tree_util.keystr(key_path)}: a leaf of type {type(leaf).__name__} "
                        f"({leaf!r:.40}) cannot be traced by jit; close over it or mark it static, e.g. with "
                        "functools.partial(apply, act=...), and keep only arrays in the parameters")


def model(model_, params=None, images_=None, *, name: str = "logits_fn", images_name: str = "images"):
    """(logits_fn, num_classes): `model_` as `functional.logits_function` makes it, its parameters checked for
    untraceable leaves and its call on images' example shape checked (num_classes None without images_)."""
    if params is not None:
        pytree(params, "params")
    logits_fn = logits_function(model_, params, argument=name)
    if params is None:     # a Partial's arrays: named by argument, as the Partial's own paths are flat indices
        for index, argument in enumerate(logits_fn.args):
            pytree(argument, f"{name} (its Partial's argument {index})")
        for key, argument in logits_fn.keywords.items():
            pytree(argument, f"{name} (its Partial's keyword {key})")
    if images_ is None:
        return logits_fn, None
    shape, dtype = tuple(images_.shape), work_dtype(images_)
    try:
        classes = check_logits_call(logits_fn, shape[1:], dtype, argument=name)
    except TypeError as error:
        if _takes_batch_of(logits_fn, shape, dtype):
            raise ValueError(f"{images_name}: shape {shape} is one image without a batch axis: add a batch axis: "
                             "images[None]") from error
        raise
    return logits_fn, classes


def batch_mismatch(logits_fn, images_, labels_, name: str) -> None:
    """Name a labels/targets shape that does not match images, with the batch-axis fix when images is one image."""
    count = np.shape(labels_)
    if len(count) == 1 and count[0] == images_.shape[0]:
        return
    raise ValueError(f"{name}: expected shape ({images_.shape[0]},) (one per image), got {count}"
                     f"{batch_axis_hint(logits_fn, images_)}")


def batch_axis_hint(logits_fn, images_) -> str:
    """'; add a batch axis: images[None]' when `logits_fn` takes `images_` as one image, else ''."""
    if _takes_batch_of(logits_fn, tuple(images_.shape), work_dtype(images_)):
        return "; images looks like one image without a batch axis: add a batch axis: images[None]"
    return ""


def _takes_batch_of(logits_fn, shape, dtype) -> bool:
    """Whether `logits_fn` maps a batch of images of `shape` to [batch, classes]."""
    try:
        out = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((2,) + tuple(shape), dtype))
    except Exception:   # noqa: BLE001 - any failure means no
        return False
    return getattr(out, "shape", (None,))[:1] == (2,) and len(out.shape) == 2


def finite_logits(logits_fn, images_, name: str = "logits_fn") -> None:
    """One forward pass at entry: logits must be finite and not softmax probabilities (rows >= 0 summing to 1).

    An attack reads NaN logits as a success and a softmax's saturated outputs as flat, so either is refused
    here rather than reported as a result.
    """
    if is_traced(images_):
        return
    x = np.asarray(images_)
    count = x.shape[0]
    size = min(count, _PASS_CHUNK)
    bad, probabilities = 0, 0
    for start in range(0, count, size):
        chunk = x[start:start + size]
        valid = chunk.shape[0]
        if valid < size:    # pad with copies of the first image: one compiled shape for every chunk
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - valid, axis=0)])
        nonfinite, simplex = _logit_rows(logits_fn, jnp.asarray(chunk))
        bad += int(np.sum(np.asarray(nonfinite)[:valid]))
        probabilities += int(np.sum(np.asarray(simplex)[:valid]))
    if bad:
        raise ValueError(f"{name}: returned NaN or infinite logits for {bad} of {count} images; an attack would "
                         "read them as a success. Check the model and its parameters")
    if probabilities == count:
        raise ValueError(f"{name}: its outputs look like softmax probabilities (every row >= 0 and summing to 1); "
                         "pass the logits (the model without its final softmax)")


@jax.jit
def _logit_rows(logits_fn, x):
    """Per row: any non-finite logit; all logits >= 0 and summing to 1 (within the dtype's rounding)."""
    z = logits_fn(x)
    z = z.reshape(z.shape[0], -1)
    tolerance = max(1e-3, 10 * float(jnp.finfo(z.dtype).eps) * z.shape[1])
    simplex = jnp.all(z >= 0, axis=-1) & (jnp.abs(jnp.sum(z, axis=-1) - 1) <= tolerance) & (z.shape[1] > 1)
    return ~jnp.all(jnp.isfinite(z), axis=-1), simplex


class AttackInputs(NamedTuple):
    """An attack's checked inputs: the model as a traceable function, arrays in the work dtype, the box
    rounded inward, and the model's class count."""
    logits_fn: jax.tree_util.Partial
    images: object
    labels: object
    lower: object
    upper: object
    num_classes: int


def attack_inputs(model_, images_, labels_, lower, upper, *, params=None, model_name: str = "logits_fn",
                  labels_name: str = "labels", scalar_bounds: bool = False, logits: bool = True) -> AttackInputs:
    """Every check an attack's entry needs, in order: images (cast, finite), the model (parameters, call,
    classes), labels (dtype, shape, range), the box (rounded inward), images inside it, and, with `logits`,
    one forward pass for finite logits that are not probabilities."""
    x = images(images_)
    logits_fn, classes = model(model_, params, x, name=model_name)
    batch_mismatch(logits_fn, x, labels_, labels_name)
    y = labels(labels_, x.shape[0], classes, labels_name)
    lo, up = box(lower, upper, x, scalar=scalar_bounds, strict=scalar_bounds)
    x = in_range(images_, x, lo, up, (lower, upper))
    if logits:
        finite_logits(logits_fn, x, model_name)
    return AttackInputs(logits_fn, x, y, lo, up, classes)
