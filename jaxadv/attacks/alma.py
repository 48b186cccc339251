"""Augmented Lagrangian Method for Adversarial attacks (ALMA, Rony et al. 2021), L2, on the lane loop.

    from jaxadv.attacks import alma
    result = alma(model, images, labels, params=variables)          # adv_lib's defaults, 1000 steps

ALMA minimises ‖δ‖₂ subject to the constraint d(x + δ) ≤ 0, where d is the
difference of logits ratio (Z_label − max_{j≠label} Z_j + κ)/(Z_(1) − Z_(3))
(κ = logit_tolerance, Z_(k) the k-th largest logit; negative once the label
is beaten), by gradient steps on the augmented Lagrangian ‖δ‖₂ + P2(d; ρ, μ).
The multiplier μ follows the penalty's derivative at d by an exponential
moving average (weight 1 − α), and the penalty ρ grows by γ every
`check_steps` steps in which d improved by less than the factor τ before any
success. Steps are RMSProp with momentum (both α), with a learning rate that
decays exponentially by `lr_reduction` from the first success to the last
step, clipped to the box. The defaults are adv_lib's (`alma`,
`penalty=P2`, `distance='l2'`), and so is the order of its updates.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxadv.attacks.common import (Best, Image, MinNormResult, finish, image_logits, is_adversarial, lane_inputs,
                                     norm, validate)
from jaxadv.attacks.lanes import LaneAttack, run_lanes


class ALMAConfig(NamedTuple):
    """adv_lib's defaults for L2 (static: a new config compiles a new program)."""
    steps: int = 1000
    lr_init: float = 0.1
    lr_reduction: float = 0.01
    mu_init: float = 1.0
    rho_init: float = 1.0
    check_steps: int = 10
    tau: float = 0.95
    gamma: float = 1.2
    alpha: float = 0.9
    logit_tolerance: float = 1e-4


class ALMAState(NamedTuple):
    """One lane's ALMA: the perturbation, RMSProp's averages, the multiplier μ and penalty ρ, the best so far."""
    image: Image
    delta: jax.Array        # [n]
    square_avg: jax.Array   # [n] RMSProp's average of g²
    momentum: jax.Array     # [n]
    mu: jax.Array
    rho: jax.Array
    previous: jax.Array     # d at the last check
    found_at: jax.Array     # the step of the first success (steps + 1 before)
    best: Best
    step: jax.Array


def penalty_p2(y, rho, mu):
    """The P2 penalty-Lagrangian: μy + μρy² + ρ²y³/6 for y ≥ 0, μy/(1 − ρy) below."""
    return jnp.where(y >= 0, mu * y + mu * rho * y ** 2 + rho ** 2 * y ** 3 / 6,
                     mu * y / (1 - rho * jnp.minimum(y, 0)))


def logits_ratio(logits, label, targeted: bool, tolerance):
    """The difference of logits ratio d (positive while not adversarial), adv_lib's form."""
    own = logits[label]
    other = jnp.max(jnp.where(jnp.arange(logits.shape[-1]) == label, -jnp.inf, logits))
    top = jax.lax.top_k(logits, 4)[0] if targeted else jax.lax.top_k(logits, 3)[0]
    scale = top[0] - (top[2] + top[3]) / 2 if targeted else top[0] - top[2]
    ratio = (own - other + tolerance) / (scale + 1e-8)
    return -ratio if targeted else ratio


