"""Refinement to the nearest point of the decision boundary, as a pure ask/tell state machine.

    state = init(origin, adversarial, anchor, num_classes, config)    # origin: x; adversarial: a found x'
    while not state.done:
        logits = f(state.trial); j = linearise_class(state, logits)
        grad = ∇(sign · (Z_anchor − Z_j))(state.trial)                   # one gradient, as `box_lbfgs.tell`
        state = tell(state, logits, grad, j, lower, upper, config)
    state.best, state.best_l2                       # the closest adversarial point seen, inside the box

Why. The penalty method of the paper minimises c‖r‖² + loss(x + r) and keeps
the largest c that still succeeds. The cross-entropy keeps pulling past the
decision boundary, so its minimiser lies inside the target class, not on its
edge (on softmax regression, above the exact QP minimum: docs/benchmarks.md).
This stage moves the found adversarial x' to the nearest point of the
boundary, within the box.

The method is sequential quadratic programming on the exact problem
    min ½‖z − x‖²   subject to   m_j(z) ≥ 0 (the attack's constraints),  lower ≤ z ≤ upper,
with m_j a logit difference: Z_t − Z_j for every j ≠ t (targeted: the
adversarial set is an *intersection*), or Z_j − Z_y for some j ≠ y
(untargeted: a *union*). Each evaluation linearises one constraint at the
trial point (a "cut" a·z ≥ a·z_k − m_j(z_k) + margin); the last `cuts` cuts
are kept, one per class, and the next trial is the projection of x itself
(not of z_k, which is what makes it converge to the nearest point rather
than to any boundary point, as in FAB) onto the cuts intersected with the
box (targeted), or onto the nearest single cut (untargeted). On a linear
model every cut is exact, so once the binding classes have been cut the
projection *is* the minimum. That projection is a small QP solved in its
dual (`project_onto_cuts`). If a trial is not adversarial (curvature), the
next trial is the midpoint between it and the best adversarial point so far,
which is closer than that best (the norm is convex), and whose own cut
corrects the linearisation. The result is the best adversarial point seen,
never merely the last.

On a piecewise-linear model (ReLU, max pooling) each trial lies in another
linear piece, the cuts disagree, and the projections stall short of the
minimum. An image whose SQP has not converged in `steps` evaluations, or
has not come closer in `patience` evaluations in a row, then walks along the
boundary as DDN does (Rony et al., 2019): a step along the
constraint's gradient, back onto a sphere about x whose radius shrinks while
the walk stays adversarial and grows while it does not. An image whose SQP
converges never walks. What the walk and its patience gain, per model, is in
docs/benchmarks.md ("The refinement").

Each `tell` consumes one logits vector and one gradient; `refine_lanes` wraps
it as pure per-image functions for the lane loop (`jaxadv.attacks.lanes`).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxadv.attacks.lanes import LaneAttack, run_lanes
from jaxadv.attacks.projection import project_onto_cuts


class RefineConfig(NamedTuple):
    """Settings of the boundary refinement (static).

    steps: evaluations at most per image (0: no refinement, the paper's method).
    cuts: linearisations kept (one per class; the oldest goes first).
    margin: each cut asks for m_j ≥ margin (in logits), so that a converged
      point is strictly adversarial despite rounding.
    rtol: stop when the next projection moves an adversarial trial by less
      than rtol · its distance to x.
    untargeted: the adversarial set is a union over classes (any class but
      the anchor) rather than an intersection (the target beats every class).
    overshoot: after a trial that is not adversarial, the next projection is
      pushed this fraction further from x (doubled at each failure in a row).
    dual_iterations: semismooth Newton steps of the projection's dual, at most.
    walk_steps: evaluations of the boundary walk that follows when the SQP
      has not converged in `steps` (0: none); see `tell`.
    patience: with a walk to follow, the SQP also hands over once this many
      evaluations in a row (seeds aside) brought the best point no closer by
      `rtol` of its distance.
    walk_step, walk_gamma: the walk's first step along the margin's gradient
      and its first radius change, as fractions of the radius (both annealed
      to 1% of that by a cosine over the walk).
    """
    steps: int = 20
    cuts: int = 6
    margin: float = 1e-4
    rtol: float = 1e-3
    untargeted: bool = False
    dual_iterations: int = 8
    overshoot: float = 0.02
    walk_steps: int = 0
    walk_step: float = 2.0
    walk_gamma: float = 0.02
    patience: int = 5


class RefineState(NamedTuple):
    """State of one image (vmap adds a leading batch axis)."""
    origin: jax.Array       # [n] x
    anchor: jax.Array       # the target t (targeted) or the true label y (untargeted)
    best: jax.Array         # [n] closest adversarial point so far
    best_l2: jax.Array      # its distance to x (inf: none)
    trial: jax.Array        # [n] the point to evaluate next
    failures: jax.Array     # trials in a row that were not adversarial
    idle: jax.Array         # evaluations in a row (seeds aside) that brought the best no closer by rtol
    cuts: jax.Array         # [cuts, n] gradients a of the kept linearisations
    offsets: jax.Array      # [cuts] right-hand sides: a·z ≥ offset
    cut_class: jax.Array    # [cuts] the class j of each cut (-1: empty)
    newest: jax.Array       # slot of the newest cut
    multipliers: jax.Array  # [cuts] the dual solution of the last projection (a warm start)
    seeds: jax.Array        # [cuts] classes still to linearise at `best` before projecting (-1: none)
    walking: jax.Array      # the SQP has stalled: the boundary walk has taken over
    radius: jax.Array       # the walk's distance from x
    walked: jax.Array       # the walk's evaluations so far
    steps: jax.Array
    done: jax.Array


def init(origin, adversarial, anchor, num_classes: int, config: RefineConfig = RefineConfig(), success=True):
    """A fresh refinement from the adversarial point `adversarial` (done at once if not `success`)."""
    origin = jnp.asarray(origin)
    dtype, m = origin.dtype, config.cuts
    l2 = jnp.linalg.norm(adversarial - origin)
    return RefineState(
        origin=origin, anchor=jnp.asarray(anchor, jnp.int32), best=adversarial,
        best_l2=jnp.where(success, l2, jnp.inf).astype(dtype), trial=adversarial,
        failures=jnp.zeros((), jnp.int32), idle=jnp.zeros((), jnp.int32), cuts=jnp.zeros((m, origin.shape[0]), dtype),
        offsets=jnp.zeros((m,), dtype), cut_class=jnp.full((m,), -1, jnp.int32),
        newest=jnp.asarray(m - 1, jnp.int32), multipliers=jnp.zeros((m,), dtype),
        seeds=jnp.full((m,), -1, jnp.int32), walking=jnp.zeros((), bool), radius=jnp.zeros((), dtype),
        walked=jnp.zeros((), jnp.int32), steps=jnp.zeros((), jnp.int32),
        done=~jnp.asarray(success, bool) | (config.steps == 0))


def without_class(logits, k):
    """The logits with class k's set to -inf (so that max and logsumexp run over the other classes)."""
    return jnp.where(jnp.arange(logits.shape[-1]) == k, -jnp.inf, logits)


def is_adversarial(logits, anchor, untargeted: bool):
    """Finite logits with the target strictly on top (targeted), or the label not on top (untargeted)."""
    others = without_class(logits, anchor)
    gap = logits[anchor] - jnp.max(others)
    finite = jnp.all(jnp.isfinite(logits))
    return finite & jnp.where(untargeted, gap < 0, gap > 0)


def _margin_shift(logits, anchor, amount, untargeted: bool):
    """Logits offsets that lower the anchor's lead (targeted) or raise the label (untargeted) by `amount`."""
    onehot = jax.nn.one_hot(anchor, logits.shape[-1], dtype=logits.dtype)
    return amount * onehot if untargeted else -amount * onehot


def linearise_class(state: RefineState, logits):
    """The class j whose constraint the next gradient linearises: a pending seed, else the top competitor."""
    others = without_class(logits, state.anchor)
    return jnp.where(state.seeds[0] >= 0, state.seeds[0], jnp.argmax(others)).astype(jnp.int32)


def constraint_cotangent(anchor, j, num_classes: int, untargeted: bool, dtype):
    """d m_j / d logits: one-hot(anchor) − one-hot(j) (targeted) or its negative (untargeted)."""
    d = jax.nn.one_hot(anchor, num_classes, dtype=dtype) - jax.nn.one_hot(j, num_classes, dtype=dtype)
    return -d if untargeted else d


def tell(state: RefineState, logits, grad, j, lower=0.0, upper=1.0,
         config: RefineConfig = RefineConfig()) -> RefineState:
    """Consume Z(trial) and ∇m_j(trial); return the state with the next trial. Branch-free; done stays done."""
    z, dtype = state.trial, state.trial.dtype
    adversarial = is_adversarial(logits, state.anchor, config.untargeted)
    # Only a point that clears half the margin may become the result: one just across the boundary
    # could fall back under another batch shape's rounding (the attack rechecks its result).
    clear = is_adversarial(logits + _margin_shift(logits, state.anchor, 0.5 * config.margin, config.untargeted),
                           state.anchor, config.untargeted)
    l2 = jnp.linalg.norm(z - state.origin)
    better = clear & (l2 < state.best_l2)
    best = jnp.where(better, z, state.best)
    best_l2 = jnp.where(better, l2, state.best_l2)

    cuts, offsets, cut_class, usable, has_slot, slot = _store_cut(state, logits, grad, j, config)
    valid = cut_class >= 0

    seeds = _next_seeds(state, logits, j, config)
    seeding = seeds[0] >= 0

    projection, multipliers = _project(state.origin, cuts, offsets, valid, lower, upper,
                                       state.multipliers, config)
    # A trial outside the adversarial set has refreshed the cut it aimed for, but a curved boundary seen
    # from outside is approached, not crossed, by projections. While the best point is far, overshoot
    # the new projection along its ray from x, doubling the overshoot at each failure in a row (the
    # nearest class may be one whose first linearisation was poor); once the best is within reach,
    # bisect between the failed trial and the best (closer than the best: the norm is convex).
    failed = ~adversarial & ~seeding
    failures = jnp.where(failed, state.failures + 1, 0)
    next_trial = jnp.where(seeding, best, _after_projection(state, projection, failed, failures, best, best_l2,
                                                            lower, upper, config))
    converged = (adversarial & ~seeding
                 & (jnp.linalg.norm(projection - z) <= config.rtol * jnp.maximum(l2, jnp.finfo(dtype).tiny)))
    steps = state.steps + 1

    # A piecewise-linear model (ReLU, max pooling) changes its linearisation from one trial to the next,
    # and the projections stall short of the minimum. Then walk along the boundary as DDN does: a step along ∇m of `walk_step` × the
    # radius, back onto the sphere of that radius about x, and the radius shrinks while the walk is
    # adversarial and grows while it is not, both annealed; the best point seen stays the result.
    # It takes over when the SQP has used its steps or, with a walk to follow, has come no closer in
    # `patience` evaluations (seeds aside: they evaluate the same point).
    stuck, idle = steps >= config.steps, state.idle
    if config.walk_steps > 0:         # (static: the targeted default's loop body stays as small as before)
        progress = best_l2 < (1 - config.rtol) * state.best_l2
        idle = jnp.where(progress | seeding | (state.seeds[0] >= 0), 0, state.idle + 1)
        stuck = stuck | (idle >= config.patience)
    stalled = ~state.walking & ~converged & stuck & jnp.isfinite(best_l2)
    walking = state.walking | (stalled & (config.walk_steps > 0))
    walked, radius = state.walked, state.radius
    if config.walk_steps > 0:
        on_sphere, shrunk = _walk_point(state, grad, adversarial, best_l2, lower, upper, config)
        walked = walked + state.walking
        seeds = jnp.where(stalled, -1, seeds)                 # the walk follows the top competitor
        next_trial = jnp.where(stalled, best, jnp.where(state.walking, on_sphere, next_trial))
        radius = jnp.where(stalled, best_l2, jnp.where(state.walking, shrunk, radius))
    done = (state.done | (converged & ~state.walking) | (stuck & ~walking)
            | (state.walking & (walked >= config.walk_steps)) | ~jnp.isfinite(best_l2))
    new = RefineState(
        origin=state.origin, anchor=state.anchor, best=best, best_l2=best_l2,
        trial=jnp.where(done, best, next_trial), failures=failures.astype(jnp.int32), idle=idle.astype(jnp.int32),
        cuts=cuts, offsets=offsets, cut_class=cut_class, newest=jnp.where(usable & ~jnp.any(has_slot), slot,
                                                                             state.newest).astype(jnp.int32),
        multipliers=multipliers, seeds=seeds, walking=walking, radius=radius.astype(dtype),
        walked=walked.astype(jnp.int32), steps=steps, done=done)
    return jax.tree.map(lambda old, upd: jnp.where(state.done, old, upd), state, new)


def _store_cut(state: RefineState, logits, grad, j, config: RefineConfig):
    """Keep the cut a·z' ≥ a·z − m_j(z) + margin (a = grad at z = the trial) in class j's slot, or the oldest.

    Returns (cuts, offsets, cut_class, whether the cut was usable, whether
    class j had a slot, the slot written).
    """
    m_j = logits[state.anchor] - logits[j]
    m_j = -m_j if config.untargeted else m_j
    usable = jnp.isfinite(m_j) & jnp.all(jnp.isfinite(grad)) & (jnp.vdot(grad, grad) > 0)
    has_slot = state.cut_class == j
    slot = jnp.where(jnp.any(has_slot), jnp.argmax(has_slot), (state.newest + 1) % config.cuts)
    slot = jnp.where(usable, slot, state.newest)
    onehot = (jnp.arange(config.cuts) == slot) & usable
    cuts = jnp.where(onehot[:, None], grad[None, :], state.cuts)
    offsets = jnp.where(onehot, jnp.vdot(grad, state.trial) - m_j + config.margin, state.offsets)
    cut_class = jnp.where(onehot, j, state.cut_class)
    return cuts, offsets, cut_class, usable, has_slot, slot


def _after_projection(state: RefineState, projection, failed, failures, best, best_l2, lower, upper,
                      config: RefineConfig):
    """The next trial after a projection: the projection itself after an adversarial trial; after a failed
    one, the projection pushed further from x while that is still closer than the best, else the
    midpoint between the failed trial and the best."""
    overshoot = config.overshoot * 2.0 ** jnp.minimum(failures - 1, 10).astype(state.trial.dtype)
    extrapolated = jnp.clip(state.origin + (1 + overshoot) * (projection - state.origin), lower, upper)
    extrapolate = failed & (jnp.linalg.norm(extrapolated - state.origin) < best_l2)
    bisect = failed & ~extrapolate & jnp.isfinite(best_l2)
    return jnp.where(extrapolate, extrapolated, jnp.where(bisect, 0.5 * (state.trial + best), projection))


def _next_seeds(state: RefineState, logits, j, config: RefineConfig):
    """The classes still to linearise at the best point: untargeted, after the first evaluation at the
    found point, the next-best classes other than the anchor and j (at most cuts - 1 of them), then -1s."""
    seeds = jnp.concatenate([state.seeds[1:], jnp.full((1,), -1, jnp.int32)])
    if config.untargeted:
        ranked = jnp.argsort(-jnp.where((jnp.arange(logits.shape[-1]) == state.anchor)
                                        | (jnp.arange(logits.shape[-1]) == j), -jnp.inf, logits))
        count = min(config.cuts - 1, logits.shape[-1] - 2)
        planned = jnp.full((config.cuts,), -1, jnp.int32).at[:count].set(ranked[:count].astype(jnp.int32))
        seeds = jnp.where(state.steps == 0, planned, seeds)
    return seeds


def _walk_point(state: RefineState, grad, adversarial, best_l2, lower, upper, config: RefineConfig):
    """(the walk's next point, its new radius): a step along ∇m_j, back onto the sphere about x, in the box."""
    dtype, radius = state.trial.dtype, state.radius
    anneal = 0.01 + 0.99 * 0.5 * (1 + jnp.cos(jnp.pi * state.walked / config.walk_steps))
    gamma = config.walk_gamma * anneal
    shrunk = jnp.where(adversarial, jnp.minimum(radius, best_l2) * (1 - gamma), radius * (1 + gamma))
    ascent = grad / jnp.maximum(jnp.linalg.norm(grad), jnp.finfo(dtype).tiny)
    away = state.trial + config.walk_step * anneal * shrunk * ascent - state.origin
    on_sphere = jnp.clip(state.origin + shrunk * away / jnp.maximum(jnp.linalg.norm(away), jnp.finfo(dtype).tiny),
                         lower, upper)
    return on_sphere, shrunk


def _project(origin, cuts, offsets, valid, lower, upper, multipliers, config):
    """Targeted: onto all valid cuts at once. Untargeted: onto each valid cut alone; keep the nearest."""
    if not config.untargeted:
        return project_onto_cuts(origin, cuts, offsets, valid, lower, upper, multipliers, config.dual_iterations)
    single = jax.vmap(lambda a, b, v, mu: project_onto_cuts(origin, a[None], b[None], v[None], lower, upper, mu[None],
                                                            config.dual_iterations))
    points, mus = single(cuts, offsets, valid, multipliers)
    distance = jnp.where(valid, jnp.sum((points - origin) ** 2, axis=-1), jnp.inf)
    nearest = jnp.argmin(distance)
    return jnp.where(jnp.any(valid), points[nearest], origin), mus[:, 0]


class RefineResult(NamedTuple):
    """What `refine_core` returns per image: the closest adversarial point seen and its cost."""
    best: jax.Array          # [N, n] the closest adversarial point seen (the start where none was given)
    l2: jax.Array            # [N] its distance to the image
    evaluations: jax.Array   # [N] gradients spent on the image


class RefineInputs(NamedTuple):
    """One image's refinement problem, flat: x, its adversarial start, anchor, success, and the box ([] or [n])."""
    origin: jax.Array
    start: jax.Array
    anchor: jax.Array
    success: jax.Array
    lower: jax.Array
    upper: jax.Array


def refine_lanes(logits_one, num_classes: int, config: RefineConfig) -> LaneAttack:
    """The refinement of one image as pure `init`/`step`/`done` functions (`jaxadv.attacks.lanes`).

    The state is a (`RefineInputs`, `RefineState`) pair; each step evaluates
    the model and one constraint's gradient at the trial point and `tell`s
    them. logits_one: the model on one flat image, [n] -> [classes].
    """
    def start(problem: RefineInputs):
        return problem, init(problem.origin, problem.start, problem.anchor, num_classes, config,
                             success=problem.success)

    def step(lane):
        problem, state = lane
        logits, pullback = jax.vjp(logits_one, state.trial)
        j = linearise_class(state, logits)
        (grad,) = pullback(constraint_cotangent(state.anchor, j, num_classes, config.untargeted, logits.dtype))
        dtype = state.trial.dtype           # a model may promote (x64): work in the images' dtype
        return problem, tell(state, logits.astype(dtype), grad, j, problem.lower, problem.upper, config)

    def done(lane):
        return lane[1].done

    def output(lane):
        return lane[1].best, lane[1].steps

    return LaneAttack(start, step, done, output)


def refine_core(logits_fn, origins, starts, anchors, success, lower=0.0, upper=1.0, *,
                config: RefineConfig = RefineConfig(), lanes: int | None = None, shape=None) -> RefineResult:
    """Refine many images in `lanes` lanes (traceable; `jaxadv.attacks.lbfgs_attack_core` calls it).

    origins, starts: [N, n] flat images and their adversarial points; anchors:
    [N] targets (or true labels with config.untargeted); success: [N] whether
    starts[i] is adversarial (images without one are passed through);
    lower, upper: scalars, [N] (one per image) or [N, n]; shape: one image's
    shape for logits_fn. A lane whose image is done takes the next one
    (`jaxadv.attacks.lanes.run_lanes`), so an image's result does not depend
    on its lane or on the rest of the batch.
    """
    num_images, n = origins.shape
    shape = (n,) if shape is None else tuple(shape)
    lanes = num_images if lanes is None else lanes
    dtype = origins.dtype
    num_classes = jax.eval_shape(logits_fn, jax.ShapeDtypeStruct((1,) + shape, dtype)).shape[-1]
    attack = refine_lanes(lambda x: logits_fn(x.reshape((1,) + shape))[0], num_classes, config)
    problems = RefineInputs(origins, starts, anchors.astype(jnp.int32), jnp.asarray(success, bool),
                            *(jnp.broadcast_to(jnp.asarray(b, dtype), (num_images,) + jnp.shape(b)[1:])
                              for b in (lower, upper)))
    best, evaluations = run_lanes(attack, problems, lanes,
                                  max_steps=(-(-num_images // lanes) + 1) * (config.steps + config.walk_steps + 1))
    return RefineResult(best=best, l2=jnp.linalg.norm(best - origins, axis=-1), evaluations=evaluations)
