"""The fast-gradient family: FGSM (L∞), FGM (L2), iterated BIM/PGD, and the smallest step that succeeds.

    from jaxadv.attacks import fgm, fgsm, pgd, minimal_fast_gradient
    one = fgm(logits_fn, images, labels, epsilon=1.0)            # one L2 step of size 1, clipped to the box
    it = pgd(logits_fn, images, labels, epsilon=0.1, norm="linf", steps=20)
    need = minimal_fast_gradient(logits_fn, images, labels, norm="l2")   # per image: the smallest ε that succeeds

The summary's second question: are the paper's blind spots "random discoveries"
in the space of the fast gradient method, i.e. would one step along the loss's
gradient find the same points? These are the one-step methods of Goodfellow et al.
(2015) and their iterated forms (Kurakin et al. 2017, Madry et al. 2018), for any
model given as a pure `logits_fn`, all images at once in one compiled program.

The direction is the gradient g of the cross-entropy of `labels` at x (untargeted:
away from the label): FGM steps ε·g/‖g‖₂, FGSM ε·sign(g); the result is clipped
to [lower, upper], so its L2 can be below ε (pixels at a bound that the gradient
pushes outward do not move). For a linear model with two classes,
g = (p − onehot)ᵀW ∝ w_other − w_label, the normal of the decision boundary: FGM's
direction is then exactly the minimal-L2 perturbation's (while the box does not
bind; `tests/test_fast.py` checks cosine 1 and the closed form (w·x + b)/‖w‖). With
more classes g mixes the classes' normals by their probabilities, and for
nonlinear nets it is only the local slope.

`minimal_fast_gradient` searches, per image, the smallest ε along the fixed
direction at x whose clipped step succeeds: a geometric grid of `grid` values up
to `max_epsilon` (default: the box's diameter, √n·(upper − lower) for L2,
upper − lower for L∞) finds the first success, then `bisections` bisections
between it and the grid point below. Success need not be monotone in ε, so this
is the smallest at the grid's resolution (a ratio of (max/min)^(1/(grid−1))),
refined to the bisection's. The clipped step's L2 and L∞ grow monotonically with ε.

Every output is inside the box by construction, and success (argmax ≠ label) is
recomputed on the returned image. Rows are independent (the gradient of a sum
over the batch), so a result does not depend on the batch position.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import checks
from jaxadv.attacks.sparse import validate

NORMS = ("l2", "linf")


class FastResult(NamedTuple):
    """Per image: the clipped adversarial image, success recomputed on it, ‖x′ − x‖₂ and ‖x′ − x‖∞,
    and epsilon: the step (or budget) used (the searched one for `minimal_fast_gradient`; inf where it failed)."""
    adversarial: jax.Array
    success: jax.Array
    l2: jax.Array
    linf: jax.Array
    epsilon: jax.Array


def _loss_gradient(logits_fn, images, labels):
    """∇_x of the cross-entropy of `labels`, per image (the gradient of the batch's sum)."""
    def total(x):
        logits = logits_fn(x)
        return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0])
    return jax.grad(total)(images)


def _direction(gradient, norm):
    flat = gradient.reshape(gradient.shape[0], -1)
    if norm == "linf":
        return jnp.sign(gradient)
    length = jnp.sqrt(jnp.sum(flat * flat, axis=-1))
    safe = jnp.where(length > 0, length, 1.0)
    return (flat / safe[:, None]).reshape(gradient.shape)


def _per_image(epsilon, images):
    return jnp.broadcast_to(jnp.asarray(epsilon, images.dtype), images.shape[:1]).reshape(
        (-1,) + (1,) * (images.ndim - 1))


def _finish(logits_fn, images, labels, adversarial, epsilon):
    d = (adversarial - images).reshape(images.shape[0], -1)
    return FastResult(adversarial=adversarial, success=jnp.argmax(logits_fn(adversarial), axis=-1) != labels,
                      l2=jnp.sqrt(jnp.sum(d * d, axis=-1)), linf=jnp.max(jnp.abs(d), axis=-1), epsilon=epsilon)


@functools.partial(jax.jit, static_argnames=("norm",))
def fast_gradient_direction_core(logits_fn, images, labels, norm: str = "l2"):
    return _direction(_loss_gradient(logits_fn, images, labels), norm)


@functools.partial(jax.jit, static_argnames=("norm",))
def fgm_core(logits_fn, images, labels, epsilon, lower, upper, norm: str = "l2") -> FastResult:
    direction = _direction(_loss_gradient(logits_fn, images, labels), norm)
    adversarial = jnp.clip(images + _per_image(epsilon, images) * direction, lower, upper)
    return _finish(logits_fn, images, labels, adversarial, jnp.broadcast_to(epsilon, labels.shape).astype(images.dtype))


