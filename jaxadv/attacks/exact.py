"""The exact minimal perturbation of a linear (softmax-regression) model: a reference for the attack.

    r = exact_linear_minimum(weights, bias, x, target)      # float64, NumPy; needs scipy

For logits Z(z) = W z + b the targeted problem of the paper,
    min ‖z − x‖₂  subject to  argmax Z(z) = t,  lower ≤ z ≤ upper,
is the convex QP  min ½‖z − x‖²  s.t.  (w_t − w_j)·z + b_t − b_j ≥ 0 for every j ≠ t, in the box
(its closure: on the boundary the target ties). Its dual has one variable per
constraint: z(μ) = clip(x + Aᵀμ, lower, upper) and the concave
g(μ) = ½‖z(μ) − x‖² − μ·(A z(μ) + c), maximised over μ ≥ 0 by scipy's
L-BFGS-B in float64. This is independent of the attack's code (no L-BFGS of
ours, no JAX), and the KKT conditions are checked before a value is returned.
The untargeted minimum is the smallest over the targets.
"""
from __future__ import annotations

import numpy as np


def exact_linear_minimum(weights, bias, x, target, lower=0.0, upper=1.0, tol=1e-9):
    """(z*, ‖z* − x‖₂) for the linear classifier Z = z @ weights + bias ([n, K], [K]); z*, x flat [n].

    Raises ValueError if the target cannot be reached inside the box.
    """
    import scipy.optimize

    w = np.asarray(weights, np.float64)
    b = np.asarray(bias, np.float64)
    x = np.asarray(x, np.float64).reshape(-1)
    lower = np.broadcast_to(np.asarray(lower, np.float64), x.shape)
    upper = np.broadcast_to(np.asarray(upper, np.float64), x.shape)
    others = [j for j in range(w.shape[1]) if j != target]
    a = (w[:, target][:, None] - w[:, others]).T            # [K-1, n]: a_j·z + c_j ≥ 0
    c = b[target] - b[others]

    def primal(mu):
        return np.clip(x + mu @ a, lower, upper)

    def negative_dual(mu):
        z = primal(mu)
        slack = a @ z + c
        return -(0.5 * np.sum((z - x) ** 2) - mu @ slack), slack

    solution = scipy.optimize.minimize(negative_dual, np.zeros(len(others)), jac=True, method="L-BFGS-B",
                                       bounds=[(0.0, None)] * len(others),
                                       options=dict(maxiter=10000, ftol=1e-15, gtol=1e-12))
    mu = solution.x
    z = primal(mu)
    slack = a @ z + c
    scale = max(1.0, float(np.max(np.abs(a @ x + c))))
    if np.min(slack) < -tol * scale * 1e3 or np.any(np.abs(mu * slack) > 1e-6 * scale * (1 + mu.max())):
        raise ValueError(f"target {target}: the QP has no feasible point in the box or did not converge "
                         f"(min slack {np.min(slack):.3g})")
    return z, float(np.linalg.norm(z - x))
