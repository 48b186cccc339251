"""The batched attack against a per-image scipy L-BFGS-B loop on the same problems, in one process.

    python scripts/bench_attack.py [--num-images 1000] [--scipy-images 100] [--workdir runs/fashion_mnist]
                                   [--data-dir DIR] [--lanes N] [--repeats 3] [--baseline-commit a3b0177]
                                   [--no-optax] [--out bench_attack.json]

Problems: the first --num-images Fashion-MNIST test images, random wrong
targets (seed --seed), the trained FC100-100-10 from WORKDIR/models (trained
and stored there by `jaxadv.zoo.trained_models` if missing).

(a) `lbfgs_attack` with the default AttackConfig, all images in one compiled
    program; compile time measured apart (ahead-of-time lower + compile).
    Beside it, the same with refine.steps=0: the c search alone, the paper's
    method, so the cost of the refinement reads as a ratio of images/s
    measured side by side; and the default attack of --baseline-commit (by
    default a3b0177, the attack before the refinement: its c search, without
    the later fixes that made the search itself faster), checked out of this
    repository's history with `git archive` and imported beside ours.
(b) a Python loop over images running scipy.optimize.minimize(method="L-BFGS-B",
    jac=True, bounds=[(0, 1)] * 784) on the same objective (a jitted float32
    single-image value-and-gradient), with the same c search (start, growth,
    bracket and bisection steps, largest successful c, best = smallest
    successful distortion, the same warm start of each run after the first)
    and the same L-BFGS memory, iteration cap, line search cap and
    tolerances. (scipy's minimize cannot carry its L-BFGS memory from one c
    to the next; lbfgs_attack's keep_memory does.)

(c) the naive "optax plus a projection" solver a user would try first:
    optax.lbfgs() (its zoom line search, --set memory_size) with
    optax.projections.projection_box into [0, 1] after each step, all images
    in one jit(vmap) of a lax.while_loop per run, on the first --scipy-images
    images (the vmapped loops wait for their slowest image: it is slow too),
    with the same c search
    (driven from NumPy between runs, every image in each run), warm starts and
    stopping rules (projected gradient <= gtol, relative decrease <= ftol,
    max_iterations). f and its gradient are evaluated again at each projected
    point: optax.value_and_grad_from_state would hand back the line search's
    values at the unprojected one. Compared with (a) without the refinement
    (the same c search), timed on the same images, and with (b).

The scipy loop runs on the first --scipy-images images (it is slow); (a) runs
on that subset too, so the images/s and distortion ratios compare the same
problems, and on all --num-images. Raw throughput: the attack's own batched
value-and-gradient at the batch shape the attack's loop uses (its lanes).
Every timing is the best of --repeats runs (the CPU may be shared; run it on a
quiet machine: the Python scipy loop suffers from load far more than (a)).
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxadv.report import write_json_atomic  # noqa: E402
from jaxadv.zoo import trained_models  # noqa: E402
from experiments.cli import run_main  # noqa: E402
from jaxadv.attacks import (ATTACK_LBFGS, AttackConfig, SearchConfig, lbfgs_attack,  # noqa: E402
                            random_wrong_targets)
from jaxadv.attacks.lbfgs import attack_objective, lbfgs_attack_core  # noqa: E402
from jaxadv.data import load_dataset  # noqa: E402

MODEL = "FC100-100-10"


def objective_fn(model, params, config):
    """The attack's own objective (targeted) on one flat image: objective(x, origin, c, target) -> value."""
    objective = attack_objective(lambda x: model.apply(params, x.reshape((1,) + model.input_shape))[0], config)
    return lambda x, origin, c, target: objective(x, origin, c, target)[0]


def run_batched(model, params, images, targets, config, repeats=3, core=None):
    """(result, compile seconds, steady-state seconds: the best of `repeats` runs) of lbfgs_attack_core
    (or of `core`, another version's, with its own config)."""
    logits_fn = jax.tree_util.Partial(model.apply, params)
    x, t = jnp.asarray(images), jnp.asarray(targets, jnp.int32)
    lower, upper = jnp.float32(0.0), jnp.float32(1.0)
    warm = AttackConfig(search=SearchConfig(bisection_steps=0, max_bracket_steps=0),
                        lbfgs=ATTACK_LBFGS._replace(max_iterations=1))
    lbfgs_attack(logits_fn, images[:1], targets[:1], warm)  # warm the imports
    tic = time.perf_counter()
    compiled = (core or lbfgs_attack_core).lower(logits_fn, x, t, lower, upper, None, config=config).compile()
    compile_seconds = time.perf_counter() - tic
    jax.block_until_ready(compiled(logits_fn, x, t, lower, upper, None))      # first run: page in buffers
    best = np.inf
    for _ in range(repeats):   # best of `repeats`, like the raw throughput and the scipy loop: the CPU is shared
        tic = time.perf_counter()
        result = jax.block_until_ready(compiled(logits_fn, x, t, lower, upper, None))
        best = min(best, time.perf_counter() - tic)
    return result, compile_seconds, best


