"""Certified L2 radii: the blind spot bounded from below, by linear bound propagation (CROWN).

    radii = certified_radius(module, images, labels, params=variables)   # [B]
    # No x' in [lower, upper] with ‖x' − x‖₂ ≤ radii[i] changes the label of image i.
    found = certificates(module, images, labels, params=variables)      # .radius, .crown, .pairwise

An attack bounds the minimal adversarial distance from above; this bounds it
from below, image by image, so that the attained minimum lies in
[certified, attained]. The function is traced once from its jaxpr
(`jaxadv.linear_bounds`); for each image a search on ε runs CROWN on the set
{x′ : ‖x′ − x‖₂ ≤ ε, lower ≤ x′ ≤ upper}, bounding every margin z_y − z_j from
below with the specification folded into the last layer.

Each linear bound a·x′ + b is minimised over the set by Lagrangian duality:
for any λ ≥ 0, Σ_i min_{l_i ≤ x′_i ≤ u_i} [a_i x′_i + λ (x′_i − x_i)²] − λε² + b is
a lower bound (weak duality); at λ₀ = ‖a_free‖/(2ε), a_free without the pixels
on a face of the box that the minimiser would push outward, it is at least
a·x − ε‖a_free‖ + b ≥ a·x − ε‖a‖ + b, the ball's own bound. A bisection on λ
below λ₀ (`minimum_over_set`) and λ = 0 (the box alone) tighten it further.
Hidden units take cheaper sound bounds unless `exact_hidden`: the first layer
(its coefficients shared by every image) a·x − ε‖a_free‖ + b
(`minimum_over_ball_and_faces`), later ones the ball's, computed from their
coefficients on the first layer through its Gram matrix where that layer is
narrower than the input; a node wider than half the input (a convolution's
feature map) is bounded by linear bounds carried forward (`jaxadv.forward_bounds`).

The search on ε: a pass at ε gives linear bounds valid on every smaller ball,
and the radius within which they prove every margin (`_reach`, the nearest
point of each bound's half-space inside the box). Looser relaxations at larger
ε make that reach shrink as ε grows, so the best radius ε* = reach(ε*) lies
between ε and reach(ε): a secant on reach(ε) − ε inside that bracket, started
at half the first-order distance to the boundary, gets within a percent in
about six passes.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import checks
from jaxadv.graph import NoRule
from jaxadv.linear_bounds import RULES, affine_prefix, build_graph, crown
from jaxadv.lipschitz import LipschitzBounds, operator_bounds
from jaxadv.spectral import pairwise_certified_radius

__all__ = ["Certificates", "certificates", "certified_radius", "margin_lower_bounds", "sandwich_summary", "RULES"]

_DUAL_STEPS = 12


class Certificates(NamedTuple):
    """Per image, two sound certified L2 radii and the larger: `radius` = max(`crown`, `pairwise`).

    crown: linear bound propagation on the ball ∩ box. pairwise: the Lipschitz radius min_j (z_y − z_j) /
    (‖w_y − w_j‖ · L_features) of `jaxadv.lipschitz` (0 where the model has no dense head or a Lipschitz
    rule is missing). Which one certified an image: `crown >= pairwise`.
    """
    radius: jax.Array
    crown: jax.Array
    pairwise: jax.Array


def certified_radius(model, images, labels=None, *, params=None, lower=0.0, upper=1.0, steps: int = 8,
                     max_radius: float | None = None, chunk_size: int = 16,
                     max_rows: int = 512, exact_hidden: bool = False) -> jax.Array:
    """Per image, an ε within which no input in [lower, upper] changes the label: `certificates(...).radius`.

    The larger of CROWN's radius and the pairwise Lipschitz radius, both sound; arguments as for
    `certificates`.
    """
    return certificates(model, images, labels, params=params, lower=lower, upper=upper, steps=steps,
                        max_radius=max_radius, chunk_size=chunk_size, max_rows=max_rows,
                        exact_hidden=exact_hidden).radius


def certificates(model, images, labels=None, *, params=None, lower=0.0, upper=1.0, steps: int = 8,
                 max_radius: float | None = None, chunk_size: int = 16,
                 max_rows: int = 512, exact_hidden: bool = False, lipschitz_bounds=None) -> Certificates:
    """Per image, radii within which no input in [lower, upper] changes the label: CROWN's and Lipschitz's.

    Args:
      model: a flax module (params: its variables), a function apply(params, x), or a pure function
        of a batch [B, *image_shape] -> logits [B, K] (`jaxadv.functional.logits_function`).
      images: [B, *image_shape], inside [lower, upper].
      labels: [B] the labels to keep (default: the predictions). A misclassified image gets 0.
      lower, upper: the box (scalars or arrays broadcasting to an image).
      steps: CROWN passes per image in the search on ε.
      max_radius: the largest radius sought; default the box's diameter, beyond which every ball contains
        the box (required when the box is unbounded).
      chunk_size: images certified at a time, at most (memory: fewer where the forward bounds' [n_input, widest
        node] coefficients of a chunk would pass 2^25 entries; and XLA:CPU, in jax 0.10.2, miscomputed the dual's
        bound on [48, 800, 784] coefficients batched at once, tests/test_certify.py keeps that in check).
      max_rows: units of a layer bounded in one backward pass (memory; the result does not depend on it).
      exact_hidden: bound each hidden unit over the ball ∩ box by the dual's search, as the margins are,
        rather than by the cheaper bounds the module docstring describes: larger radii, at several
        times the cost.
      lipschitz_bounds: the model's `jaxadv.lipschitz.operator_bounds`, if the caller holds them (else
        traced here) for the pairwise radius.
    Returns:
      `Certificates` of [B] radii in the images' dtype, each a sound lower bound of the minimal
      adversarial L2 distance; neither is the better on every model (a ReLU layer's relaxation can lose
      to its global Lipschitz constant).
    """
    fn, images, labels, lower, upper = _check(model, params, images, labels, lower, upper)
    checks.int_at_least(steps, "steps", 1)
    checks.int_at_least(chunk_size, "chunk_size", 1)
    checks.int_at_least(max_rows, "max_rows", 1)
    if lipschitz_bounds is not None and not isinstance(lipschitz_bounds, LipschitzBounds):
        raise TypeError(f"lipschitz_bounds: expected the model's jaxadv.lipschitz.operator_bounds (LipschitzBounds) "
                        f"or None, got {type(lipschitz_bounds).__name__}")
    if max_radius is None:
        max_radius = float(jnp.linalg.norm(jnp.broadcast_to(upper - lower, images.shape[1:])))
        if not math.isfinite(max_radius):
            raise ValueError("max_radius is required when the box [lower, upper] is unbounded")
    elif not (isinstance(max_radius, (int, float, np.floating)) and 0 < max_radius < math.inf):
        raise ValueError(f"max_radius must be a positive finite number, got {max_radius!r}")
    max_radius = jnp.asarray(max_radius, images.dtype)
    crown_radii = _certify(fn, images, labels, lower, upper, max_radius, int(steps), int(chunk_size),
                           int(max_rows), bool(exact_hidden))
    pairwise = _pairwise_radius(fn, images, labels, max_radius, lipschitz_bounds)
    return Certificates(jnp.maximum(crown_radii, pairwise), crown_radii, pairwise)


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
    checks.int_at_least(max_rows, "max_rows", 1)
    checks.int_at_least(chunk_size, "chunk_size", 1)
    return _margins(fn, images, labels, lower, upper, eps, int(max_rows), bool(exact_hidden), int(chunk_size))


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


def _pairwise_radius(fn, images, labels, max_radius, bounds=None):
    """The pairwise Lipschitz radius of each image's label (0 where the model has no dense head, or the
    Lipschitz bounds have no rule for one of its operators); bounds: operator_bounds, if already traced."""
    if bounds is None:
        try:
            bounds = operator_bounds(fn, jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype))
        except NoRule:
            return jnp.zeros(images.shape[:1], images.dtype)
    if bounds.head_weights is None or not math.isfinite(bounds.features_bound):
        return jnp.zeros(images.shape[:1], images.dtype)
    return _pairwise(fn, images, labels, jnp.asarray(bounds.head_weights, images.dtype),
                     jnp.asarray(bounds.features_bound, images.dtype), max_radius)


@jax.jit
def _pairwise(fn, images, labels, head_weights, features_bound, max_radius):
    logits = jax.lax.map(lambda x: fn(x[None])[0], images, batch_size=256)
    return jnp.minimum(pairwise_certified_radius(logits, head_weights, features_bound, labels=labels), max_radius)


# -- the minimum of a linear function over the ball ∩ box -------------------------------------

def minimum_over_set(coefficients, offsets, center, eps, lower, upper, steps: int = _DUAL_STEPS):
    """Lower bounds of min coefficients[s] · x + offsets[s] over {‖x − center‖ ≤ eps} ∩ [lower, upper].

    coefficients [S, n], offsets [S], center/lower/upper [n]. The dual function g(λ) (module docstring) is
    concave, with g′(λ) = ‖x(λ) − center‖² − eps² ≤ 0 at λ₀ = ‖a_free‖/(2 eps) (a without the coordinates
    that a face of the box stops): a bisection on log λ over [λ₀ 2^−30, λ₀] keeps the best value it meets,
    each one a sound bound, as is λ = 0 (the box alone). steps = 0: λ₀ only.
    """
    tiny = jnp.finfo(center.dtype).tiny
    # Coordinates on a face of the box that the ball's minimiser would push outward stay put: the dual at
    # λ₀ = ‖a_free‖/(2 eps) is at least a·x − eps‖a_free‖ + b, the minimum over the ball ∩ those faces.
    outward = ((coefficients > 0) & (center <= lower)) | ((coefficients < 0) & (center >= upper))
    norms = jnp.sqrt(jnp.where(outward, 0, coefficients ** 2).sum(axis=1))
    if steps:
        box = jnp.where(coefficients > 0, coefficients * lower, jnp.where(coefficients < 0, coefficients * upper, 0))
        best = offsets + box.sum(axis=1)
    else:
        best = jnp.full(offsets.shape, -jnp.inf, offsets.dtype)

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


def minimum_over_ball_and_faces(coefficients, offsets, center, eps, lower, upper):
    """Lower bounds a·center + b − eps‖a_free‖ of min a·x + b over the ball ∩ box, in one pass over a.

    a_free leaves out the coordinates at a face of the box that the ball's minimiser would push outward; the
    bound is the minimum over the ball ∩ those faces, a superset of the set. Written as matrix-vector
    products, so that coefficients shared by every image (layers fed by affine operators alone) cost one
    matrix product for a batch of images.
    """
    free_up = (center < upper).astype(coefficients.dtype)        # may move up
    free_down = (center > lower).astype(coefficients.dtype)      # may move down
    squares = jnp.maximum(coefficients, 0) ** 2 @ free_down + jnp.minimum(coefficients, 0) ** 2 @ free_up
    return coefficients @ center + offsets - eps * jnp.sqrt(squares)


# -- per image ------------------------------------------------------------------------------

@jax.jit
def _predict(fn, images):
    return jnp.argmax(fn(images), axis=-1)


def _spec(label, classes: int, dtype):
    """Rows e_y − e_j, one per class j ([K, 1, K]; the row j = y is zero and ignored)."""
    return (jax.nn.one_hot(label, classes, dtype=dtype)[None] - jnp.eye(classes, dtype=dtype))[:, None]


class _Prefix(NamedTuple):
    """The graph's affine prefix A x + a (`affine_prefix`), shared by every image: A [units, n_input], and either
    A Aᵀ (narrow) or A's positive and negative parts squared (wide)."""
    index: int
    jacobian: jax.Array
    constant: jax.Array
    gram: jax.Array | None
    squares: tuple | None


