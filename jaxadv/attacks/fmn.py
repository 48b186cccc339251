"""Fast Minimum-Norm attack (FMN, Pintor et al. 2021), L2, on the lane loop.

    from jaxadv.attacks import fmn
    result = fmn(model, images, labels, params=variables, steps=1000)

Each step takes the gradient g of the logit difference max_{j≠label} Z_j −
Z_label at x + δ (towards a target when targeted), adapts the radius ε (after
an adversarial point: min(ε(1 − γ), best norm); before the first one:
‖δ‖ + |margin|/‖g‖, the linear estimate of the distance to the boundary, plus
twice the rounding slack that `is_adversarial` asks for, so the linear boundary is crossed; after
it: ε(1 + γ)), steps δ by α·g/‖g‖, and projects x + δ onto the intersection of
the ε-ball around x and the box. α and γ are cosine-annealed (α from
`alpha_init` to a hundredth of it, γ from 0.05 to 0.001).

The projection is the exact one, onto the ball and the box at once:
clip(x + t·(y − x)) with the largest t ∈ [0, 1] whose norm is within ε, found
by bisection (the clipped norm grows with t). adv_lib's FMN instead scales δ
to the norm ε and clips to the box afterwards, which leaves the iterate far
inside the ball wherever the box binds (dark pixels of Fashion-MNIST), so its
radius never reaches the boundary on many images.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxadv.attacks.common import (Best, Image, MinNormResult, finish, image_logits, is_adversarial, lane_inputs,
                                     margin, norm, rounding_slack, validate)
from jaxadv.attacks.lanes import LaneAttack, run_lanes

#: Bisection steps of the projection onto the ball and the box before its closed-form last step.
PROJECTION_STEPS = 12


class FMNState(NamedTuple):
    """One lane's FMN: the perturbation, the radius ε it is projected onto, the best so far."""
    image: Image
    delta: jax.Array     # [n]
    epsilon: jax.Array   # the radius (inf before the first step)
    worst: jax.Array     # the norm of the farthest point of the box
    found: jax.Array     # an adversarial point was seen
    best: Best
    step: jax.Array


def project_ball_and_box(origin, y, epsilon, lower, upper):
    """The Euclidean projection of y onto {z : ‖z − origin‖ ≤ ε, lower ≤ z ≤ upper}, origin in the box.

    By the KKT conditions the projection is clip(origin + t(y − origin)) for some t ∈ [0, 1]: the largest
    t whose clipped norm is at most ε. Bisection brackets t; inside the last bracket the coordinates clipped
    at its top are held at their bounds and t is solved in closed form (never outside the ball).
    """
    direction = y - origin
    clipped_at = lambda t: jnp.clip(origin + t * direction, lower, upper)

    def bisect(_, bracket):
        low, high = bracket
        middle = (low + high) / 2
        inside = norm(clipped_at(middle) - origin) <= epsilon
        return jnp.where(inside, middle, low), jnp.where(inside, high, middle)
    one = jnp.ones((), y.dtype)
    low, high = jax.lax.fori_loop(0, PROJECTION_STEPS, bisect, (0 * one, one))
    top = origin + high * direction
    held = (top < lower) | (top > upper)
    fixed = jnp.sum(jnp.where(held, jnp.square(clipped_at(high) - origin), 0))
    free = jnp.sum(jnp.where(held, 0, direction * direction))
    t = jnp.clip(jnp.sqrt(jnp.maximum(epsilon ** 2 - fixed, 0) / jnp.where(free > 0, free, 1)), low, high)
    t = jnp.where(norm(clipped_at(one) - origin) <= epsilon, one, t)
    return clipped_at(t)


