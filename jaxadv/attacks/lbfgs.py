"""The paper's box-constrained L-BFGS attack, batched: one compiled program over many images.

For an image x and a target label l, Szegedy et al. (§4.1) minimise

    c · |r| + loss_f(x + r, l)    subject to  x + r ∈ [0, 1]^m

and search c for "the minimum c > 0" whose minimiser is classified as l. A
larger c weighs |r| more and gives a smaller r, so the smallest distortion
comes from the *largest* c that still succeeds; that is the reading we keep
(as DeepRobust does; CleverHans, advertorch and Foolbox put the constant on
the loss and look for the smallest one, which is the same thing).

The c search of one image is written as pure per-image functions
(`search_lanes`: init/step/done on a `SearchState`) and run on the lane loop
of `jaxadv.attacks.lanes`, as is the refinement that follows it
(`boundary.refine_lanes`). Each step evaluates the objective and its gradient
once (one batched vmap(value_and_grad) over the lanes) and advances the
image's own box-constrained L-BFGS (one update of the optax transformation
`jaxadv.optim.box_lbfgs`). When an image's L-BFGS run ends, its c search
records the run (success, and the best successful image so far), moves its c
bracket and restarts L-BFGS with the new c from a warm start (by default the
best successful point so far, keeping the L-BFGS memory moved to the new c).
No image's arithmetic depends on another's, so the result for an image is the
same alone or in any batch (at a fixed lane count).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxadv import box_lbfgs, checks, optim
from jaxadv.attacks import boundary
from jaxadv.attacks.config import UNTARGETED, AttackConfig, check_config
from jaxadv.attacks.lanes import LaneAttack, run_lanes

_L2_SMOOTHING = 1e-12  # |r| = sqrt(Σr² + 1e-12): differentiable at r = 0, below float32 resolution elsewhere


class AttackResult(NamedTuple):
    """Per-image results (leading axis = batch).

    adversarial: the returned image, same shape as the input: the successful
      run with the smallest distortion, or, if no run succeeded, the last
      run's iterate (the smallest c tried).
    success: argmax of logits_fn(adversarial) == target, recomputed on the
      returned image.
    l2: ‖adversarial − x‖₂; distortion: the paper's sqrt(Σ(x'−x)²/n), n the
      number of input values per image.
    c: the c of the returned run; iterations, evaluations: accepted L-BFGS
      steps and function evaluations (each one batched value-and-gradient),
      summed over every run of the c search and the refinement.
    search_distortion: the distortion of the c search's result before the
      refinement (the paper's estimate; inf where the search failed). With
      refine_steps = 0 it equals `distortion` wherever the attack succeeded.
    """
    adversarial: jax.Array
    success: jax.Array
    l2: jax.Array
    distortion: jax.Array
    c: jax.Array
    iterations: jax.Array
    evaluations: jax.Array
    search_distortion: jax.Array


# Fields of the L-BFGS state that a restart resets; the memory arrays stay (rho = 0 empties them).
_RESTART_FIELDS = ("x", "trial", "step", "line_search_steps", "iterations", "evaluations", "has_value",
                   "accepted", "steepest", "done", "status", "rho", "gamma")


class SearchInputs(NamedTuple):
    """One image's problem for the c search, flat: origin [n], target, first c, and the box ([] or [n])."""
    origin: jax.Array
    target: jax.Array
    first_c: jax.Array
    lower: jax.Array
    upper: jax.Array


class SearchState(NamedTuple):
    """The c search of one image: its L-BFGS run at the current c and the bracket around the largest c that succeeds."""
    problem: SearchInputs
    opt: box_lbfgs.BoxLBFGSState
    c: jax.Array            # c of the current run
    lo: jax.Array           # largest c that succeeded (0: none yet)
    hi: jax.Array           # smallest c that failed (inf: none yet)
    bracket_steps: jax.Array
    bisections: jax.Array
    x_is_adversarial: jax.Array   # prediction at opt.x == target (from the evaluation that produced opt.x)
    best: jax.Array         # [n] best successful point so far (else the last run's point)
    best_l2: jax.Array      # inf until a run succeeds
    best_c: jax.Array
    iterations: jax.Array
    evaluations: jax.Array
    searching: jax.Array


class SearchOutput(NamedTuple):
    """What the search keeps of an image: its best point, the c that gave it, its cost, and whether it succeeded."""
    best: jax.Array
    c: jax.Array
    iterations: jax.Array
    evaluations: jax.Array
    success: jax.Array


def _penalty(r, kind):
    squared = jnp.sum(r * r)
    if kind == "l2_squared":
        return squared
    # 1e-12 is 0 in float16, and the gradient at r = 0 then NaN: there, the smallest normal number.
    return jnp.sqrt(squared + max(_L2_SMOOTHING, float(jnp.finfo(r.dtype).tiny)))


def _cross_entropy(logits, target):
    return jax.nn.logsumexp(logits) - logits[target]


def _not_label_loss(logits, label):
    """-log(1 - p_label): the untargeted counterpart of the cross-entropy; small once any class beats the label."""
    return jax.nn.logsumexp(logits) - jax.nn.logsumexp(boundary.without_class(logits, label))


def attack_objective(logits_one: Callable, config: AttackConfig = AttackConfig(), untargeted: bool = False):
    """The function the c search minimises for one image: objective(x, origin, c, anchor) -> (value, logits).

    value = c · penalty(x − origin) + loss(logits_one(x), anchor), with the
    penalty of `config.search.penalty` and the loss the cross-entropy toward
    the target (targeted) or −log(1 − p_label) (untargeted, anchor = the
    label). logits_one: the model on one flat image, [n] -> [classes].
    Public so that a benchmark times the very function the attack
    differentiates (scripts/bench_attack.py: its raw batched value-and-gradient).
    """
    if not callable(logits_one):
        raise TypeError(f"logits_one: expected a callable, got {type(logits_one).__name__}")
    check_config(config)
    checks.one_of(untargeted, (False, True), "untargeted")
    loss_fn = _not_label_loss if untargeted else _cross_entropy

    def objective(x, origin, c, anchor):
        logits = logits_one(x)
        return c * _penalty(x - origin, config.search.penalty) + loss_fn(logits, anchor), logits

    return objective


def search_lanes(logits_one, config: AttackConfig, untargeted: bool) -> LaneAttack:
    """The c search of one image as pure `init`/`step`/`done` functions (`jaxadv.attacks.lanes`).

    logits_one: the model on one flat image, [n] -> [classes]. Each step is
    one value and gradient of c·penalty(r) + loss(x + r) and one L-BFGS
    update; when a run ends, the step records it (success, the best
    successful point), moves the c bracket and restarts L-BFGS at the next c
    from the warm start (see `AttackConfig`), or ends the search.
    """
    lbfgs_config = config.lbfgs
    value_and_grad = jax.value_and_grad(attack_objective(logits_one, config, untargeted), has_aux=True)

    def solver(problem: SearchInputs):
        return optim.box_lbfgs(problem.lower, problem.upper, **lbfgs_config._asdict())    # the image's own box

    def init(problem: SearchInputs) -> SearchState:
        dtype, zero = problem.origin.dtype, jnp.zeros((), jnp.int32)
        return SearchState(problem, solver(problem).init(problem.origin), c=problem.first_c, lo=jnp.zeros((), dtype),
                           hi=jnp.asarray(jnp.inf, dtype), bracket_steps=zero, bisections=zero,
                           x_is_adversarial=jnp.zeros((), bool), best=problem.origin,
                           best_l2=jnp.asarray(jnp.inf, dtype), best_c=problem.first_c, iterations=zero,
                           evaluations=zero, searching=jnp.ones((), bool))

    def step(s: SearchState) -> SearchState:
        problem = s.problem
        # 1. one value and gradient at the trial point, one L-BFGS update (the optax update; the next
        #    trial is read from the state, exact, where params + updates would round)
        (value, logits), grad = value_and_grad(s.opt.trial, problem.origin, s.c, problem.target)
        opt = solver(problem).update(grad, s.opt, s.opt.trial, value=value)[1]
        x_is_adversarial = jnp.where(opt.accepted, boundary.is_adversarial(logits, problem.target, untargeted),
                                     s.x_is_adversarial)
        # 2. a run that just ended: record it (until one succeeds, keep the last run's point: the smallest
        #    c tried so far) and move the c bracket
        ended = s.searching & opt.done
        success, failure = ended & x_is_adversarial, ended & ~x_is_adversarial
        l2 = jnp.linalg.norm(opt.x - problem.origin)
        better = success & (l2 < s.best_l2)
        take = better | (ended & ~jnp.isfinite(s.best_l2))
        lo = jnp.where(success, jnp.maximum(s.lo, s.c), s.lo)
        hi = jnp.where(failure, jnp.minimum(s.hi, s.c), s.hi)
        was_bracketed, bracketed = (s.lo > 0) & jnp.isfinite(s.hi), (lo > 0) & jnp.isfinite(hi)
        bisections = s.bisections + (ended & was_bracketed)
        bracket_steps = s.bracket_steps + (ended & ~bracketed)
        next_c = jnp.where(bracketed, jnp.sqrt(lo * hi),
                           jnp.where(jnp.isfinite(hi), s.c / config.search.growth, s.c * config.search.growth))
        finished = ended & ((bracketed & (bisections >= config.search.bisection_steps))
                            | (~bracketed & (bracket_steps > config.search.max_bracket_steps)))
        again = ended & ~finished
        delta_c = jnp.where(again, next_c - s.c, 0.0)
        s = s._replace(
            opt=opt, c=jnp.where(again, next_c, s.c), lo=lo, hi=hi, bracket_steps=bracket_steps,
            bisections=bisections, x_is_adversarial=x_is_adversarial & ~again,
            best=jnp.where(take, opt.x, s.best), best_l2=jnp.where(better, l2, s.best_l2),
            best_c=jnp.where(take, s.c, s.best_c), iterations=s.iterations + (opt.iterations - s.opt.iterations),
            evaluations=s.evaluations + s.searching.astype(jnp.int32), searching=s.searching & ~finished)
        # 3. the next run at the new c restarts L-BFGS from the warm start
        return s._replace(opt=_next_run(s, again, delta_c, config))

    def done(s: SearchState):
        return ~s.searching

    def output(s: SearchState) -> SearchOutput:
        return SearchOutput(s.best, s.best_c, s.iterations, s.evaluations, jnp.isfinite(s.best_l2))

    return LaneAttack(init, step, done, output)


def _next_run(s: SearchState, again, delta_c, config: AttackConfig) -> box_lbfgs.BoxLBFGSState:
    """The L-BFGS state of the search's next run where `again`, else `s.opt` (delta_c: the move of c, 0 if not)."""
    problem = s.problem
    start = {"best": jnp.where(again, s.best, problem.origin), "last": jnp.where(again, s.opt.x, problem.origin),
             "none": problem.origin}[config.search.warm_start]
    fresh = box_lbfgs.restart(s.opt, start, problem.lower, problem.upper)   # a new c: the search's own move
    opt = s.opt
    if config.search.keep_memory and config.search.penalty == "l2_squared":
        # (delta_c is 0 outside `again`: those pairs and Gram matrices stay bit for bit.)
        fresh, opt = _keep_memory(fresh, s.opt, delta_c, again)
    return opt._replace(**{f: jnp.where(again, getattr(fresh, f), getattr(opt, f)) for f in _RESTART_FIELDS})


@functools.partial(jax.jit, static_argnames=("config", "untargeted"))
def lbfgs_attack_core(logits_fn, images, targets, lower, upper, initial_c=None,
                      config: AttackConfig = AttackConfig(), untargeted: bool = False) -> AttackResult:
    """The compiled attack on already validated arrays (no checks: see `lbfgs_attack`).

    logits_fn: a `jax.tree_util.Partial` (its arrays are traced, so new
      parameters reuse the compilation) or any hashable callable; it maps
      [B, *shape] -> [B, classes]. images: [N, *shape] float; targets: [N]
      int32; lower, upper: scalars or arrays of shape [N, *shape];
      initial_c: None (config.search.initial_c) or [N] per-image first c.
    Safe to call inside jit / shard_map / lax.map (static shapes only).

    `config.lanes` images are searched at a time (all N if None), then
    refined at a time, each on `jaxadv.attacks.lanes.run_lanes`: a lane
    whose image is done takes the next one waiting.
    """
    num_images, shape = images.shape[0], images.shape[1:]
    n, dtype = math.prod(shape), images.dtype
    # A fixed lane count (idle lanes when N < lanes) keeps every step's shapes, and so XLA's
    # rounding, independent of N: an image gets the same bits alone or in any batch.
    lanes = num_images if config.lanes is None else config.lanes
    pool, targets = images.reshape(num_images, n), targets.astype(jnp.int32)
    first_c = (jnp.full((num_images,), config.search.initial_c, dtype) if initial_c is None
               else jnp.broadcast_to(jnp.asarray(initial_c, dtype), (num_images,)))
    lower_flat, upper_flat = _per_image_bound(lower, images.shape, dtype), _per_image_bound(upper, images.shape, dtype)
    out = run_lanes(search_lanes(lambda x: logits_fn(x.reshape((1,) + shape))[0], config, untargeted),
                    SearchInputs(pool, targets, first_c, lower_flat, upper_flat), lanes,
                    max_steps=config.step_cap() * (-(-num_images // lanes)))

    scale = jnp.sqrt(jnp.asarray(n, dtype))
    search_l2 = jnp.where(out.success, jnp.linalg.norm(out.best - pool, axis=-1), jnp.inf)
    best, evaluations = out.best, out.evaluations
    if config.refine.steps > 0:
        # Its own lane loop: the search's steps stay as cheap as without it, and its lanes do nothing else.
        refined = boundary.refine_core(logits_fn, pool, best, targets, out.success, lower_flat, upper_flat,
                                       config=config.refine_config(untargeted), lanes=lanes, shape=shape)
        best, evaluations = refined.best, evaluations + refined.evaluations
    adversarial = best.reshape(images.shape)
    logits = logits_fn(adversarial)
    success = jax.vmap(functools.partial(boundary.is_adversarial, untargeted=untargeted))(logits, targets)
    l2 = jnp.linalg.norm(best - pool, axis=-1)
    result = AttackResult(adversarial=adversarial, success=success, l2=l2, distortion=l2 / scale,
                          c=out.c, iterations=out.iterations, evaluations=evaluations,
                          search_distortion=search_l2 / scale)
    if untargeted and config.search.runner_ups > 0:
        result = _with_runner_ups(logits_fn, images, targets, (lower, upper), initial_c, config, result,
                                  found=jnp.argmax(logits, axis=-1))
    return result


def _with_runner_ups(logits_fn, images, labels, bounds, initial_c, config, result, found) -> AttackResult:
    """The untargeted result, or a targeted run's toward a runner-up class where that one is closer.

    The untargeted search settles in the basin of whichever class its path
    reaches first, and another class's boundary may be closer. The runner-ups are the
    classes nearest by DeepFool's linear estimate at x, (Z_y − Z_j)/‖∇(Z_y − Z_j)‖,
    other than the class found (what one or two of them gain: docs/benchmarks.md).
    """
    distance = _linear_distances(logits_fn, images, labels, config.lanes)
    classes = jnp.arange(distance.shape[-1])
    # The label alone sorts last (inf); the class found, and classes without an estimate (a flat or
    # dead region: 0/0 or x/0), sort just before it. So a target is never the label.
    distance = jnp.where(~jnp.isfinite(distance) | ((classes == found[:, None]) & result.success[:, None]),
                         jnp.finfo(distance.dtype).max, distance)
    distance = jnp.where(classes == labels[:, None], jnp.inf, distance)
    order = jnp.argsort(distance, axis=-1, stable=True)
    iterations, evaluations = result.iterations, result.evaluations + distance.shape[-1]
    for k in range(min(config.search.runner_ups, distance.shape[-1] - 2)):
        target = order[:, k]
        run = lbfgs_attack_core(logits_fn, images, target, *bounds, initial_c, config=config, untargeted=False)
        closer = run.success & (target != labels) & (~result.success | (run.l2 < result.l2))
        iterations, evaluations = iterations + run.iterations, evaluations + run.evaluations
        result = _where(closer, run, result)
    return result._replace(iterations=iterations, evaluations=evaluations)


def _linear_distances(logits_fn, images, labels, lanes):
    """[N, classes]: (Z_y − Z_j)/‖∇(Z_y − Z_j)‖ at each image (one Jacobian: `classes` gradients per image).

    Computed in blocks of `lanes` images, padded, so that an image's value does not depend on its batch.
    """
    num_images, shape = images.shape[0], images.shape[1:]
    lanes = num_images if lanes is None else lanes

    def one(x, label):
        logits, pullback = jax.vjp(lambda v: logits_fn(v[None])[0], x)
        (jacobian,) = jax.vmap(pullback)(jnp.eye(logits.shape[-1], dtype=logits.dtype))
        jacobian = jacobian.reshape(logits.shape[-1], -1)
        return (logits[label] - logits) / jnp.linalg.norm(jacobian[label] - jacobian, axis=-1)

    blocks = -(-num_images // lanes)
    pad = blocks * lanes - num_images
    x = jnp.concatenate([images, jnp.broadcast_to(images[:1], (pad,) + shape)]).reshape((blocks, lanes) + shape)
    y = jnp.concatenate([labels, jnp.broadcast_to(labels[:1], (pad,))]).reshape(blocks, lanes)
    return jax.lax.map(lambda xy: jax.vmap(one)(*xy), (x, y)).reshape(blocks * lanes, -1)[:num_images]


def _keep_memory(fresh: box_lbfgs.BoxLBFGSState, old: box_lbfgs.BoxLBFGSState, delta_c, keep):
    """(`fresh` with `old`'s memory if `keep`, `old` with its memory moved to the new c), for one image.

    The penalty c·‖r‖² has Hessian 2c·I, so a new c changes every curvature
    pair exactly: y_j -> y_j + 2Δc·s_j (the loss part is unchanged). The Gram
    matrices follow in closed form; a pair whose s·y is no longer positive is
    dropped (rho = 0), as `tell` would not have stored it. The y themselves
    move in the next `tell` (`y_shift`), in its pass that stores the new pair.
    """
    ss, sy, yy = old.gram[0], old.gram[1], old.gram[2]
    sy_new = sy + 2.0 * delta_c * ss
    yy_new = yy + 2.0 * delta_c * (sy + sy.T) + 4.0 * delta_c * delta_c * ss
    eye = jnp.eye(ss.shape[-1], dtype=ss.dtype)
    s_dot_y = jnp.sum(sy_new * eye, axis=-1)          # diagonals, as one fused multiply-reduce
    y_dot_y = jnp.sum(yy_new * eye, axis=-1)
    valid = (old.rho != 0) & (s_dot_y > jnp.finfo(s_dot_y.dtype).eps * y_dot_y) & (y_dot_y > 0)
    rho = jnp.where(valid, 1.0 / jnp.where(valid, s_dot_y, 1.0), 0.0)
    newest = (jnp.arange(ss.shape[-1]) == old.newest) & valid
    gamma = jnp.where(jnp.any(newest), jnp.sum(jnp.where(newest, s_dot_y / jnp.where(valid, y_dot_y, 1.0), 0.0)),
                      old.gamma)
    moved = old._replace(y_shift=2.0 * delta_c, gram=jnp.stack([ss, sy_new, yy_new]))
    return fresh._replace(rho=jnp.where(keep, rho, fresh.rho), gamma=jnp.where(keep, gamma, fresh.gamma)), moved


def _where(mask, a, b):
    """jnp.where with a [lanes] mask broadcast over the trailing axes of every leaf."""
    return jax.tree.map(lambda u, v: jnp.where(mask.reshape(mask.shape + (1,) * (u.ndim - 1)), u, v), a, b)


def _per_image_bound(bound, images_shape, dtype):
    """A bound per image: [N] (one scalar each) or [N, n] (flat)."""
    bound = jnp.asarray(bound, dtype)
    if bound.ndim == 0:
        return jnp.broadcast_to(bound, images_shape[:1])
    return jnp.broadcast_to(bound, images_shape).reshape(images_shape[0], -1)


def lbfgs_attack(logits_fn: Callable, images, targets, config: AttackConfig = AttackConfig(),
                 lower=0.0, upper=1.0, *, labels=None, initial_c=None, params=None) -> AttackResult:
    """Smallest box-constrained perturbations that `logits_fn` classifies as `targets`.

    logits_fn: the model. A pure function [B, *shape] -> [B, classes], or,
      with `params`, a flax module (params: its variables) or a function
      apply(params, x) (`jaxadv.functional.logits_function`: parameters are
      traced, so new parameters of one architecture reuse the compilation).
    images: [B, *shape] floating, inside [lower, upper]; targets: [B] ints in
      [0, classes); labels (optional): the true classes, which targets must differ from.
    lower, upper: scalars or arrays broadcastable to images (e.g. [0, inf)
      for a ReLU layer's output).
    initial_c: optional scalar or [B] per-image first c (overrides
      config.search.initial_c without recompiling; with max_bracket_steps = 0
      and bisection_steps = 0 this solves the problem at a fixed c per image).

    Inputs are checked in NumPy before anything is compiled (ValueError or
    TypeError naming the argument). Inside jit/shard_map (traced inputs) only
    the static checks (shapes, dtypes, config) run.
    """
    return _attack(logits_fn, images, targets, config, lower, upper, labels, initial_c, untargeted=False,
                   params=params)


def lbfgs_attack_untargeted(logits_fn: Callable, images, labels, config: AttackConfig = UNTARGETED,
                            lower=0.0, upper=1.0, *, initial_c=None, params=None) -> AttackResult:
    """Smallest box-constrained perturbations that change the label at all.

    First one untargeted run per image: the c search minimises
    c‖r‖² − log(1 − p_label(x + r)) (the untargeted counterpart of the
    cross-entropy: small once any class beats the label), and the refinement
    projects onto the nearest class boundary it has linearised (the top
    classes at the found point, see `boundary`), walking along the boundary
    where the projections stall. That run settles in the basin of the class
    its path reaches first, which is not always the nearest, so
    `config.search.runner_ups` targeted runs (default 1) then try the classes nearest
    by the linear estimate at x other than the one found, and each image keeps
    the closest success. Success means argmax ≠ label. The default config is
    `UNTARGETED` (the c search stops at its bracket). Measured cost and
    optimality against the all-targets minimum and Foolbox's attacks:
    scripts/bench_optimality.py and the README.
    labels: [B] the true classes (or the model's predictions).
    logits_fn, params: the model, as for `lbfgs_attack`.
    """
    return _attack(logits_fn, images, labels, config, lower, upper, None, initial_c, untargeted=True,
                   params=params)


def _attack(logits_fn, images, targets, config, lower, upper, labels, initial_c, untargeted, params):
    check_config(config)
    checked = checks.attack_inputs(logits_fn, images, targets, lower, upper, params=params, logits=False,
                                   labels_name="labels" if untargeted else "targets")
    batch, dtype = checked.images.shape[0], checks.work_dtype(checked.images)
    if labels is not None:
        true_labels = checks.labels(labels, batch, checked.num_classes, "labels")
        if not checks.is_traced(true_labels, checked.labels) and np.any(true_labels == checked.labels):
            same = true_labels == checked.labels
            raise ValueError(f"targets: equal to the true label for {int(np.sum(same))} image(s), "
                             f"e.g. index {int(np.argmax(same))}; an attack needs a wrong target")
    checks.positive_finite(config.search.initial_c, dtype, "config.search.initial_c")
    if initial_c is not None:
        initial_c = jnp.asarray(checks.positive_finite(initial_c, dtype, "initial_c", shape=(batch,)), dtype)
    checks.finite_logits(checked.logits_fn, checked.images)      # the one forward pass, after the cheap checks
    return lbfgs_attack_core(checked.logits_fn, jnp.asarray(checked.images, dtype),
                             jnp.asarray(checked.labels, jnp.int32), _bound_arg(checked.lower, checked.images.shape),
                             _bound_arg(checked.upper, checked.images.shape), initial_c, config=config,
                             untargeted=untargeted)


def _bound_arg(bound, images_shape):
    """A checked bound (work dtype, rounded inward) as a scalar or an array of the images' shape."""
    bound = jnp.asarray(bound)
    return bound if bound.ndim == 0 else jnp.broadcast_to(bound, images_shape)