def _prefix_gram(graph, dtype):
    """The graph's `_Prefix`, or None. Narrower than the input: a later unit's ball bound from its coefficients
    on the prefix costs n_prefix², not n_prefix · n_input. Wider (a convolution): its units' bounds are
    matrix-vector products with A (`_wide_prefix_bounds`), A built once rather than in every pass."""
    index = affine_prefix(graph)
    if index is None:
        return None
    def evaluate(v):                                                     # only affine nodes lie before it
        values = [v]
        for node in graph.nodes[1:index + 1]:
            values.append(node.fn(*(values[i] for i in node.inputs)))
        return values[index]
    size, inputs = int(np.prod(graph.nodes[index].shape)), int(np.prod(graph.nodes[0].shape))
    zero = jnp.zeros(graph.nodes[0].shape, dtype)
    units = jnp.eye(inputs, dtype=dtype).reshape((inputs,) + graph.nodes[0].shape)
    columns = jax.vmap(lambda unit: jax.jvp(evaluate, (zero,), (unit,))[1])(units)    # exact: no constant
    constant, jacobian = evaluate(zero).reshape(-1), columns.reshape(inputs, size).T
    if size > inputs:
        return _Prefix(index, jacobian, constant, None, (jnp.maximum(jacobian, 0) ** 2, jnp.minimum(jacobian, 0) ** 2))
    return _Prefix(index, jacobian, constant, jacobian @ jacobian.T, None)


