"""Where the attack's loop spends its time: per lane and step, and the costliest XLA ops of one step.

    python scripts/profile_attack.py [--lanes 128] [--part search|refine|floor] [--top 25] [--workdir runs/fashion_mnist]

Steps the vmapped per-image step of the c search (`jaxadv.attacks.lbfgs.search_lanes`) or of the
refinement (`jaxadv.attacks.boundary.refine_lanes`) in a `lax.fori_loop` over --lanes random
FC100-100-10 problems, and prints the wall time per step and per lane-step beside the raw batched
value-and-gradient of the attack's objective at the same batch, then a `jax.profiler` trace's op time
per step, costliest first. `--part floor` steps `floor_step` instead: only what any L-BFGS lane step
must do, the floor under the search's step on this backend. `--occupancy N` also attacks the first N
test images (random wrong targets, the c search alone) and prints how busy 32-256 lanes would keep the
loop, from each image's gradient count (`lane_occupancy`). The figures and what they say: docs/benchmarks.md, "The attack's throughput".
"""
from __future__ import annotations

import argparse
import collections
import glob
import heapq
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from experiments.cli import run_main  # noqa: E402
from jaxadv.attacks import AttackConfig, lbfgs_attack, random_wrong_targets  # noqa: E402
from jaxadv.attacks import boundary, lbfgs  # noqa: E402
from jaxadv.data import load_dataset  # noqa: E402
from jaxadv.zoo import trained_models  # noqa: E402

MODEL, STEPS = "FC100-100-10", 20


class FloorState(NamedTuple):
    """One lane of `floor_step`: its iterate and gradient, the next trial, and an L-BFGS memory of m pairs."""
    x: jax.Array
    x_grad: jax.Array
    trial: jax.Array
    s_memory: jax.Array      # [m, n]
    y_memory: jax.Array
    origin: jax.Array
    target: jax.Array
    count: jax.Array


def floor_step(value_and_grad):
    """The least an L-BFGS lane step does: one value and gradient, the new pair (s, y) written to the memory,
    the six inner products of s, y and g with the memory, the direction as one pass over it, three inner
    products and the state's writes; no line search, no convergence test, no c search (its arithmetic is
    not an optimiser's: only its cost counts)."""
    def step(state: FloorState) -> FloorState:
        (value, _), grad = value_and_grad(state.trial, state.origin, 1.0, state.target)
        s, y = state.trial - state.x, grad - state.x_grad
        slot = state.count % state.s_memory.shape[0]
        s_memory, y_memory = state.s_memory.at[slot].set(s), state.y_memory.at[slot].set(y)
        products = [memory @ v for v in (s, y, grad) for memory in (s_memory, y_memory)]
        direction = grad
        for j in range(s_memory.shape[0]):
            direction = direction + 1e-3 * (products[4][j] * s_memory[j] + products[5][j] * y_memory[j])
        accept = jnp.vdot(grad, direction) < jnp.vdot(s, y) + jnp.vdot(y, y) + value
        x = jnp.where(accept, state.trial, state.x)
        return state._replace(x=x, x_grad=jnp.where(accept, grad, state.x_grad),
                              trial=jnp.clip(x - 1e-3 * direction, 0, 1), s_memory=s_memory, y_memory=y_memory,
                              count=state.count + 1)
    return step


def lane_occupancy(evaluations, lanes: int) -> float:
    """The share of lane-steps that do work when images with these gradient counts queue for `lanes` lanes."""
    free_at = [0] * lanes                      # the step at which each lane is free again
    for count in evaluations:
        heapq.heappush(free_at, heapq.heappop(free_at) + max(int(count), 1))
    return float(np.sum(np.maximum(evaluations, 1))) / (max(free_at) * lanes)


def per_step_seconds(fn, state, repeats=5):
    """Best wall time of one step of `fn` (a jitted loop of STEPS steps), and the final state."""
    state = jax.block_until_ready(fn(state))
    best = float("inf")
    for _ in range(repeats):
        tic = time.perf_counter()
        state = jax.block_until_ready(fn(state))
        best = min(best, (time.perf_counter() - tic) / STEPS)
    return best, state