def device_lanes() -> int:
    """The lanes `jaxadv.attacks.attack_sizes` gives this device for FC100-100-10 (32 on a CPU)."""
    from jaxadv.attacks import attack_sizes
    from jaxadv.models import get_model
    model = get_model(MODEL)
    logits_fn = jax.tree_util.Partial(model.apply, model.init(jax.random.PRNGKey(0)))
    return attack_sizes(logits_fn, np.zeros((10_000,) + tuple(model.input_shape), np.float32), AttackConfig()).lanes


def attack_at_commit(commit: str):
    """The module jaxadv.attacks.lbfgs as it was at `commit`, imported beside today's (None if git cannot).

    `git archive` copies that commit's jaxadv/attacks (and the solver's
    jaxadv/optim.py and jaxadv/box_lbfgs.py, where it has them) into a temporary folder
    as the package `_jaxadv_<commit>`, with its imports of both renamed to it,
    so both versions run in this process on the same inputs.
    """
    root = Path(__file__).resolve().parent.parent
    name = f"_jaxadv_{''.join(ch for ch in commit if ch.isalnum())}"
    folder = Path(tempfile.mkdtemp(prefix="bench_attack_"))
    solver = [path for path in ("jaxadv/optim.py", "jaxadv/box_lbfgs.py")
              if subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{commit}:{path}"],
                                capture_output=True).returncode == 0]
    archive = subprocess.run(["git", "-C", str(root), "archive", commit, "jaxadv/attacks"] + solver,
                             capture_output=True)
    if archive.returncode != 0:
        print(f"baseline {commit}: not in this checkout's history ({archive.stderr.decode().strip()}); skipped")
        return None
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(folder, filter="data")
    package = folder / name
    (folder / "jaxadv").rename(package)
    (package / "__init__.py").write_text("")
    for source in [*(package / "attacks").glob("*.py"), *package.glob("optim.py"), *package.glob("box_lbfgs.py")]:
        text = source.read_text().replace("jaxadv.attacks", f"{name}.attacks")
        text = text.replace("from jaxadv.box_lbfgs import", f"from {name}.box_lbfgs import")
        source.write_text(re.sub(r"^from jaxadv import (.+)$", lambda line: _split_import(line.group(1), name),
                                 text, flags=re.MULTILINE))
    sys.path.insert(0, str(folder))
    return importlib.import_module(f"{name}.attacks.lbfgs")


def _split_import(names: str, package: str) -> str:
    """`from jaxadv import a, b as c` with the archived solver modules imported from `package` instead."""
    parts = [part.strip() for part in names.split(",")]
    ours = [part for part in parts if part.split(" as ")[0] in ("optim", "box_lbfgs")]
    rest = [part for part in parts if part not in ours]
    lines = [f"from jaxadv import {', '.join(rest)}"] * bool(rest) + [f"from {package} import {', '.join(ours)}"] * bool(ours)
    return "\n".join(lines)


def raw_gradient_throughput(model, params, config, batch, repeats=50):
    """Evaluations per second of the attack's objective, jit(vmap(value_and_grad)) on `batch` images."""
    objective = objective_fn(model, params, config)
    value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(objective)))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(0, 1, (batch, 784)), jnp.float32)
    origin = jnp.asarray(rng.uniform(0, 1, (batch, 784)), jnp.float32)
    c = jnp.full((batch,), 0.5, jnp.float32)
    t = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    jax.block_until_ready(value_and_grad(x, origin, c, t))
    best = np.inf
    for _ in range(5):   # best of 5: the CPU is shared
        tic = time.perf_counter()
        for _ in range(repeats):
            out = value_and_grad(x, origin, c, t)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - tic) / repeats)
    return batch / best