def _image_bounds(graph, image, label, eps, lower, upper, max_rows: int, exact_hidden: bool, gram=None):
    """(coefficients [K, n], offsets [K], set minimum [K]) of the margins on the ball of radius eps ∩ box."""
    coefficients, offsets = _linear_bounds(graph, image, label, eps, lower, upper, max_rows, exact_hidden, gram)
    x = image.reshape(-1)
    def flat(bound):
        return jnp.broadcast_to(bound, image.shape).reshape(-1)
    return coefficients, offsets, minimum_over_set(coefficients, offsets, x, eps, flat(lower), flat(upper))


def _linear_bounds(graph, image, label, eps, lower, upper, max_rows: int, exact_hidden: bool, gram=None):
    """(coefficients [K, n], offsets [K]): margin_j(x′) ≥ coefficients_j · x′ + offsets_j on the ball of radius
    eps ∩ box. gram: `_prefix_gram`'s, to bound the units past the affine prefix on the ball alone, from their
    coefficients on it (unless exact_hidden)."""
    x = image[None]
    lower, upper = jnp.broadcast_to(lower, x.shape), jnp.broadcast_to(upper, x.shape)
    def flat(a):
        return a.reshape(-1)
    if exact_hidden:
        def minimum(c, o):
            return minimum_over_set(c, o, flat(x), eps, flat(lower), flat(upper))
    else:
        def minimum(c, o):
            return minimum_over_ball_and_faces(c, o, flat(x), eps, flat(lower), flat(upper))
    prefix, known = None, {}
    if gram is not None and not exact_hidden:
        value = gram.jacobian @ flat(x) + gram.constant               # the prefix at the image
        if gram.gram is None:
            bounds = _wide_prefix_bounds(gram, value, flat(x), eps, flat(lower), flat(upper))
            known[gram.index] = tuple(b.reshape(graph.nodes[gram.index].shape) for b in bounds)
        else:
            def squares(c):
                return jnp.maximum(((c @ gram.gram) * c).sum(axis=1), 0)
            prefix = (gram.index, lambda c, o: c @ value + o - eps * jnp.sqrt(squares(c)))
    def input_bounds():
        return (jnp.maximum(lower, x - eps), jnp.minimum(upper, x + eps))
    classes = graph.nodes[graph.output].shape[-1]
    coefficients, offsets = crown(graph, _spec(label, classes, x.dtype), input_bounds, minimum, max_rows, prefix,
                                  known)
    return coefficients.reshape(classes, -1), offsets


