"""Linear relaxations of the nonlinear nodes of `jaxadv.linear_bounds`, and their exact output bounds.

Relaxations (Zhang et al. 2018, "Efficient neural network robustness
certification with general activation functions"): a piecewise-linear unit
with one kink (ReLU, leaky ReLU, max(x, c)) gets the secant on its convex
side and the line through the kink with CROWN's adaptive slope on the other;
sigmoid and tanh get, among ten slopes (the secant, the tangents at nine
points of [l, u]), the line of each direction tightest at the midpoint, its
offset exact for that slope (the extremes of f(x) − kx are at l, u or where
f′ = k); a maximum over a window is at least its candidate with the largest
lower bound, and at most a plane through the candidates that touches the
maximum at the box's vertices where that plane is lower on average than the
largest upper bound, else that bound (`_max_relaxation`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["relaxation", "output_bounds"]


def _kinked_relaxation(params, lower, upper):
    """(α_l, β_l, α_u, β_u): α_l x + β_l ≤ y ≤ α_u x + β_u on [lower, upper] for a one-kink unit."""
    kink, value, below, above = (jnp.asarray(params[k], lower.dtype) for k in ("kink", "value", "below", "above"))
    t_low, t_up = lower - kink, upper - kink
    mixed = (t_low < 0) & (t_up > 0)
    width = jnp.where(mixed, t_up - t_low, 1.0)
    secant = (above * t_up - below * t_low) / width                       # through both ends
    secant_offset = value + below * t_low - secant * lower
    adaptive = jnp.where(t_up >= -t_low, above, below)                    # CROWN: the side that covers more
    adaptive_offset = value - adaptive * kink
    convex = below <= above
    fixed = jnp.where(t_up <= 0, below, above)                             # one linear piece: exact
    fixed_offset = value - fixed * kink
    alpha_l = jnp.where(mixed, jnp.where(convex, adaptive, secant), fixed)
    beta_l = jnp.where(mixed, jnp.where(convex, adaptive_offset, secant_offset), fixed_offset)
    alpha_u = jnp.where(mixed, jnp.where(convex, secant, adaptive), fixed)
    beta_u = jnp.where(mixed, jnp.where(convex, secant_offset, adaptive_offset), fixed_offset)
    shape = jnp.broadcast_shapes(lower.shape, alpha_l.shape)
    return tuple(jnp.broadcast_to(a, shape) for a in (alpha_l, beta_l, alpha_u, beta_u))


def _sigmoid_critical(k):
    return 2 * jnp.arctanh(jnp.sqrt(jnp.clip(1 - 4 * k, 0.0, 1.0)))     # σ′(x) = k at x = ±this


def _tanh_critical(k):
    return jnp.arctanh(jnp.sqrt(jnp.clip(1 - k, 0.0, 1.0)))               # tanh′(x) = k at x = ±this


_SMOOTH = {
    "logistic": (jax.nn.sigmoid, lambda x: jax.nn.sigmoid(x) * (1 - jax.nn.sigmoid(x)), _sigmoid_critical),
    "tanh": (jnp.tanh, lambda x: 1 - jnp.tanh(x) ** 2, _tanh_critical),
}


def _smooth_relaxation(params, lower, upper, points: int = 9):
    """Lines below and above an S-shaped f on [lower, upper], each with its slope's exact offset."""
    f, derivative, critical = _SMOOTH[params["name"]]
    width = upper - lower
    middle = lower + width / 2
    secant = jnp.where(width > 0, (f(upper) - f(lower)) / jnp.where(width > 0, width, 1.0), derivative(middle))
    grid = lower + width * jnp.linspace(0.0, 1.0, points, dtype=lower.dtype).reshape((-1,) + (1,) * lower.ndim)
    slopes = jnp.concatenate([secant[None], derivative(grid)])            # [S, *shape]
    turn = critical(slopes)
    where = jnp.stack([jnp.broadcast_to(lower, slopes.shape), jnp.broadcast_to(upper, slopes.shape),
                       jnp.clip(turn, lower, upper), jnp.clip(-turn, lower, upper)])
    gaps = f(where) - slopes * where                                       # f(x) − kx at every extreme candidate
    offset_l, offset_u = gaps.min(axis=0), gaps.max(axis=0)
    best_l = jnp.argmax(slopes * middle + offset_l, axis=0)[None]
    best_u = jnp.argmin(slopes * middle + offset_u, axis=0)[None]
    def pick(a, i):
        return jnp.take_along_axis(a, i, axis=0)[0]
    return pick(slopes, best_l), pick(offset_l, best_l), pick(slopes, best_u), pick(offset_u, best_u)


def _max_relaxation(node, lower, upper):
    """(lower weights, upper weights, upper constant) over a max node's K candidates y_k ∈ [l_k, u_k]:
    Σ_k lower_k y_k ≤ max_k y_k ≤ Σ_k upper_k y_k + constant.

    Below: the candidate with the largest lower bound. Above: the plane m + Σ_k a_k (y_k − l_k), with
    m = max_k l_k and a_k = (u_k − m)⁺ / (u_k − l_k), which is at least max_k y_k at every vertex of the box and
    so on it (the maximum is convex); it is y_k itself where candidate k dominates. Where the plane's mean over
    the box exceeds max_k u_k (many candidates overlap, as on a flat background), that constant instead.
    """
    low, up = node.fn(lower, -jnp.inf), node.fn(upper, -jnp.inf)          # [K, *shape]
    best = jnp.argmax(low, axis=0)
    choice = jax.nn.one_hot(best, low.shape[0], axis=0, dtype=lower.dtype)
    floor = low.max(axis=0)
    width = up - low
    real = jnp.isfinite(low)                                               # not padding
    slopes = jnp.where(real & (width > 0), jnp.maximum(up - floor, 0) / jnp.where(width > 0, width, 1.0), 0.0)
    constant = floor - jnp.where(real, slopes * low, 0.0).sum(axis=0)
    top = up.max(axis=0)
    plane = constant + jnp.where(real, slopes * (low + up) / 2, 0.0).sum(axis=0) <= top
    slopes = jnp.where(plane, slopes, 0.0).astype(lower.dtype)
    return choice, slopes, jnp.where(plane, constant, top).astype(lower.dtype)


def relaxation(node, lower, upper):
    """The linear relaxation of a nonlinear node whose input lies in [lower, upper]."""
    if node.kind == "piecewise":
        return _kinked_relaxation(node.params, lower, upper)
    if node.kind == "smooth":
        return _smooth_relaxation(node.params, lower, upper)
    return _max_relaxation(node, lower, upper)


def output_bounds(node, lower, upper):
    """(lower, upper) of a nonlinear node's value when its input lies in [lower, upper], exactly: a one-kink
    unit's extremes are at an end or the kink, sigmoid and tanh increase, a maximum is at least and at most
    the maxima of its candidates' bounds."""
    if node.kind == "smooth":
        f = _SMOOTH[node.params["name"]][0]
        return f(lower), f(upper)
    if node.kind == "max":
        return node.fn(lower, -jnp.inf).max(axis=0), node.fn(upper, -jnp.inf).max(axis=0)
    p = {k: jnp.asarray(v, lower.dtype) for k, v in node.params.items()}
    def f(t):
        return p["value"] + p["below"] * jnp.minimum(t - p["kink"], 0) + p["above"] * jnp.maximum(t - p["kink"], 0)
    values = jnp.stack(jnp.broadcast_arrays(f(lower), f(upper), f(jnp.clip(p["kink"], lower, upper))))
    return values.min(axis=0), values.max(axis=0)