@functools.partial(jax.jit, static_argnames=("norm", "steps"))
def pgd_core(logits_fn, images, labels, epsilon, step_size, lower, upper, norm: str = "linf",
             steps: int = 10) -> FastResult:
    eps = _per_image(epsilon, images)
    size = _per_image(step_size, images)

    def project(x):
        r = x - images
        if norm == "linf":
            r = jnp.clip(r, -eps, eps)
        else:
            flat = r.reshape(r.shape[0], -1)
            length = jnp.sqrt(jnp.sum(flat * flat, axis=-1)).reshape(eps.shape)
            r = r * jnp.minimum(1.0, eps / jnp.where(length > 0, length, 1.0))
        return jnp.clip(images + r, lower, upper)

    def body(_, state):
        x, done = state
        step = size * _direction(_loss_gradient(logits_fn, x, labels), norm)
        moved = project(x + step)
        done_now = jnp.argmax(logits_fn(moved), axis=-1) != labels
        keep = done.reshape(eps.shape)
        return jnp.where(keep, x, moved), done | done_now

    x, _ = jax.lax.fori_loop(0, steps, body, (images, jnp.zeros(labels.shape, bool)))
    return _finish(logits_fn, images, labels, x, jnp.broadcast_to(epsilon, labels.shape).astype(images.dtype))


@jax.jit
def success_along_direction_core(logits_fn, images, labels, direction, epsilons, lower, upper):
    """[E, N]: does clip(x + ε·direction) leave the label, for each ε of `epsilons` ([E]) and image."""
    def at(eps):
        x = jnp.clip(images + eps * direction, lower, upper)
        return jnp.argmax(logits_fn(x), axis=-1) != labels

    return jax.lax.map(at, jnp.asarray(epsilons, images.dtype))


@functools.partial(jax.jit, static_argnames=("norm", "grid", "bisections"))
def minimal_fast_gradient_core(logits_fn, images, labels, lower, upper, max_epsilon, norm: str = "l2",
                               grid: int = 32, bisections: int = 20, min_ratio: float = 1e-3) -> FastResult:
    direction = _direction(_loss_gradient(logits_fn, images, labels), norm)
    dtype = images.dtype
    grid_eps = (max_epsilon * jnp.geomspace(min_ratio, 1.0, grid)).astype(dtype)              # [G]
    hits = success_along_direction_core(logits_fn, images, labels, direction, grid_eps, lower, upper)  # [G, N]
    found = jnp.any(hits, axis=0)
    first = jnp.argmax(hits, axis=0)                                                         # first success
    hi = grid_eps[first]
    lo = jnp.where(first > 0, grid_eps[jnp.maximum(first - 1, 0)], 0.0).astype(dtype)

    def at(eps):
        x = jnp.clip(images + _per_image(eps, images) * direction, lower, upper)
        return x, jnp.argmax(logits_fn(x), axis=-1) != labels

    def bisect(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        _, ok = at(mid)
        return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, bisections, bisect, (lo, hi))
    adversarial, _ = at(jnp.where(found, hi, max_epsilon))
    result = _finish(logits_fn, images, labels, adversarial, jnp.where(found, hi, jnp.inf).astype(dtype))
    return result


# -- public entry points (checked in NumPy before anything is compiled) --------------------------

def fast_gradient_direction(logits_fn: Callable, images, labels, *, norm: str = "l2", lower=0.0, upper=1.0,
                            params=None):
    """The unit-L2 (norm 'l2') or sign (norm 'linf') direction of the cross-entropy's gradient at each image.

    logits_fn, params: the model: a pure function [B, *shape] -> [B, classes], or with `params` a flax module
    (params: its variables) or a function apply(params, x) (`jaxadv.functional.logits_function`).
    """
    checks.one_of(norm, NORMS, "norm")
    logits_fn, images, labels, _, _ = validate(logits_fn, images, labels, lower, upper, num_values=2,
                                               images_per_pass=1, params=params)
    return fast_gradient_direction_core(logits_fn, images, labels, norm=norm)