def _wide_prefix_bounds(prefix: _Prefix, value, center, eps, lower, upper):
    """(lower, upper) of a wide prefix's units: `minimum_over_ball_and_faces` of ±A, from A's squared parts."""
    free_up, free_down = (center < upper).astype(value.dtype), (center > lower).astype(value.dtype)
    positive, negative = prefix.squares
    return (value - eps * jnp.sqrt(positive @ free_down + negative @ free_up),
            value + eps * jnp.sqrt(positive @ free_up + negative @ free_down))


def _fitting(graph, chunk_size: int) -> int:
    """chunk_size, or fewer images where a chunk's forward coefficients ([n_input, widest node] per image) would
    pass 2^25 entries (a ConvNet's: one image at a time)."""
    per_image = int(np.prod(graph.nodes[0].shape)) * max(int(np.prod(node.shape)) for node in graph.nodes)
    return max(1, min(chunk_size, 2 ** 25 // per_image))


def _graph(fn, images):
    return build_graph(fn, jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype))


@functools.partial(jax.jit, static_argnames=("max_rows", "exact_hidden", "chunk_size"))
def _margins(fn, images, labels, lower, upper, eps, max_rows: int, exact_hidden: bool, chunk_size: int):
    graph = _graph(fn, images)
    gram = _prefix_gram(graph, images.dtype)

    def one(image, label, radius):
        margins = _image_bounds(graph, image, label, radius, lower, upper, max_rows, exact_hidden, gram)[2]
        return jnp.where(jnp.arange(margins.shape[0]) == label, jnp.inf, margins)
    return jax.lax.map(lambda args: one(*args), (images, labels, eps), batch_size=_fitting(graph, chunk_size))


def _first_order_reach(fn, image, label):
    """min_j margin_j / ‖∇ margin_j‖ at the image: where the linearised model changes label (a starting guess)."""
    logits, pullback = jax.vjp(lambda v: fn(v[None])[0], image)
    gradients = jax.vmap(pullback)(jnp.eye(logits.shape[0], dtype=logits.dtype))[0]
    margins = logits[label] - logits
    norms = jnp.linalg.norm((gradients[label] - gradients).reshape(logits.shape[0], -1), axis=1)
    reach = jnp.where(norms > 0, margins / jnp.where(norms > 0, norms, 1.0), jnp.where(margins > 0, jnp.inf, 0.0))
    return jnp.maximum(jnp.min(jnp.where(jnp.arange(logits.shape[0]) == label, jnp.inf, reach)), 0.0)


def _reach(coefficients, offsets, center, lower, upper, label, steps: int = 24):
    """The largest radius around center within which no point of the box takes a margin's linear bound below 0.

    Per row, the nearest point of {c·x + o ≤ 0} ∩ box is x(μ) = clip(center − μc) at the multiplier μ* where
    c·x(μ*) + o = 0, and ‖x(μ) − center‖ grows with μ: a bisection on log μ keeps the largest μ known below μ*
    (c·x(μ) + o > 0), whose distance is a sound lower bound (as is the ball's own, μ₀ = value/‖c‖² ≤ μ*).
    """
    tiny = jnp.finfo(center.dtype).tiny
    squared = (coefficients ** 2).sum(axis=1)
    values = coefficients @ center + offsets
    ball = values / jnp.sqrt(jnp.maximum(squared, tiny))

    def point(log_mu):
        x = jnp.clip(center - jnp.exp(log_mu)[:, None] * coefficients, lower, upper)
        return (coefficients * x).sum(axis=1) + offsets, jnp.linalg.norm(x - center, axis=1)

    def halve(_, state):
        low, high = state
        middle = (low + high) / 2
        outside = point(middle)[0] > 0
        return jnp.where(outside, middle, low), jnp.where(outside, high, middle)

    start = jnp.log(jnp.maximum(values / jnp.maximum(squared, tiny), tiny))
    low = jax.lax.fori_loop(0, steps, halve, (start, start + 30 * math.log(2)))[0]
    reach = jnp.maximum(ball, jnp.where(point(low)[0] > 0, point(low)[1], 0.0))
    reach = jnp.where(squared > 0, reach, jnp.where(values > 0, jnp.inf, 0.0))
    reach = jnp.where(values > 0, reach, 0.0)
    return jnp.min(jnp.where(jnp.arange(values.shape[0]) != label, reach, jnp.inf))


def _search(fn, graph, gram, image, label, lower, upper, max_radius, steps: int, max_rows: int, exact_hidden: bool):
    """The largest ε certified among `steps` CROWN passes, a safeguarded secant on ε ↦ reach(ε) − ε.

    A pass at ε yields linear bounds valid on every ball up to ε; `reach` is the radius at which they stop
    proving. reach(ε) shrinks as ε grows (looser relaxations), so the best radius ε* = reach(ε*) lies
    between ε and reach(ε): each pass narrows a bracket [low, high] (halved in log ε while wider than a
    factor 2) and certifies min(ε, reach).
    """
    center = image.reshape(-1)
    def flat(bound):
        return jnp.broadcast_to(bound, image.shape).reshape(-1)
    start = _first_order_reach(fn, image, label)

    def step(_, state):
        certified, low, high, eps, last_eps, last_gap = state
        coefficients, offsets = _linear_bounds(graph, image, label, eps, lower, upper, max_rows, exact_hidden, gram)
        reach = _reach(coefficients, offsets, center, flat(lower), flat(upper), label)
        certified = jnp.maximum(certified, jnp.minimum(eps, reach))
        low, high = jnp.maximum(low, jnp.minimum(eps, reach)), jnp.minimum(high, jnp.maximum(eps, reach))
        gap = reach - eps
        secant = eps - gap * (eps - last_eps) / jnp.where(gap != last_gap, gap - last_gap, 1.0)
        margin = 0.05 * (high - low)
        guess = jnp.where(jnp.isfinite(secant) & (gap != last_gap), secant, (low + high) / 2)
        # A bracket wider than a factor 2 (reach falling steeply, as on a deep ReLU net) is halved in log ε.
        guess = jnp.where((high > 2 * low) & (low > 0), jnp.sqrt(low * high), guess)
        return certified, low, high, jnp.clip(guess, low + margin, high - margin), eps, gap

    zero = jnp.zeros((), image.dtype)
    state = (zero, zero, max_radius, jnp.minimum(start / 2, max_radius), zero, jnp.minimum(start, max_radius))
    return jax.lax.fori_loop(0, steps, step, state)[0]


@functools.partial(jax.jit, static_argnames=("steps", "chunk_size", "max_rows", "exact_hidden"))
def _certify(fn, images, labels, lower, upper, max_radius, steps: int, chunk_size: int, max_rows: int,
             exact_hidden: bool):
    graph = _graph(fn, images)
    gram = _prefix_gram(graph, images.dtype)
    def one(args):
        return _search(fn, graph, gram, *args, lower, upper, max_radius, steps, max_rows, exact_hidden)
    return jax.lax.map(one, (images, labels), batch_size=_fitting(graph, chunk_size))
