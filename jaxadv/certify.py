"""Certified L2 radii: the blind spot bounded from below, by linear bound propagation (CROWN).

    radii = certified_radius(module, images, labels, params=variables)   # [B]
    # No x' in [lower, upper] with ‖x' − x‖₂ ≤ radii[i] changes the label of image i.

An attack bounds the minimal adversarial distance from above; this bounds it
from below, image by image, so that the attained minimum lies in
[certified, attained]. The function is traced once from its jaxpr
(`jaxadv.linear_bounds`); for each image a search on ε runs CROWN on the set
{x′ : ‖x′ − x‖₂ ≤ ε, lower ≤ x′ ≤ upper}, bounding every margin z_y − z_j from
below with the specification folded into the last layer.

Each linear bound a·x′ + b is minimised over the set by Lagrangian duality:
for any λ ≥ 0, Σ_i min_{l_i ≤ x′_i ≤ u_i} [a_i x′_i + λ (x′_i − x_i)²] − λε² + b is
a lower bound (weak duality); at λ = ‖a‖/(2ε) it is at least the ball's own
bound a·x − ε‖a‖ + b (the minimum over the box is at least that over all of
space), so the box can only tighten it. A bisection on λ below that one
(`minimum_over_set`) and λ = 0 (the box alone) tighten it further; hidden
units' bounds take λ₀ and 0 alone unless `exact_hidden`.

The search keeps a certified ε and a failed one per image: a failed CROWN
pass at ε still certifies min(ε, min_j (a_j·x + b_j)/‖a_j‖) from its own linear
bounds, which are valid on every smaller ball; the next ε lies between them.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import checks
from jaxadv.linear_bounds import RULES, build_graph, crown

__all__ = ["certified_radius", "margin_lower_bounds", "sandwich_summary", "RULES"]

_DUAL_STEPS = 12


def certified_radius(model, images, labels=None, *, params=None, lower=0.0, upper=1.0, steps: int = 20,
                     max_radius: float | None = None, chunk_size: int = 16,
                     max_rows: int = 512, exact_hidden: bool = False) -> jax.Array:
    """Per image, an ε within which no input in [lower, upper] changes the label, proved by CROWN.

    Args:
      model: a flax module (params: its variables), a function apply(params, x), or a pure function
        of a batch [B, *image_shape] -> logits [B, K] (`jaxadv.functional.logits_function`).
      images: [B, *image_shape], inside [lower, upper].
      labels: [B] the labels to keep (default: the predictions). A misclassified image gets 0.
      lower, upper: the box (scalars or arrays broadcasting to an image).
      steps: CROWN passes per image in the search on ε.
      max_radius: where the search starts from above; default the box's diameter, beyond which every
        ball contains the box (required when the box is unbounded).
      chunk_size: images certified at a time (memory; and XLA:CPU, in jax 0.10.2, miscomputed the dual's
        bound on [48, 800, 784] coefficients batched at once, tests/test_certify.py keeps that in check).
      max_rows: units of a layer bounded in one backward pass (memory; the result does not depend on it).
      exact_hidden: bound each hidden unit over the ball ∩ box by the dual's search, as the margins are,
        rather than by the better of the ball's and the box's bounds: a few percent larger radii, at
        about four times the cost.
    Returns:
      [B] radii in the images' dtype: sound lower bounds of the minimal adversarial L2 distance.
    """
    fn, images, labels, lower, upper = _check(model, params, images, labels, lower, upper)
    _check_count("steps", steps)
    _check_count("chunk_size", chunk_size)
    _check_count("max_rows", max_rows)
    if max_radius is None:
        max_radius = float(jnp.linalg.norm(jnp.broadcast_to(upper - lower, images.shape[1:])))
        if not math.isfinite(max_radius):
            raise ValueError("max_radius is required when the box [lower, upper] is unbounded")
    elif not (isinstance(max_radius, (int, float, np.floating)) and 0 < max_radius < math.inf):
        raise ValueError(f"max_radius must be a positive finite number, got {max_radius!r}")
    return _certify(fn, images, labels, lower, upper, jnp.asarray(max_radius, images.dtype), int(steps),
                    int(chunk_size), int(max_rows), bool(exact_hidden))


def margin_lower_bounds(model, images, eps, labels=None, *, params=None, lower=0.0, upper=1.0,
                        max_rows: int = 512, exact_hidden: bool = False, chunk_size: int = 16) -> jax.Array:
    """[B, K] CROWN's lower bounds of z_y − z_j over {‖x′ − x‖₂ ≤ eps} ∩ [lower, upper] (+inf at j = y).

    The bound at one ε that `certified_radius` searches over; eps a scalar or [B]. With lower = −inf and
    upper = +inf the set is the ball alone, as in auto_LiRPA's L2 perturbation. max_rows, exact_hidden,
    chunk_size: as for `certified_radius`.
    """
    fn, images, labels, lower, upper = _check(model, params, images, labels, lower, upper)
    eps = jnp.broadcast_to(jnp.asarray(eps, images.dtype), images.shape[:1])
    if not bool(jnp.all(eps >= 0)):
        raise ValueError("eps must be >= 0")
    _check_count("max_rows", max_rows)
    _check_count("chunk_size", chunk_size)
    return _margins(fn, images, labels, lower, upper, eps, int(max_rows), bool(exact_hidden), int(chunk_size))


def _check_count(name: str, value) -> None:
    checks.int_at_least(value, name, 1)


def sandwich_summary(certified, attained, success=None) -> dict:
    """Median and 90th percentile of attained / certified over the images an attack moved (and certified > 0).

    The minimal adversarial distance lies in [certified, attained]: a ratio of 1 pins it down, 3 leaves
    it anywhere down to a third of the attack's. `violations` counts certified > attained (a bug in one).
    """
    certified, attained = np.asarray(certified, np.float64), np.asarray(attained, np.float64)
    if certified.shape != attained.shape or certified.ndim != 1:
        raise ValueError(f"certified and attained must be vectors of one length, got {certified.shape} and "
                         f"{attained.shape}")
    moved = np.ones(certified.shape, bool) if success is None else np.asarray(success, bool)
    ok = moved & (certified > 0)
    ratio = attained[ok] / certified[ok]
    return {"images": int(ok.sum()), "median_certified_l2": float(np.median(certified)) if len(certified) else None,
            "ratio_median": float(np.median(ratio)) if ok.any() else None,
            "ratio_p90": float(np.percentile(ratio, 90)) if ok.any() else None,
            "violations": int(np.sum(moved & (certified > attained)))}


def _check(model, params, images, labels, lower, upper):
    """The model as a traceable function and the arrays in the work dtype, checked (`jaxadv.checks`)."""
    x = checks.images(images)
    fn, classes = checks.model(model, params, x, name="model")
    lo, up = checks.box(lower, upper, x, strict=True)
    for name, bound in (("lower", lo), ("upper", up)):
        if np.broadcast_shapes(np.shape(bound), x.shape[1:]) != x.shape[1:]:
            raise ValueError(f"{name}: shape {np.shape(bound)} must broadcast to one image {x.shape[1:]}")
    x = checks.in_range(images, x, lo, up, (lower, upper))
    if labels is not None:
        checks.batch_mismatch(fn, x, labels, "labels")
        labels = checks.labels(labels, x.shape[0], classes)
    checks.finite_logits(fn, x, "model")
    x = jnp.asarray(x)
    if labels is None:
        labels = _predict(fn, x)
    lo, up = jnp.asarray(lo, x.dtype), jnp.asarray(up, x.dtype)
    return fn, x, jnp.asarray(labels, jnp.int32), lo, up


# -- the minimum of a linear function over the ball ∩ box -------------------------------------

def minimum_over_set(coefficients, offsets, center, eps, lower, upper, steps: int = _DUAL_STEPS):
    """Lower bounds of min coefficients[s] · x + offsets[s] over {‖x − center‖ ≤ eps} ∩ [lower, upper].

    coefficients [S, n], offsets [S], center/lower/upper [n]. The dual function g(λ) (module docstring) is
    concave, with g′(λ) = ‖x(λ) − center‖² − eps²: a bisection on log λ over [λ₀ 2^−30, λ₀], λ₀ = ‖a‖/(2 eps),
    keeps the best value it meets, each one a sound bound, as is λ = 0 (the box alone). steps = 0: λ₀ and 0 only.
    """
    tiny = jnp.finfo(center.dtype).tiny
    norms = jnp.linalg.norm(coefficients, axis=1)
    box = jnp.where(coefficients > 0, coefficients * lower, jnp.where(coefficients < 0, coefficients * upper, 0))
    best = offsets + box.sum(axis=1)

    def dual(log_lam):
        lam = jnp.maximum(jnp.exp(log_lam), tiny)[:, None]
        x = jnp.clip(center - coefficients / (2 * lam), lower, upper)
        distance = ((x - center) ** 2).sum(axis=1) - eps ** 2
        return offsets + (coefficients * x).sum(axis=1) + lam[:, 0] * distance, distance

    def halve(_, state):
        low, high, best = state
        middle = (low + high) / 2
        value, distance = dual(middle)
        return jnp.where(distance > 0, middle, low), jnp.where(distance > 0, high, middle), jnp.maximum(best, value)

    high = jnp.log(jnp.maximum(norms / (2 * jnp.maximum(eps, tiny)), tiny))
    best = jnp.maximum(best, dual(high)[0])        # λ₀: at least the ball's bound a·x − eps‖a‖ + b
    return jax.lax.fori_loop(0, steps, halve, (high - 30 * math.log(2), high, best))[2]


# -- per image ------------------------------------------------------------------------------

@jax.jit
def _predict(fn, images):
    return jnp.argmax(fn(images), axis=-1)


def _spec(label, classes: int, dtype):
    """Rows e_y − e_j, one per class j ([K, 1, K]; the row j = y is zero and ignored)."""
    return (jax.nn.one_hot(label, classes, dtype=dtype)[None] - jnp.eye(classes, dtype=dtype))[:, None]


def _image_bounds(graph, image, label, eps, lower, upper, max_rows: int, exact_hidden: bool):
    """(coefficients [K, n], offsets [K], set minimum [K]) of the margins on the ball of radius eps ∩ box."""
    x = image[None]
    lower, upper = jnp.broadcast_to(lower, x.shape), jnp.broadcast_to(upper, x.shape)
    flat = lambda a: a.reshape(-1)
    minimum = lambda c, o, steps=_DUAL_STEPS: minimum_over_set(c, o, flat(x), eps, flat(lower), flat(upper), steps)
    input_bounds = lambda: (jnp.maximum(lower, x - eps), jnp.minimum(upper, x + eps))
    classes = graph.nodes[graph.output].shape[-1]
    coefficients, offsets = crown(graph, _spec(label, classes, x.dtype), input_bounds,
                                  lambda c, o: minimum(c, o, _DUAL_STEPS if exact_hidden else 0), max_rows)
    coefficients = coefficients.reshape(classes, -1)
    return coefficients, offsets, minimum(coefficients, offsets)


def _graph(fn, images):
    return build_graph(fn, jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype))


@functools.partial(jax.jit, static_argnames=("max_rows", "exact_hidden", "chunk_size"))
def _margins(fn, images, labels, lower, upper, eps, max_rows: int, exact_hidden: bool, chunk_size: int):
    graph = _graph(fn, images)

    def one(image, label, radius):
        margins = _image_bounds(graph, image, label, radius, lower, upper, max_rows, exact_hidden)[2]
        return jnp.where(jnp.arange(margins.shape[0]) == label, jnp.inf, margins)
    return jax.lax.map(lambda args: one(*args), (images, labels, eps), batch_size=chunk_size)


def _search(graph, image, label, lower, upper, max_radius, steps: int, max_rows: int, exact_hidden: bool):
    """The largest ε certified among `steps` CROWN passes, each placed between the certified and failed ones."""
    center = image.reshape(-1)

    def step(_, state):
        certified, failed, eps = state
        coefficients, offsets, minima = _image_bounds(graph, image, label, eps, lower, upper, max_rows, exact_hidden)
        others = jnp.arange(minima.shape[0]) != label
        proved = jnp.all(jnp.where(others, minima >= 0, True))
        # The same linear bounds hold on every smaller ball: the ball's closed form gives a radius.
        norms = jnp.linalg.norm(coefficients, axis=1)
        values = coefficients @ center + offsets
        reach = jnp.where(norms > 0, values / jnp.where(norms > 0, norms, 1.0), jnp.where(values >= 0, jnp.inf, 0.0))
        reach = jnp.clip(jnp.min(jnp.where(others, reach, jnp.inf)), 0.0, eps)
        certified = jnp.maximum(certified, jnp.where(proved, eps, reach))
        failed = jnp.where(proved, failed, eps)
        far = failed > 4 * certified
        eps = jnp.where(certified > 0, jnp.where(far, jnp.sqrt(certified * failed), (certified + failed) / 2),
                        failed / 8)
        return certified, failed, eps

    zero = jnp.zeros((), image.dtype)
    state = (zero, max_radius * 1.0000001, max_radius)
    return jax.lax.fori_loop(0, steps, step, state)[0]


@functools.partial(jax.jit, static_argnames=("steps", "chunk_size", "max_rows", "exact_hidden"))
def _certify(fn, images, labels, lower, upper, max_radius, steps: int, chunk_size: int, max_rows: int,
             exact_hidden: bool):
    graph = _graph(fn, images)
    one = lambda args: _search(graph, *args, lower, upper, max_radius, steps, max_rows, exact_hidden)
    return jax.lax.map(one, (images, labels), batch_size=chunk_size)
