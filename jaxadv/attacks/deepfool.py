"""DeepFool (Moosavi-Dezfooli et al. 2016) and SuperDeepFool (Abdollahi et al. 2024), L2, untargeted, on the lane loop.

    from jaxadv.attacks import deepfool, superdeepfool
    df = deepfool(model, images, labels, params=variables)
    sdf = superdeepfool(model, images, labels, params=variables)

**DeepFool** linearises every logit difference f_k = Z_k − Z_label at x (one
Jacobian: K gradients) and steps to the nearest linearised boundary,
x ← clip(x + (1 + overshoot)(|f_l|/‖w_l‖ + 10⁻⁴) w_l/‖w_l‖) with
l = argmin_k |f_k|/‖w_k‖, w_k = ∇f_k, until the label changes. On a binary
linear model without a box its first step is the exact minimum (times
1 + overshoot).

**SuperDeepFool** alternates DeepFool with a step that DeepFool lacks: at
the point x̃ where a DeepFool run from x crossed, with w the unit normal of
the boundary there (the gradient of Z_found − Z_label), it moves to
x ← clip(x + ((x̃ − x₀)·w) w), adding the component of x̃ − x₀ along the
normal (as the authors' code and adv_lib do), and runs DeepFool again from
there; it stops when such a point is itself adversarial (or after
`projections` of them). Each candidate (the smallest adversarial point seen,
and the last point) is then shrunk towards the image by `search_steps`
bisections on the segment from the image (forward passes only), and the
smaller adversarial one is returned.

Lanes end when their images do, so these are the attacks the lane loop's
refill serves: an image that needs two Jacobians never waits for one that needs twenty.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxadv.attacks.common import (Best, Image, MinNormResult, finish, image_logits, in_blocks, is_adversarial,
                                     lane_inputs, norm, validate)
from jaxadv.attacks.lanes import LaneAttack, run_lanes


class DeepFoolState(NamedTuple):
    """One lane's DeepFool or SuperDeepFool: the point, where its run began, the projections made, the best."""
    image: Image
    x: jax.Array            # [n] the current point
    anchor: jax.Array       # [n] where the current DeepFool run started
    projected: jax.Array    # x is a SuperDeepFool projection (not yet evaluated)
    projections: jax.Array
    steps: jax.Array        # Jacobians evaluated
    finished: jax.Array
    best: Best


def deepfool_lanes(logits_one, *, max_steps: int, overshoot: float, projections: int) -> LaneAttack:
    """DeepFool (projections = 0) or SuperDeepFool as pure per-image functions; logits_one: flat image -> logits."""
    def init(image: Image) -> DeepFoolState:
        zero = jnp.asarray(0, jnp.int32)
        return DeepFoolState(image, image.origin, image.origin, jnp.asarray(False), zero, zero, jnp.asarray(False),
                             Best.start(image.origin))

    def deepfool_step(x, logits, jacobian, label, image):
        differences = logits - logits[label]
        normals = jacobian - jacobian[label]
        lengths = jnp.maximum(jnp.sqrt(jnp.sum(normals * normals, -1)), 1e-6)
        distances = jnp.where(jnp.arange(logits.shape[-1]) == label, jnp.inf, jnp.abs(differences) / lengths + 1e-4)
        nearest = jnp.argmin(distances)
        moved = x + (1 + overshoot) * distances[nearest] * normals[nearest] / lengths[nearest]
        return jnp.clip(moved, image.lower, image.upper)

    def project(anchor, x, jacobian, found, label, image):
        normal = jacobian[found] - jacobian[label]
        normal = normal / jnp.maximum(norm(normal), 1e-6)
        return jnp.clip(anchor + jnp.dot(x - image.origin, normal) * normal, image.lower, image.upper)

    def step(s: DeepFoolState) -> DeepFoolState:
        image = s.image
        # 1. the logits and their Jacobian at x (K gradients)
        logits, pullback = jax.vjp(logits_one, s.x)
        (jacobian,) = jax.vmap(pullback)(jnp.eye(logits.shape[-1], dtype=logits.dtype))
        found = jnp.argmax(logits)
        adversarial = is_adversarial(logits, image.label, False)
        best = s.best.update(s.x, norm(s.x - image.origin), adversarial)
        # 2. not adversarial: a DeepFool step; adversarial: SuperDeepFool projects (once per crossing)
        project_now = adversarial & ~s.projected & (s.projections < projections)
        x = jnp.where(adversarial, project(s.anchor, s.x, jacobian, found, image.label, image),
                      deepfool_step(s.x, logits, jacobian, image.label, image))
        steps = s.steps + 1
        finished = (adversarial & ~project_now) | (steps >= max_steps)
        x = jnp.where(finished, s.x, x)
        return DeepFoolState(image, x, jnp.where(project_now, x, s.anchor), project_now,
                             s.projections + project_now, steps,
                             finished, best)

    def done(s: DeepFoolState):
        return s.finished

    return LaneAttack(init, step, done)


