"""What the minimal-norm attacks (DDN, ALMA, FMN, DeepFool, SuperDeepFool) share.

The result type, the checks every public wrapper runs before any work, one
image's problem and its best point as NamedTuples for the lane states, the
margin that is positive while the image is not adversarial, and the closing
step that recomputes success on the returned points.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv.attacks.lbfgs import (_as_traceable, _bound_arg, _check_bound, _check_images, _check_targets,
                                  _num_classes)
from jaxadv.attacks.sparse import _check_int
from jaxadv.functional import logits_function


class MinNormResult(NamedTuple):
    """Per image (leading axis = batch): the attack's result.

    adversarial: the best (smallest-L2) adversarial point seen, inside the box,
      in the images' dtype; the image itself where none was found.
    success: argmax of the model at `adversarial` differs from the label
      (targeted: equals the target), recomputed on the returned point.
    l2: ‖adversarial − image‖₂ (0 where the attack failed).
    gradients: model gradient evaluations spent on the image (a Jacobian of K
      classes counts K).
    """
    adversarial: jax.Array
    success: jax.Array
    l2: jax.Array
    gradients: jax.Array


class Image(NamedTuple):
    """One image's problem, flat: origin [n], label (or target), lower/upper [n]."""
    origin: jax.Array
    label: jax.Array
    lower: jax.Array
    upper: jax.Array


class Best(NamedTuple):
    """The smallest adversarial point seen so far (x = origin, l2 = inf until one is found)."""
    x: jax.Array
    l2: jax.Array

    @classmethod
    def start(cls, origin):
        return cls(origin, jnp.asarray(jnp.inf, origin.dtype))

    def update(self, x, l2, adversarial):
        better = adversarial & (l2 < self.l2)
        return Best(jnp.where(better, x, self.x), jnp.where(better, l2, self.l2))


def margin(logits, label, targeted: bool):
    """Z_label − max_{j≠label} Z_j (targeted: max_{j≠t} Z_j − Z_t): positive while not adversarial."""
    own = logits[label]
    other = jnp.max(jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits))
    return other - own if targeted else own - other


def is_adversarial(logits, label, targeted: bool):
    """The label beaten (targeted: the target on top) by more than rounding: margin < −256 ε·max(1, max|Z|).

    Points on the boundary itself flip with the batch's rounding; a point kept as adversarial must stay
    adversarial when the model is evaluated again in another batch (the cost in L2 is ~1e-5 relative).
    """
    return margin(logits, label, targeted) < -rounding_slack(logits)


def rounding_slack(logits):
    """The margin `is_adversarial` asks for: 256 ε·max(1, max|Z|) in the logits' dtype."""
    return 256 * jnp.finfo(logits.dtype).eps * jnp.maximum(1.0, jnp.max(jnp.abs(logits)))


def image_logits(logits_fn, shape):
    """The model on one flat image: [n] -> [classes]."""
    return lambda x: logits_fn(x.reshape((1,) + tuple(shape)))[0]


def norm(v):
    """‖v‖₂ with a zero gradient at 0 (no NaN)."""
    squared = jnp.sum(v * v)
    safe = jnp.where(squared > 0, squared, 1.0)
    return jnp.where(squared > 0, jnp.sqrt(safe), 0.0)


def lane_inputs(images, labels, lower, upper):
    """The per-image inputs of the lane loop, flat: Image with a leading [N] axis."""
    n = images.shape[0]
    flat = lambda a: jnp.broadcast_to(a, images.shape).reshape(n, -1)
    return Image(flat(images), labels.astype(jnp.int32), flat(lower), flat(upper))


def in_blocks(fn, arrays, block: int):
    """fn over `block` rows at a time (lax.map), padded with copies of row 0: shapes independent of N."""
    n = jax.tree.leaves(arrays)[0].shape[0]
    blocks = -(-n // block)
    pad = lambda a: jnp.concatenate([a, jnp.broadcast_to(a[:1], (blocks * block - n,) + a.shape[1:])]).reshape(
        (blocks, block) + a.shape[1:])
    out = jax.lax.map(lambda xs: fn(*xs), tuple(pad(a) for a in arrays))
    return jax.tree.map(lambda a: a.reshape((blocks * block,) + a.shape[2:])[:n], out)


def finish(logits_fn, images, labels, best: Best, gradients, lanes: int, targeted: bool) -> MinNormResult:
    """The result from each image's best point: success and L2 recomputed on the returned image."""
    adversarial = best.x.reshape(images.shape).astype(images.dtype)

    def check(x, y):
        predicted = jnp.argmax(logits_fn(x), -1)
        return predicted == y if targeted else predicted != y
    success = in_blocks(check, (adversarial, labels), lanes)
    l2 = jnp.sqrt(jnp.sum(jnp.square(adversarial - images).reshape(images.shape[0], -1), -1))
    return MinNormResult(adversarial, success, l2, gradients.astype(jnp.int32))


def validate(model, images, labels, lower, upper, params, *, counts: dict, lanes):
    """The checks of every public wrapper, before any work: returns traceable, typed arguments.

    model/params: as `jaxadv.functional.logits_function`. images: [B, ...]
    floating, inside [lower, upper]; labels: [B] ints in [0, classes);
    lower, upper: broadcastable to images; counts: {name: (value, minimum)}
    ints to check (steps and the like); lanes: an int >= 1.
    """
    logits_fn = logits_function(model, params, argument="model")
    images_t = _check_images(images, "images")
    _check_targets(labels, images_t.shape[0], "labels")
    for name, (value, minimum) in {**counts, "lanes": (lanes, 1)}.items():
        _check_int(value, name, minimum)
    lower_a, upper_a = _check_bound(lower, images_t, "lower"), _check_bound(upper, images_t, "upper")
    if not any(isinstance(a, jax.core.Tracer) for a in (images, labels, lower, upper)):
        x, lo, up = np.asarray(images), np.asarray(lower_a), np.asarray(upper_a)
        if not np.all(np.isfinite(x)):
            raise ValueError("images: contains NaN or infinite values")
        if np.any(np.isnan(lo)) or np.any(np.isnan(up)) or np.any(lo > up):
            raise ValueError("lower, upper: need lower <= upper everywhere (and no NaN)")
        if np.any(x < lo) or np.any(x > up):
            raise ValueError(f"images: values must lie in [lower, upper]; got range [{x.min()}, {x.max()}]")
        classes = _num_classes(logits_fn, images_t)
        y = np.asarray(labels)
        if np.any(y < 0) or np.any(y >= classes):
            raise ValueError(f"labels: must be in [0, {classes}) for this model; got range [{y.min()}, {y.max()}]")
    dtype = images_t.dtype
    lower_b = jnp.broadcast_to(_bound_arg(lower_a, images_t.shape, dtype, np.inf), images_t.shape)
    upper_b = jnp.broadcast_to(_bound_arg(upper_a, images_t.shape, dtype, -np.inf), images_t.shape)
    return (_as_traceable(logits_fn), jnp.asarray(images, dtype), jnp.asarray(labels, jnp.int32), lower_b, upper_b)