def scipy_attack_one(value_and_grad, predict, x0, target, config):
    """The same c search as lbfgs_attack, each run a scipy L-BFGS-B from x0 or the same warm start."""
    flat = x0.reshape(-1).astype(np.float64)
    bounds = [(0.0, 1.0)] * flat.size
    options = dict(maxcor=config.lbfgs.memory_size, maxiter=config.lbfgs.max_iterations, maxls=config.lbfgs.max_line_search_steps,
                   ftol=config.lbfgs.ftol, gtol=config.lbfgs.gtol)
    c, lo, hi = config.search.initial_c, 0.0, np.inf
    bracket_steps = bisections = evaluations = 0
    best, best_l2, best_c = None, np.inf, c
    start = flat
    while True:
        def fun(z, c=c):
            v, g = value_and_grad(jnp.asarray(z, jnp.float32), x0.reshape(-1), np.float32(c), target)
            return float(v), np.asarray(g, np.float64)
        solution = scipy.optimize.minimize(fun, start, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
        evaluations += solution.nfev
        x = solution.x.astype(np.float32)
        success = int(predict(x)) == target
        l2 = float(np.linalg.norm(x - x0.reshape(-1)))
        # Until a run succeeds, keep the last run's point (the smallest c tried so far), as lbfgs_attack does.
        if (success and l2 < best_l2) or not np.isfinite(best_l2):
            best, best_c = x, c
            if success:
                best_l2 = l2
        # The same warm start as lbfgs_attack for the next run.
        start = {"best": best, "last": x}.get(config.search.warm_start, flat).astype(np.float64)
        was_bracketed = lo > 0 and np.isfinite(hi)
        lo, hi = (max(lo, c), hi) if success else (lo, min(hi, c))
        bracketed = lo > 0 and np.isfinite(hi)
        bisections += was_bracketed
        bracket_steps += not bracketed
        if bracketed and bisections >= config.search.bisection_steps:
            break
        if not bracketed and bracket_steps > config.search.max_bracket_steps:
            break
        c = np.sqrt(lo * hi) if bracketed else (c / config.search.growth if np.isfinite(hi) else c * config.search.growth)
    success = int(predict(best)) == target
    l2 = float(np.linalg.norm(best - x0.reshape(-1)))
    return success, l2, best_c, evaluations


def run_scipy(model, params, images, targets, config, repeats=3):
    objective = objective_fn(model, params, config)
    value_and_grad = jax.jit(jax.value_and_grad(objective))
    predict_jit = jax.jit(lambda x: jnp.argmax(model.apply(params, x.reshape((1,) + model.input_shape))[0]))
    predict = lambda x: predict_jit(jnp.asarray(x, jnp.float32))
    # Compile before timing.
    value_and_grad(jnp.asarray(images[0].reshape(-1)), images[0].reshape(-1), np.float32(1.0), int(targets[0]))
    predict(images[0])
    seconds = np.inf
    for _ in range(repeats):   # best of `repeats` (the runs are deterministic: same rows each time)
        rows = []
        tic = time.perf_counter()
        for x0, t in zip(images, targets):
            rows.append(scipy_attack_one(value_and_grad, predict, x0, int(t), config))
        seconds = min(seconds, time.perf_counter() - tic)
    success, l2, c, evaluations = map(np.array, zip(*rows))
    return dict(success=success, l2=l2, c=c, evaluations=evaluations), seconds


def optax_projected_run(objective, config):
    """One L-BFGS run per image at its own c, all images in lock step: optax.lbfgs, then projection_box into [0, 1].

    Returns jit(vmap(run))(start, origin, c, target) -> (x, evaluations, iterations).
    """
    solver = optax.lbfgs(memory_size=config.lbfgs.memory_size)

    def run(start, origin, c, target):
        f = lambda x: objective(x, origin, c, target)
        value_and_grad = jax.value_and_grad(f)

        def step(carry):
            x, state, value, grad, iterations, evaluations, _ = carry
            updates, state = solver.update(grad, state, x, value=value, grad=grad, value_fn=f)
            x_new = optax.projections.projection_box(optax.apply_updates(x, updates), 0.0, 1.0)
            value_new, grad_new = value_and_grad(x_new)   # at the projected point, not the line search's
            evaluations = evaluations + optax.tree.get(state, "num_linesearch_steps") + 1
            decrease = (value - value_new) / jnp.maximum(jnp.maximum(jnp.abs(value), jnp.abs(value_new)), 1.0)
            projected_gradient = jnp.max(jnp.abs(jnp.clip(x_new - grad_new, 0.0, 1.0) - x_new))
            done = ((projected_gradient <= config.lbfgs.gtol) | (decrease <= config.lbfgs.ftol)
                    | (iterations + 1 >= config.lbfgs.max_iterations))
            return x_new, state, value_new, grad_new, iterations + 1, evaluations, done

        value, grad = value_and_grad(start)
        carry = (start, solver.init(start), value, grad, jnp.int32(0), jnp.int32(1), jnp.bool_(False))
        x, *_, iterations, evaluations, _ = jax.lax.while_loop(lambda carry: ~carry[-1], step, carry)
        return x, evaluations, iterations

    return jax.jit(jax.vmap(run))


def optax_projected_attack(run, predict, images, targets, config):
    """The c search of lbfgs_attack (and of scipy_attack_one) in NumPy, vectorised over images, each run `run`."""
    origin = jnp.asarray(images.reshape(len(images), -1))
    n = len(images)
    c = np.full(n, config.search.initial_c, np.float32)
    lo, hi = np.zeros(n, np.float32), np.full(n, np.inf, np.float32)
    bracket_steps, bisections, evaluations = np.zeros(n, int), np.zeros(n, int), np.zeros(n, int)
    best, best_l2, best_c = np.asarray(origin).copy(), np.full(n, np.inf), c.copy()
    start, searching = np.asarray(origin), np.ones(n, bool)
    lockstep_steps = image_steps = 0   # steps of the vmapped loop (its slowest image's), and the images' own
    while searching.any():
        x, used, steps = map(np.asarray, run(jnp.asarray(start), origin, jnp.asarray(c), jnp.asarray(targets)))
        evaluations += np.where(searching, used, 0)
        lockstep_steps, image_steps = lockstep_steps + steps.max(), image_steps + steps[searching].sum()
        success = np.asarray(predict(jnp.asarray(x))) == targets
        l2 = np.linalg.norm(x - np.asarray(origin), axis=-1)
        take = searching & ((success & (l2 < best_l2)) | ~np.isfinite(best_l2))
        best[take], best_c[take] = x[take], c[take]
        best_l2 = np.where(take & success, l2, best_l2)
        start = {"best": best, "last": x}.get(config.search.warm_start, np.asarray(origin))
        was_bracketed = (lo > 0) & np.isfinite(hi)
        lo = np.where(searching & success, np.maximum(lo, c), lo)
        hi = np.where(searching & ~success, np.minimum(hi, c), hi)
        bracketed = (lo > 0) & np.isfinite(hi)
        bisections += searching & was_bracketed
        bracket_steps += searching & ~bracketed
        finished = searching & ((bracketed & (bisections >= config.search.bisection_steps))
                                | (~bracketed & (bracket_steps > config.search.max_bracket_steps)))
        searching &= ~finished
        c = np.where(searching, np.where(bracketed, np.sqrt(lo * hi), np.where(np.isfinite(hi), c / config.search.growth,
                                                                                c * config.search.growth)), c).astype(np.float32)
    success = np.asarray(predict(jnp.asarray(best))) == targets
    return dict(success=success, l2=np.linalg.norm(best - np.asarray(origin), axis=-1), c=best_c,
                evaluations=evaluations, lockstep_steps=int(lockstep_steps), mean_image_steps=image_steps / n)


def run_optax_projected(model, params, images, targets, config, repeats=3):
    objective = objective_fn(model, params, config)
    run = optax_projected_run(objective, config)
    predict = jax.jit(lambda x: jnp.argmax(model.apply(params, x.reshape((-1,) + model.input_shape)), -1))
    tic = time.perf_counter()
    optax_projected_attack(run, predict, images, targets, config)        # compiles (one program: fixed shapes)
    first_seconds = time.perf_counter() - tic
    seconds = np.inf
    for _ in range(repeats):
        tic = time.perf_counter()
        result = optax_projected_attack(run, predict, images, targets, config)
        seconds = min(seconds, time.perf_counter() - tic)
    return result, first_seconds - seconds, seconds


def with_setting(config, item: str, parser):
    """`config` with one setting changed, from "PART.FIELD=VALUE" (PART: search, lbfgs or refine) or "lanes=N"."""
    path, _, value = item.partition("=")
    part, _, field = path.rpartition(".")
    holder = getattr(config, part, None) if part else config
    if not hasattr(holder, "_fields") or field not in holder._fields:
        parser.error(f"--set: unknown setting {path!r} (e.g. search.initial_c, lbfgs.ftol, refine.steps, lanes)")
    default = getattr(holder, field)
    if isinstance(default, bool):
        value = value.lower() in ("1", "true")
    elif isinstance(default, float):
        value = float(value)
    elif not isinstance(default, str):
        value = int(float(value))
    changed = holder._replace(**{field: value})
    return changed if not part else config._replace(**{part: changed})


def summary(success, l2, n_pixels):
    success = np.asarray(success, bool)
    distortion = np.asarray(l2) / np.sqrt(n_pixels)
    return dict(success_rate=float(success.mean()),
                mean_distortion=float(distortion[success].mean()) if success.any() else float("nan"))


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=1000)
    parser.add_argument("--scipy-images", type=int, default=100, help="images for the scipy loop (and the paired run)")
    parser.add_argument("--workdir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--lanes", type=int, default=None, help="AttackConfig.lanes (default: the device's, 32 on a CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs (both solvers)")
    parser.add_argument("--set", action="append", default=[], metavar="PART.FIELD=VALUE",
                        help="override a setting of the AttackConfig for both solvers, e.g. --set lbfgs.ftol=1e-5")
    parser.add_argument("--baseline-commit", default="a3b0177",
                        help="also time the default attack of this commit of the repository, side by side (default: "
                             "a3b0177, the attack before the refinement; 'none' to skip)")
    parser.add_argument("--no-optax", action="store_true", help="skip (c), optax.lbfgs plus a projection")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)

    config = AttackConfig(lanes=args.lanes or device_lanes())
    for item in args.set:
        config = with_setting(config, item, parser)
    model, params = trained_models([MODEL], "fashion_mnist", args.workdir, args.data_dir)[MODEL]
    test = load_dataset("fashion_mnist", "test", args.data_dir)
    images = test.images[:args.num_images]
    labels = test.labels[:args.num_images]
    targets = np.asarray(random_wrong_targets(jax.random.PRNGKey(args.seed), labels))
    k = min(args.scipy_images, args.num_images)
    lanes = min(config.lanes or args.num_images, args.num_images)
    print(f"{MODEL} on {args.num_images} Fashion-MNIST test images, random wrong targets (seed {args.seed}); "
          f"{jax.device_count()} {jax.devices()[0].platform} device(s) ({jax.devices()[0].device_kind}); config {config}", flush=True)

    full, full_compile, full_seconds = run_batched(model, params, images, targets, config, args.repeats)
    search_only = config._replace(refine=config.refine._replace(steps=0))
    paper, paper_compile, paper_seconds = run_batched(model, params, images, targets, search_only, args.repeats)
    sub, sub_compile, sub_seconds = run_batched(model, params, images[:k], targets[:k], config, args.repeats)
    old = None if args.baseline_commit == "none" else attack_at_commit(args.baseline_commit)
    if old is not None:
        old_config = old.AttackConfig(lanes=config.lanes)
        baseline, baseline_compile, baseline_seconds = run_batched(model, params, images, targets, old_config, args.repeats,
                                                       core=old.lbfgs_attack_core)
    raw = raw_gradient_throughput(model, params, config, lanes)
    # The machine's own best: the raw value-and-gradient at the batch where it is fastest.
    raw_batches = sorted({lanes, *(b for b in (64, 128, 256, 512, 1000) if b <= args.num_images)})
    raw_by_batch = {b: raw if b == lanes else raw_gradient_throughput(model, params, config, b) for b in raw_batches}
    best_batch = max(raw_by_batch, key=raw_by_batch.get)
    raw_best = raw_by_batch[best_batch]
    raw_sub = raw_gradient_throughput(model, params, config, min(lanes, k))
    reference, scipy_seconds = run_scipy(model, params, images[:k], targets[:k], config, args.repeats)
    if not args.no_optax:
        naive, naive_compile, naive_seconds = run_optax_projected(model, params, images[:k], targets[:k], config,
                                                                  args.repeats)
        paper_sub, _, paper_sub_seconds = run_batched(model, params, images[:k], targets[:k], search_only, args.repeats)

    n_pixels = 784
    ours_full = summary(full.success, full.l2, n_pixels)
    ours_sub = summary(sub.success, sub.l2, n_pixels)
    theirs = summary(reference["success"], reference["l2"], n_pixels)
    evals_full = int(np.sum(full.evaluations))
    evals_sub = int(np.sum(sub.evaluations))
    figures = {
        "model": MODEL, "num_images": args.num_images, "scipy_images": k, "config": config.settings(),
        "batched_all": dict(images=args.num_images, compile_seconds=full_compile, seconds=full_seconds,
                            images_per_second=args.num_images / full_seconds,
                            evaluations=evals_full, evaluations_per_second=evals_full / full_seconds,
                            raw_evaluations_per_second=raw, fraction_of_raw=evals_full / full_seconds / raw,
                            raw_best_batch=best_batch, raw_best_evaluations_per_second=raw_best,
                            fraction_of_raw_best=evals_full / full_seconds / raw_best,
                            raw_by_batch={str(b): v for b, v in raw_by_batch.items()},
                            mean_evaluations_per_image=evals_full / args.num_images, **ours_full),
        "batched_subset": dict(images=k, compile_seconds=sub_compile, seconds=sub_seconds,
                               images_per_second=k / sub_seconds, evaluations=evals_sub,
                               evaluations_per_second=evals_sub / sub_seconds, raw_evaluations_per_second=raw_sub,
                               fraction_of_raw=evals_sub / sub_seconds / raw_sub,
                               mean_evaluations_per_image=evals_sub / k, **ours_sub),
        "search_only_all": dict(images=args.num_images, compile_seconds=paper_compile, seconds=paper_seconds,
                                images_per_second=args.num_images / paper_seconds,
                                mean_evaluations_per_image=float(np.mean(paper.evaluations)),
                                **summary(paper.success, paper.l2, n_pixels)),
        "scipy_subset": dict(images=k, seconds=scipy_seconds, images_per_second=k / scipy_seconds,
                             evaluations=int(reference["evaluations"].sum()),
                             mean_evaluations_per_image=float(reference["evaluations"].mean()), **theirs),
    }
    figures["speedup_same_images"] = figures["batched_subset"]["images_per_second"] / figures["scipy_subset"]["images_per_second"]
    figures["speedup_all_vs_scipy_rate"] = figures["batched_all"]["images_per_second"] / figures["scipy_subset"]["images_per_second"]
    figures["distortion_ratio_same_images"] = ours_sub["mean_distortion"] / theirs["mean_distortion"]
    both = np.asarray(sub.success) & reference["success"]
    figures["distortion_ratio_paired"] = float(np.mean(np.asarray(sub.l2)[both]) / np.mean(reference["l2"][both]))

    figures["speed_ratio_to_search_only"] = figures["batched_all"]["images_per_second"] / figures["search_only_all"]["images_per_second"]
    if old is not None:
        figures["baseline_commit_all"] = dict(commit=args.baseline_commit, images=args.num_images,
                                              compile_seconds=baseline_compile, seconds=baseline_seconds,
                                              images_per_second=args.num_images / baseline_seconds,
                                              mean_evaluations_per_image=float(np.mean(baseline.evaluations)),
                                              **summary(baseline.success, baseline.l2, n_pixels))
        figures["speed_ratio_to_baseline_commit"] = (figures["batched_all"]["images_per_second"]
                                                     / figures["baseline_commit_all"]["images_per_second"])
    if not args.no_optax:
        paper_l2, naive_l2 = np.asarray(paper_sub.l2), naive["l2"]
        both_ours = np.asarray(paper_sub.success) & naive["success"]
        both_scipy = naive["success"] & reference["success"]
        figures["search_only_subset"] = dict(images=k, seconds=paper_sub_seconds, images_per_second=k / paper_sub_seconds,
                                             mean_evaluations_per_image=float(np.mean(paper_sub.evaluations)),
                                             **summary(paper_sub.success, paper_sub.l2, n_pixels))
        figures["optax_projected_subset"] = dict(
            images=k, compile_seconds=naive_compile, seconds=naive_seconds, images_per_second=k / naive_seconds,
            mean_evaluations_per_image=float(naive["evaluations"].mean()), lockstep_steps=naive["lockstep_steps"],
            mean_steps_per_image=float(naive["mean_image_steps"]), **summary(naive["success"], naive_l2, n_pixels),
            # paired over images both solved, mean L2 over mean L2 (as distortion_ratio_paired)
            distortion_ratio_to_search_only_paired=float(naive_l2[both_ours].mean() / paper_l2[both_ours].mean()),
            distortion_ratio_to_scipy_paired=float(naive_l2[both_scipy].mean() / reference["l2"][both_scipy].mean()),
            search_only_speedup=naive_seconds / paper_sub_seconds)
    a, s, f, p = figures["batched_all"], figures["scipy_subset"], figures["batched_subset"], figures["search_only_all"]
    print(f"batched, {args.num_images} images: compile {a['compile_seconds']:.1f} s, run {a['seconds']:.2f} s = "
          f"{a['images_per_second']:.1f} images/s; success {a['success_rate']:.1%}, mean distortion {a['mean_distortion']:.4f}")
    print(f"search only (refine.steps=0, the paper's method), {args.num_images} images: run {p['seconds']:.2f} s = "
          f"{p['images_per_second']:.1f} images/s, {p['mean_evaluations_per_image']:.0f} evaluations per image, mean "
          f"distortion {p['mean_distortion']:.4f}; the default's images/s are {figures['speed_ratio_to_search_only']:.0%} "
          "of these")
    if old is not None:
        b = figures["baseline_commit_all"]
        print(f"the default attack at commit {args.baseline_commit}, {args.num_images} images: run {b['seconds']:.2f} s = "
              f"{b['images_per_second']:.1f} images/s, {b['mean_evaluations_per_image']:.0f} evaluations per image, "
              f"mean distortion {b['mean_distortion']:.4f}; today's default's images/s are "
              f"{figures['speed_ratio_to_baseline_commit']:.0%} of these")
    print(f"batched, first {k} images: compile {f['compile_seconds']:.1f} s, run {f['seconds']:.2f} s = "
          f"{f['images_per_second']:.1f} images/s; success {f['success_rate']:.1%}, mean distortion {f['mean_distortion']:.4f}")
    print(f"scipy loop, first {k} images: {s['seconds']:.1f} s = {s['images_per_second']:.2f} images/s; "
          f"success {s['success_rate']:.1%}, mean distortion {s['mean_distortion']:.4f}")
    print(f"images/s ratio (same {k} images): {figures['speedup_same_images']:.1f}x; "
          f"all {args.num_images} vs the scipy loop's rate: {figures['speedup_all_vs_scipy_rate']:.1f}x")
    print(f"mean distortion ratio batched/scipy (same images): {figures['distortion_ratio_same_images']:.4f} "
          f"(paired over images both solved: {figures['distortion_ratio_paired']:.4f})")
    print(f"function evaluations/s: {a['evaluations_per_second']:.0f} = {a['fraction_of_raw']:.0%} of the raw batched "
          f"value-and-gradient ({raw:.0f}/s at batch {lanes}); mean {a['mean_evaluations_per_image']:.0f} evaluations "
          f"per image (scipy: {s['mean_evaluations_per_image']:.0f})")
    print(f"the default attack's gradients/s are {a['fraction_of_raw_best']:.1%} of the raw batched value-and-gradient "
          f"at its best batch ({raw_best:.0f}/s at batch {best_batch}; by batch: "
          + ", ".join(f"{b}: {v:.0f}" for b, v in raw_by_batch.items()) + ")")
    if not args.no_optax:
        o, q = figures["optax_projected_subset"], figures["search_only_subset"]
        print(f"search only, first {k} images: run {q['seconds']:.2f} s = {q['images_per_second']:.1f} images/s, "
              f"{q['mean_evaluations_per_image']:.0f} evaluations per image, mean distortion {q['mean_distortion']:.4f}")
        print(f"optax.lbfgs + projection_box, same c search, first {k} images: run {o['seconds']:.2f} s = "
              f"{o['images_per_second']:.1f} images/s ({o['search_only_speedup']:.1f}x the time of our search "
              f"alone), {o['mean_evaluations_per_image']:.0f} evaluations per image, success {o['success_rate']:.1%}, "
              f"mean distortion {o['mean_distortion']:.4f}; paired L2 ratio to our search alone "
              f"{o['distortion_ratio_to_search_only_paired']:.4f}, to scipy {o['distortion_ratio_to_scipy_paired']:.4f}; "
              f"its vmapped loops ran {o['lockstep_steps']} steps in all (each run as long as its slowest image), "
              f"where an image needed {o['mean_steps_per_image']:.0f} on average")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    figures["load_average_end"] = os.getloadavg()[0]
    if args.out:
        write_json_atomic(args.out, figures)


if __name__ == "__main__":
    run_main(main)