def fmn_lanes(logits_one, *, steps: int, alpha_init: float, gamma_init: float, gamma_final: float,
              targeted: bool) -> LaneAttack:
    """FMN (L2) as pure per-image functions (see the module docstring); logits_one: flat image -> logits."""
    alpha_final = alpha_init / 100

    def init(image: Image) -> FMNState:
        dtype = image.origin.dtype
        worst = norm(jnp.maximum(image.origin - image.lower, image.upper - image.origin))
        return FMNState(image, jnp.zeros_like(image.origin), jnp.asarray(jnp.inf, dtype), worst,
                        jnp.asarray(False), Best.start(image.origin), jnp.asarray(0, jnp.int32))

    def step(s: FMNState) -> FMNState:
        image, dtype = s.image, s.delta.dtype
        cosine = (1 + jnp.cos(math.pi * s.step.astype(dtype) / steps)) / 2
        alpha = alpha_final + (alpha_init - alpha_final) * cosine
        gamma = gamma_final + (gamma_init - gamma_final) * cosine
        x, length = image.origin + s.delta, norm(s.delta)
        # 1. the margin (positive while not adversarial) and the gradient of its negative
        logits, pullback = jax.vjp(logits_one, x)
        value, cotangent = jax.value_and_grad(lambda z: -margin(z, image.label, targeted))(logits)
        (gradient,) = pullback(cotangent)
        adversarial = is_adversarial(logits, image.label, targeted)
        best = s.best.update(x, length, adversarial)
        found = s.found | adversarial
        # 2. the radius
        slope = jnp.maximum(norm(gradient), 1e-12)
        epsilon = jnp.where(adversarial, jnp.minimum(s.epsilon * (1 - gamma), best.l2),
                            jnp.where(s.found, s.epsilon * (1 + gamma),
                                      length + (jnp.abs(value) + 2 * rounding_slack(logits)) / slope))
        epsilon = jnp.minimum(epsilon, s.worst)
        # 3. a normalised ascent step, projected onto the ball and the box
        moved = x + alpha * gradient / slope
        delta = project_ball_and_box(image.origin, moved, epsilon, image.lower, image.upper) - image.origin
        return FMNState(image, delta, epsilon.astype(dtype), s.worst, found, best, s.step + 1)

    def done(s: FMNState):
        return s.step >= steps

    return LaneAttack(init, step, done)


@functools.partial(jax.jit, static_argnames=("steps", "alpha_init", "gamma_init", "gamma_final", "lanes", "targeted"))
def fmn_core(logits_fn, images, labels, lower, upper, *, steps=1000, alpha_init=1.0, gamma_init=0.05,
             gamma_final=0.001, lanes=32, targeted=False) -> MinNormResult:
    """The compiled FMN on validated arrays (lower/upper shaped as images); see `fmn`."""
    attack = fmn_lanes(image_logits(logits_fn, images.shape[1:]), steps=steps, alpha_init=alpha_init,
                       gamma_init=gamma_init, gamma_final=gamma_final, targeted=targeted)
    final = run_lanes(attack, lane_inputs(images, labels, lower, upper), lanes)
    return finish(logits_fn, images, labels, final.best, final.step, lanes, targeted)


def fmn(model, images, labels, *, params=None, steps: int = 1000, alpha_init: float = 1.0, gamma_init: float = 0.05,
        gamma_final: float = 0.001, lower=0.0, upper=1.0, lanes: int = 32, targeted: bool = False) -> MinNormResult:
    """Smallest-L2 adversarial images by FMN; the best point of `steps` steps per image.

    model, params: any model (`jaxadv.functional.logits_function`). images:
      [B, ...] floating, inside [lower, upper]; labels: [B] the true classes
      (targeted: the targets). steps: gradients per image; alpha_init: the
      first step's length; gamma_init, gamma_final: the radius's rate of
      change at the first and the last step. lower, upper: the box,
      broadcastable to images. lanes: images stepped together.
    """
    if not (alpha_init > 0 and 0 < gamma_final <= gamma_init < 1):
        raise ValueError(f"alpha_init must be > 0 and 0 < gamma_final <= gamma_init < 1; got {alpha_init}, "
                         f"{gamma_init}, {gamma_final}")
    logits_fn, images, labels, lower, upper = validate(model, images, labels, lower, upper, params,
                                                       counts={"steps": (steps, 1)}, lanes=lanes)
    return fmn_core(logits_fn, images, labels, lower, upper, steps=steps, alpha_init=float(alpha_init),
                    gamma_init=float(gamma_init), gamma_final=float(gamma_final), lanes=lanes,
                    targeted=bool(targeted))