def alma_lanes(logits_one, config: ALMAConfig, targeted: bool) -> LaneAttack:
    """ALMA as pure per-image functions (see the module docstring); logits_one: flat image -> logits."""
    c = config

    def init(image: Image) -> ALMAState:
        dtype = image.origin.dtype
        scalar = lambda v: jnp.asarray(v, dtype)
        return ALMAState(image, jnp.zeros_like(image.origin), jnp.ones_like(image.origin), jnp.zeros_like(image.origin),
                         scalar(c.mu_init), scalar(c.rho_init), scalar(0), jnp.asarray(c.steps + 1, jnp.int32),
                         Best.start(image.origin), jnp.asarray(0, jnp.int32))

    def step(s: ALMAState) -> ALMAState:
        image, i, dtype = s.image, s.step, s.delta.dtype
        x = image.origin + s.delta
        # 1. the model at x, the constraint d and its gradient in the logits
        logits, pullback = jax.vjp(logits_one, x)
        d, d_logits = jax.value_and_grad(logits_ratio)(logits, image.label, targeted, c.logit_tolerance)
        # 2. ρ grows where d stalled (every check_steps steps, before any success); μ follows P2'(d)
        check = (i > 0) & ((i + 1) % c.check_steps == 0)
        stalled = (s.found_at > c.steps) & ~(d < c.tau * s.previous)
        rho = jnp.where(check & stalled, c.gamma * s.rho, s.rho)
        previous = jnp.where((i == 0) | check, d, s.previous)
        slope = jax.grad(penalty_p2)(d, rho, s.mu)
        mu = jnp.where(i > 0, jnp.clip(s.mu + (1 - c.alpha) * (slope - s.mu), 1e-6, 1e12), s.mu)
        # 3. the best point, and the step of the first success
        adversarial = d < 0
        found_at = jnp.where(adversarial & (s.found_at > c.steps), i, s.found_at)
        best = s.best.update(x, norm(s.delta), adversarial & is_adversarial(logits, image.label, targeted))
        # 4. the Lagrangian's gradient (the distance's term from the second step on, as adv_lib)
        (gradient,) = pullback(jax.grad(penalty_p2)(d, rho, mu) * d_logits)
        gradient = gradient + jnp.where(i > 0, 1, 0) * jax.grad(norm)(s.delta)
        # 5. RMSProp with momentum, its rate decayed from the first success; then the box
        decay = c.lr_reduction ** (jnp.maximum(i - found_at, 0).astype(dtype) / (c.steps - found_at).astype(dtype))
        square_avg = c.alpha * s.square_avg + (1 - c.alpha) * gradient * gradient
        momentum = c.alpha * s.momentum + gradient / (jnp.sqrt(square_avg) + 1e-8)
        delta = s.delta - c.lr_init * decay * momentum
        delta = jnp.clip(image.origin + delta, image.lower, image.upper) - image.origin
        return ALMAState(image, delta, square_avg, momentum, mu.astype(dtype), rho.astype(dtype),
                         previous.astype(dtype), found_at, best, i + 1)

    def done(s: ALMAState):
        return s.step >= c.steps

    return LaneAttack(init, step, done)


@functools.partial(jax.jit, static_argnames=("config", "lanes", "targeted"))
def alma_core(logits_fn, images, labels, lower, upper, *, config=ALMAConfig(), lanes=32,
              targeted=False) -> MinNormResult:
    """The compiled ALMA on validated arrays (lower/upper shaped as images); see `alma`."""
    attack = alma_lanes(image_logits(logits_fn, images.shape[1:]), config, targeted)
    final = run_lanes(attack, lane_inputs(images, labels, lower, upper), lanes)
    return finish(logits_fn, images, labels, final.best, final.step, lanes, targeted)


def alma(model, images, labels, *, params=None, config: ALMAConfig = ALMAConfig(), steps: int | None = None,
         lower=0.0, upper=1.0, lanes: int = 32, targeted: bool = False) -> MinNormResult:
    """Smallest-L2 adversarial images by ALMA; the best point of `config.steps` steps per image.

    model, params: any model (`jaxadv.functional.logits_function`). images:
      [B, ...] floating, inside [lower, upper]; labels: [B] the true classes
      (targeted: the targets). config: `ALMAConfig`; steps: overrides
      config.steps (gradients per image). lower, upper: the box,
      broadcastable to images. lanes: images stepped together.
    """
    if not isinstance(config, ALMAConfig):
        raise TypeError(f"config: expected an ALMAConfig, got {type(config).__name__}")
    config = config if steps is None else config._replace(steps=steps)
    if not (0 < config.lr_reduction <= 1 and config.lr_init > 0 and 0 <= config.alpha < 1 and config.gamma >= 1
            and config.mu_init > 0 and config.rho_init > 0):
        raise ValueError(f"config: need lr_init > 0, lr_reduction in (0, 1], alpha in [0, 1), gamma >= 1, "
                         f"mu_init and rho_init > 0; got {config}")
    logits_fn, images, labels, lower, upper = validate(
        model, images, labels, lower, upper, params, counts={"steps": (config.steps, 1),
                                                             "config.check_steps": (config.check_steps, 1)},
        lanes=lanes)
    return alma_core(logits_fn, images, labels, lower, upper, config=config, lanes=lanes, targeted=bool(targeted))