def op_times(fn, state, top):
    """(op time per step in seconds, [(name, seconds per step, calls per step)]) from a profiler trace."""
    from jax.profiler import ProfileData
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder):
            for _ in range(3):
                state = fn(state)
            jax.block_until_ready(state)
        data = ProfileData.from_file(glob.glob(folder + "/**/*.xplane.pb", recursive=True)[0])
    seconds, calls = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "Eigen" not in line.name:        # XLA:CPU's worker threads
                continue
            for event in line.events:
                if not event.name.startswith(("ThunkExecutor", "while")):   # (a while spans its body's ops)
                    seconds[event.name] += event.duration_ns * 1e-9
                    calls[event.name] += 1
    steps = 3 * STEPS
    return sum(seconds.values()) / steps, [(k, v / steps, calls[k] / steps) for k, v in seconds.most_common(top)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lanes", type=int, default=128)
    parser.add_argument("--part", choices=("search", "refine", "floor"), default="search")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workdir", default="runs/fashion_mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--occupancy", type=int, default=0, metavar="N", help="also the lanes' occupancy on N test images")
    args = parser.parse_args(argv)
    if args.lanes < 1 or args.top < 1 or args.occupancy < 0:
        parser.exit(2, "profile_attack: --lanes and --top must be >= 1, --occupancy >= 0\n")
    model, params = trained_models([MODEL], "fashion_mnist", args.workdir, args.data_dir)[MODEL]
    logits_fn = jax.tree_util.Partial(model.module.apply, params)
    shape = (1,) + tuple(model.input_shape)
    logits_one = lambda x: logits_fn(x.reshape(shape))[0]
    config, lanes, rng = AttackConfig(), args.lanes, np.random.default_rng(0)
    origin_size = int(np.prod(shape))
    origins = jnp.asarray(rng.uniform(0, 1, (lanes, origin_size)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 10, lanes), jnp.int32)
    zeros, ones = jnp.zeros(lanes), jnp.ones(lanes)
    objective = lbfgs.attack_objective(logits_one, config)
    if args.part == "search":
        attack = lbfgs.search_lanes(logits_one, config, untargeted=False)
        step, start = attack.step, jax.jit(jax.vmap(attack.init))(lbfgs.SearchInputs(origins, targets, ones, zeros, ones))
    elif args.part == "refine":       # an endless refinement from noisy starts: every lane keeps stepping
        attack = boundary.refine_lanes(logits_one, 10, config.refine_config(False)._replace(steps=10**6))
        starts = jnp.clip(origins + 0.3 * jnp.asarray(rng.normal(size=(lanes, origin_size)), jnp.float32), 0, 1)
        inputs = boundary.RefineInputs(origins, starts, targets, jnp.ones(lanes, bool), zeros, ones)
        step, start = attack.step, jax.jit(jax.vmap(attack.init))(inputs)
    else:
        step = floor_step(jax.value_and_grad(objective, has_aux=True))
        memory = (lanes, config.lbfgs.memory_size, origin_size)
        start = FloorState(origins + 0, jnp.zeros_like(origins), origins + 0, jnp.zeros(memory), jnp.zeros(memory),
                           origins + 0, targets + 0, jnp.zeros(lanes, jnp.int32))   # (distinct buffers: donated)
    loop = jax.jit(lambda s: jax.lax.fori_loop(0, STEPS, lambda i, s: jax.vmap(step)(s), s), donate_argnums=0)
    step_seconds, state = per_step_seconds(loop, start)

    value_and_grad = jax.jit(jax.vmap(jax.value_and_grad(lambda x, o, c, t: objective(x, o, c, t)[0])))
    raw = lambda o: (value_and_grad(o, origins, ones, targets)[1] * 1e-9 + o)      # a loop-carried dependence
    raw_seconds, _ = per_step_seconds(jax.jit(lambda o: jax.lax.fori_loop(0, STEPS, lambda i, o: raw(o), o)), origins)
    print(f"{MODEL}, {args.part} step at {lanes} lanes: {step_seconds * 1e6:.0f} us/step = "
          f"{step_seconds / lanes * 1e6:.2f} us per lane-step; the raw value-and-gradient: "
          f"{raw_seconds / lanes * 1e6:.2f} us per lane-step ({raw_seconds / step_seconds:.0%} of the step)")
    total, ops = op_times(loop, state, args.top)
    print(f"op time {total * 1e6:.0f} us/step (both threads together), costliest first:")
    for name, seconds, calls in ops:
        print(f"{seconds * 1e6:9.1f} us/step {calls:5.1f}x  {name}")
    if args.occupancy:
        test = load_dataset("fashion_mnist", "test", args.data_dir)
        images = jnp.asarray(test.images[:args.occupancy])
        search_only = config._replace(refine=config.refine._replace(steps=0))
        counts = np.asarray(lbfgs_attack(logits_fn, images, random_wrong_targets(jax.random.PRNGKey(0),
                                         test.labels[:args.occupancy]), search_only).evaluations)
        print(f"c search on {args.occupancy} test images, {counts.mean():.1f} gradients per image; lanes busy: "
              + ", ".join(f"{lanes} lanes {lane_occupancy(counts, lanes):.0%}" for lanes in (32, 64, 128, 256)))


if __name__ == "__main__":
    run_main(main)