def success_along_direction(logits_fn: Callable, images, labels, direction, epsilons, lower=0.0, upper=1.0, *,
                            params=None) -> jax.Array:
    """[E, N]: does clip(x + ε·direction) leave the label, for each ε of `epsilons` ([E], each >= 0) and image.

    direction: [B, *shape] like images (e.g. `fast_gradient_direction`'s). The model as for `fgm`.
    """
    logits_fn, images, labels, lower, upper = validate(logits_fn, images, labels, lower, upper, num_values=2,
                                                       images_per_pass=1, params=params)
    direction = checks.images(direction, "direction")
    if direction.shape != images.shape:
        raise ValueError(f"direction: expected the images' shape {images.shape}, got {direction.shape}")
    if np.ndim(epsilons) != 1:
        raise ValueError(f"epsilons: expected shape [E], got {np.shape(epsilons)}")
    epsilons = checks.positive_finite(epsilons, images.dtype, "epsilons", shape=np.shape(epsilons), allow_zero=True)
    return success_along_direction_core(logits_fn, images, labels, jnp.asarray(direction, images.dtype),
                                        jnp.asarray(epsilons, images.dtype), lower, upper)


def fgm(logits_fn: Callable, images, labels, epsilon, *, norm: str = "l2", lower=0.0, upper=1.0,
        params=None) -> FastResult:
    """One fast-gradient step of size epsilon (scalar or [B]) away from `labels`, clipped to the box.

    norm 'l2' is FGM (ε·g/‖g‖₂), 'linf' is FGSM (ε·sign(g)). logits_fn, params: the model, as for
    `fast_gradient_direction`.
    """
    checks.one_of(norm, NORMS, "norm")
    logits_fn, images, labels, lower, upper = validate(logits_fn, images, labels, lower, upper, num_values=2,
                                                       images_per_pass=1, params=params)
    return fgm_core(logits_fn, images, labels, _check_epsilon(epsilon, images, "epsilon"), lower, upper, norm=norm)


def fgsm(logits_fn: Callable, images, labels, epsilon, *, lower=0.0, upper=1.0, params=None) -> FastResult:
    """FGSM (Goodfellow et al. 2015): one L∞ step ε·sign(g), clipped to the box (the model as for `fgm`)."""
    return fgm(logits_fn, images, labels, epsilon, norm="linf", lower=lower, upper=upper, params=params)


def pgd(logits_fn: Callable, images, labels, epsilon, *, norm: str = "linf", steps: int = 10, step_size=None,
        lower=0.0, upper=1.0, params=None) -> FastResult:
    """BIM / PGD without random start: `steps` fast-gradient steps, each projected onto the ε-ball and the box.

    step_size: default 2.5·ε/steps (Madry et al.'s ratio). An image stops once it is
    adversarial (the first successful iterate is kept, not pushed deeper). The model as for `fgm`.
    """
    checks.one_of(norm, NORMS, "norm")
    checks.int_at_least(steps, "steps", 1)
    logits_fn, images, labels, lower, upper = validate(logits_fn, images, labels, lower, upper, num_values=2,
                                                       images_per_pass=1, params=params)
    eps = _check_epsilon(epsilon, images, "epsilon")
    size = 2.5 * eps / steps if step_size is None else _check_epsilon(step_size, images, "step_size")
    return pgd_core(logits_fn, images, labels, eps, size, lower, upper, norm=norm, steps=steps)


def minimal_fast_gradient(logits_fn: Callable, images, labels, *, norm: str = "l2", max_epsilon=None,
                          grid: int = 32, bisections: int = 20, lower=0.0, upper=1.0, params=None) -> FastResult:
    """Per image, the smallest ε whose one fast-gradient step (FGM for 'l2', FGSM for 'linf') succeeds.

    Returns the image at that ε (epsilon = inf and success False where even
    max_epsilon fails). Cost: one gradient and grid + bisections forward passes per image.
    The model as for `fgm`.
    """
    checks.one_of(norm, NORMS, "norm")
    checks.int_at_least(grid, "grid", 2)
    checks.int_at_least(bisections, "bisections", 0)
    logits_fn, images, labels, lower_a, upper_a = validate(logits_fn, images, labels, lower, upper, num_values=2,
                                                           images_per_pass=1, params=params)
    if max_epsilon is None:
        n = math.prod(images.shape[1:])
        max_epsilon = (upper - lower) * (math.sqrt(n) if norm == "l2" else 1.0)
    else:
        checks.positive_finite(max_epsilon, images.dtype, "max_epsilon")
    return minimal_fast_gradient_core(logits_fn, images, labels, lower_a, upper_a,
                                      jnp.asarray(max_epsilon, images.dtype), norm=norm, grid=grid,
                                      bisections=bisections)


def _check_epsilon(epsilon, images, name):
    """A step or budget: finite and >= 0 in the images' dtype, a scalar or one per image."""
    e = checks.positive_finite(epsilon, images.dtype, name, shape=images.shape[:1], allow_zero=True)
    return e if checks.is_traced(e) else jnp.asarray(e, images.dtype)