def shrink_towards_origin(logits_fn, images, adversarial, labels, search_steps: int, lanes: int):
    """Per image, the point of the segment image → adversarial nearest the image that is still
    adversarial at the bisection's resolution (2^-search_steps of the segment); forward passes only."""
    def one_block(x, adv, y):
        def bisect(_, bracket):
            low, high = bracket
            middle = (low + high) / 2
            point = x + middle.reshape((-1,) + (1,) * (x.ndim - 1)) * (adv - x)
            crossed = jax.vmap(functools.partial(is_adversarial, targeted=False))(logits_fn(point), y)
            return jnp.where(crossed, low, middle), jnp.where(crossed, middle, high)
        ones = jnp.ones(x.shape[:1], x.dtype)
        _, high = jax.lax.fori_loop(0, search_steps, bisect, (0 * ones, ones))
        return x + high.reshape((-1,) + (1,) * (x.ndim - 1)) * (adv - x)
    return in_blocks(one_block, (images, adversarial, labels), lanes)


def _shrink_candidates(logits_fn, images, labels, candidates, search_steps: int, lanes: int) -> Best:
    """Each candidate [N, n] shrunk towards the image; per image the smallest adversarial one (or the image)."""
    origins = images.reshape(images.shape[0], -1)
    best = Best(origins, jnp.full(images.shape[:1], jnp.inf, images.dtype))
    for candidate in candidates:
        shrunk = shrink_towards_origin(logits_fn, images, candidate.reshape(images.shape), labels, search_steps, lanes)
        adversarial = in_blocks(lambda x, y: jax.vmap(functools.partial(is_adversarial, targeted=False))(
            logits_fn(x), y), (shrunk, labels), lanes)
        shrunk = shrunk.reshape(origins.shape)
        best = jax.vmap(Best.update)(best, shrunk, jnp.sqrt(jnp.sum(jnp.square(shrunk - origins), -1)), adversarial)
    return best


@functools.partial(jax.jit, static_argnames=("max_steps", "overshoot", "projections", "search_steps", "lanes"))
def deepfool_core(logits_fn, images, labels, lower, upper, *, max_steps=50, overshoot=0.02, projections=0,
                  search_steps=0, lanes=32) -> MinNormResult:
    """The compiled DeepFool / SuperDeepFool on validated arrays (lower/upper shaped as images)."""
    attack = deepfool_lanes(image_logits(logits_fn, images.shape[1:]), max_steps=max_steps, overshoot=overshoot,
                            projections=projections)
    final = run_lanes(attack, lane_inputs(images, labels, lower, upper), lanes)
    best = final.best
    if search_steps:
        best = _shrink_candidates(logits_fn, images, labels, (best.x, final.x), search_steps, lanes)
    classes = jax.eval_shape(logits_fn, images[:1]).shape[-1]
    return finish(logits_fn, images, labels, best, final.steps * classes, lanes, targeted=False)


def deepfool(model, images, labels, *, params=None, max_steps: int = 50, overshoot: float = 0.02,
             search_steps: int = 0, lower=0.0, upper=1.0, lanes: int = 32) -> MinNormResult:
    """Untargeted L2 DeepFool: steps to the nearest linearised boundary until the label changes.

    model, params: any model (`jaxadv.functional.logits_function`). images:
      [B, ...] floating, inside [lower, upper]; labels: [B] the true classes.
      max_steps: Jacobians per image at most; overshoot: each step's excess
      (0.02, the paper's); search_steps: bisections towards the image at the
      end (0: the paper's DeepFool). lower, upper: the box, broadcastable to
      images. lanes: images stepped together.
    """
    if not overshoot >= 0:
        raise ValueError(f"overshoot: must be >= 0, got {overshoot}")
    logits_fn, images, labels, lower, upper = validate(
        model, images, labels, lower, upper, params, lanes=lanes,
        counts={"max_steps": (max_steps, 1), "search_steps": (search_steps, 0)})
    return deepfool_core(logits_fn, images, labels, lower, upper, max_steps=max_steps, overshoot=float(overshoot),
                         search_steps=search_steps, lanes=lanes)


def superdeepfool(model, images, labels, *, params=None, projections: int = 100, max_steps: int = 200,
                  overshoot: float = 0.02, search_steps: int = 10, lower=0.0, upper=1.0,
                  lanes: int = 32) -> MinNormResult:
    """Untargeted L2 SuperDeepFool: DeepFool alternated with projections onto the boundary's normal.

    model, params: any model (`jaxadv.functional.logits_function`). images:
      [B, ...] floating, inside [lower, upper]; labels: [B] the true classes.
      projections: projections per image at most (adv_lib's `steps`);
      max_steps: Jacobians per image at most (DeepFool steps and
      projections together); overshoot: DeepFool's; search_steps: the final
      bisections towards the image (adv_lib's `search_iter`). lower, upper:
      the box, broadcastable to images. lanes: images stepped together.
    """
    if not overshoot >= 0:
        raise ValueError(f"overshoot: must be >= 0, got {overshoot}")
    logits_fn, images, labels, lower, upper = validate(
        model, images, labels, lower, upper, params, lanes=lanes,
        counts={"projections": (projections, 0), "max_steps": (max_steps, 1), "search_steps": (search_steps, 0)})
    return deepfool_core(logits_fn, images, labels, lower, upper, max_steps=max_steps, overshoot=float(overshoot),
                         projections=projections, search_steps=search_steps, lanes=lanes)
