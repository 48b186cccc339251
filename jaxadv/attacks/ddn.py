"""Decoupled Direction and Norm (DDN, Rony et al. 2019), L2, on the lane loop.

    from jaxadv.attacks import ddn
    result = ddn(model, images, labels, params=variables, steps=1000)
    print(result.success.mean(), jnp.median(result.l2[result.success]))

Each step takes the gradient g of the cross-entropy at x + δ (ascent away from
the label, descent towards a target), moves δ by α·g/‖g‖ (α cosine-annealed
from 1 to 0.01), then sets the norm of δ to ε, which shrinks by the factor
1 − γ after a step that is adversarial and grows by 1 + γ after one that is
not (never above the farthest point of the box), and clips x + δ to the box.
Decoupling the norm from the direction is what makes each step cheap: one
gradient, no line search. As in adv_lib's implementation, but without its
optional quantisation (`levels`), and a zero gradient leaves the direction
as it was (instead of a random one), so that a result is a function of the input.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxadv.attacks.common import (Best, Image, MinNormResult, finish, image_logits, is_adversarial, lane_inputs,
                                     norm, validate)
from jaxadv.attacks.lanes import LaneAttack, run_lanes


class DDNState(NamedTuple):
    """One lane's DDN: the perturbation, the norm of its next step, the best so far."""
    image: Image
    delta: jax.Array      # [n] the current perturbation
    epsilon: jax.Array    # the norm the next step is set to
    worst: jax.Array      # the norm of the farthest point of the box
    best: Best
    step: jax.Array       # steps taken (= gradients)


def ddn_lanes(logits_one, *, steps: int, gamma: float, init_norm: float, targeted: bool) -> LaneAttack:
    """DDN as pure per-image functions (see the module docstring); logits_one: flat image -> logits."""
    def init(image: Image) -> DDNState:
        dtype = image.origin.dtype
        worst = norm(jnp.maximum(image.origin - image.lower, image.upper - image.origin))
        return DDNState(image, jnp.zeros_like(image.origin), jnp.asarray(init_norm, dtype), worst,
                        Best.start(image.origin), jnp.asarray(0, jnp.int32))

    def cross_entropy(logits, label):
        return jax.nn.logsumexp(logits) - logits[label]

    def step(state: DDNState) -> DDNState:
        image, dtype = state.image, state.delta.dtype
        x = image.origin + state.delta
        # 1. the model and the loss's gradient at x (one forward, one backward pass)
        logits, pullback = jax.vjp(logits_one, x)
        cotangent = jax.grad(cross_entropy)(logits, image.label)
        (gradient,) = pullback(-cotangent if targeted else cotangent)
        adversarial = is_adversarial(logits, image.label, targeted)
        best = state.best.update(x, norm(state.delta), adversarial)
        # 2. the direction: a normalised gradient step, cosine-annealed
        alpha = 0.01 + 0.99 * (1 + jnp.cos(math.pi * state.step.astype(dtype) / steps)) / 2
        length = norm(gradient)
        delta = state.delta + alpha * gradient / jnp.where(length > 1e-12, length, jnp.inf)
        # 3. the norm: shrink after an adversarial point, grow otherwise; then the box
        epsilon = jnp.minimum(jnp.where(adversarial, 1 - gamma, 1 + gamma) * state.epsilon, state.worst)
        length = norm(delta)
        delta = delta * jnp.where(length > 0, epsilon / jnp.where(length > 0, length, 1), 0)
        delta = jnp.clip(image.origin + delta, image.lower, image.upper) - image.origin
        return DDNState(image, delta, epsilon.astype(dtype), state.worst, best, state.step + 1)

    def done(state: DDNState):
        return state.step >= steps

    return LaneAttack(init, step, done)


@functools.partial(jax.jit, static_argnames=("steps", "gamma", "init_norm", "lanes", "targeted"))
def ddn_core(logits_fn, images, labels, lower, upper, *, steps=1000, gamma=0.05, init_norm=1.0, lanes=32,
             targeted=False) -> MinNormResult:
    """The compiled DDN on validated arrays (lower/upper shaped as images); see `ddn`."""
    attack = ddn_lanes(image_logits(logits_fn, images.shape[1:]), steps=steps, gamma=gamma, init_norm=init_norm,
                       targeted=targeted)
    final = run_lanes(attack, lane_inputs(images, labels, lower, upper), lanes)
    return finish(logits_fn, images, labels, final.best, final.step, lanes, targeted)


def ddn(model, images, labels, *, params=None, steps: int = 1000, gamma: float = 0.05, init_norm: float = 1.0,
        lower=0.0, upper=1.0, lanes: int = 32, targeted: bool = False) -> MinNormResult:
    """Smallest-L2 adversarial images by DDN; the best point of `steps` steps per image.

    model, params: any model (`jaxadv.functional.logits_function`). images:
      [B, ...] floating, inside [lower, upper]; labels: [B] the true classes
      (targeted: the targets). steps: gradients per image; gamma: the norm's
      rate of change per step; init_norm: the first step's norm.
    lower, upper: the box, broadcastable to images. lanes: images stepped
      together (the work queue of `jaxadv.attacks.lanes`).
    """
    if not (0 < gamma < 1) or not init_norm > 0:
        raise ValueError(f"gamma: must be in (0, 1) and init_norm > 0; got {gamma}, {init_norm}")
    logits_fn, images, labels, lower, upper = validate(model, images, labels, lower, upper, params,
                                                       counts={"steps": (steps, 1)}, lanes=lanes)
    return ddn_core(logits_fn, images, labels, lower, upper, steps=steps, gamma=float(gamma),
                    init_norm=float(init_norm), lanes=lanes, targeted=bool(targeted))
