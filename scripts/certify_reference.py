"""Writes tests/data/certify_reference.json: CROWN's relaxation of small one-hidden-layer nets, solved by scipy.

    python scripts/certify_reference.py        # about a minute; numpy and scipy only

Like with like (auto_LiRPA 0.3, the registry's only release, needs torch < 1.13 and does not install beside
torch 2): for a net with one hidden layer of (leaky) ReLU units, the same relaxation CROWN uses (per unit
the exact pre-activation interval over the input set, the secant above and the adaptive-slope line below)
is a convex problem over (x, y): min c·(W2ᵀy + b2) subject to ‖x − x0‖ ≤ ε, lower ≤ x ≤ upper and each y_i
between its two lines at h_i = w_i·x + b_i. It is solved here in float64 from scratch, each linear minimum
over the set with a primal-dual gap below 1e-7 (and each interval likewise); CROWN's back-substitution must
reach the same value, to float32 rounding.
"""
import json
from pathlib import Path

import numpy as np
import scipy.optimize

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "certify_reference.json"


def _minimise(a, x0, eps, lower, upper):
    """min a·x over the ball ∩ box, float64: the dual's maximum (scipy's bounded Brent on log λ), its gap to a
    feasible primal point (the dual's minimiser pulled into the ball) checked below 1e-7."""
    def minimiser(lam):
        return np.clip(x0 - a / (2 * lam), lower, upper)

    def dual(log_lam):
        lam = np.exp(log_lam)
        x = minimiser(lam)
        return a @ x + lam * (np.sum((x - x0) ** 2) - eps ** 2)
    top = np.log(np.linalg.norm(a) / (2 * eps))
    r = scipy.optimize.minimize_scalar(lambda t: -dual(t), bounds=(top - 40, top + 1), method="bounded",
                                       options=dict(xatol=1e-12))
    x = minimiser(np.exp(r.x))
    distance = np.linalg.norm(x - x0)
    primal = a @ (x0 + (x - x0) * min(1.0, eps / distance))     # feasible: inside the box and the ball
    assert primal - (-r.fun) < 1e-7 * (1 + abs(primal)), (primal, -r.fun)
    return -r.fun


def _lines(low, up, slope):
    """Per unit (α_l, β_l, α_u, β_u) of y = max(h, slope·h) on [low, up], as CROWN relaxes it."""
    stable_on, stable_off = low >= 0, up <= 0
    secant = np.where(stable_on | stable_off, 1.0, (up - slope * low) / np.where(up > low, up - low, 1))
    alpha_u = np.where(stable_on, 1.0, np.where(stable_off, slope, secant))
    beta_u = np.where(stable_on | stable_off, 0.0, slope * low - alpha_u * low)
    adaptive = np.where(up >= -low, 1.0, slope)
    alpha_l = np.where(stable_on, 1.0, np.where(stable_off, slope, adaptive))
    return alpha_l, np.zeros_like(low), alpha_u, beta_u


def _bound(x0, label, j, eps, lower, upper, w1, b1, w2, b2, slope):
    """For fixed x the relaxed y is separable: each y_i at its lower line where c_i > 0, else its upper line,
    so the relaxed minimum over (x, y) is a linear minimum over x, taken by `_minimise`."""
    low = np.array([_minimise(w1[:, i], x0, eps, lower, upper) for i in range(len(b1))]) + b1
    up = -np.array([_minimise(-w1[:, i], x0, eps, lower, upper) for i in range(len(b1))]) + b1
    alpha_l, beta_l, alpha_u, beta_u = _lines(low, up, slope)
    c = w2[:, label] - w2[:, j]
    alpha, beta = np.where(c > 0, alpha_l, alpha_u), np.where(c > 0, beta_l, beta_u)
    linear = w1 @ (c * alpha)
    return _minimise(linear, x0, eps, lower, upper) + c @ (alpha * b1 + beta) + b2[label] - b2[j]


def main():
    cases = []
    for seed, (slope, lower, upper) in enumerate([(0.0, -np.inf, np.inf), (0.1, -np.inf, np.inf),
                                                  (0.0, 0.0, 1.0), (0.1, 0.0, 1.0)]):
        rng = np.random.default_rng(seed)
        w1, b1 = rng.normal(size=(5, 6)).astype(np.float32), (0.5 * rng.normal(size=6)).astype(np.float32)
        w2, b2 = rng.normal(size=(6, 3)).astype(np.float32), (0.5 * rng.normal(size=3)).astype(np.float32)
        images = (rng.uniform(0, 1, (4, 5)) ** 2).astype(np.float32)
        hidden = images @ w1 + b1
        labels = np.argmax(np.maximum(hidden, slope * hidden) @ w2 + b2, -1)
        eps = 0.3
        args = [a.astype(np.float64) for a in (w1, b1, w2, b2)]
        bounds = [[np.inf if j == y else _bound(x.astype(np.float64), y, j, eps, lower, upper, *args, slope)
                   for j in range(3)] for x, y in zip(images, labels)]
        cases.append(dict(negative_slope=slope, lower=lower, upper=upper, eps=eps, w1=w1.tolist(), b1=b1.tolist(),
                          w2=w2.tolist(), b2=b2.tolist(), images=images.tolist(), labels=labels.tolist(),
                          bounds=bounds))
    OUT.write_text(json.dumps(dict(command="python scripts/certify_reference.py", cases=cases), indent=1))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
