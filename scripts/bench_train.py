"""The ConvNet's training on this CPU: convolutions as matmuls (today) against XLA's convolution, in one process.

    python scripts/bench_train.py [--steps 100] [--repeats 3] [--epochs 0] [--data-dir DIR]

Both variants run the zoo ConvNet's training step (cross-entropy + the
paper's weight decay, Adam at a constant rate where `fit` decays it, batches
of 128 Fashion-MNIST training images) as `jaxadv.train.fit` runs it, a
jitted `lax.scan` over --steps minibatches,
from the same parameters. They differ only in two layers: today's
`jaxadv.models.conv2d` (shifted views and one matmul) and `max_pool` (a
reshape and a max), against what they replaced, `lax.conv_general_dilated`
and `lax.reduce_window` (whose gradient XLA:CPU lowers to a
select-and-scatter). Compilation is timed apart; the steady state
is the best of --repeats runs, the two variants taking turns, in wall time
and in this process's CPU time (the CPU time moves less when other programs
share the cores). With --epochs E > 0, both then train the ConvNet for E
epochs with its zoo schedule (`zoo_config`, 4 epochs in train_zoo) and print
the test errors.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxadv.data import load_dataset  # noqa: E402
from jaxadv.models import get_model, weight_decay_penalty  # noqa: E402
from jaxadv.train import error_rate, train, zoo_config  # noqa: E402
from experiments.cli import run_main  # noqa: E402

MODEL = "ConvNet"
BATCH = 128


def xla_convolution(h, kernel, stride, padding):
    """The convolution as it was: XLA's."""
    return jax.lax.conv_general_dilated(h, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))


def reduce_window_pool(h, window, stride):
    """Max pooling as it was: XLA's reduce_window (its gradient is a select-and-scatter)."""
    return jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), "VALID")


def layers(variant):
    """Today's layers, or (variant "xla") the ones they replaced."""
    if variant == "matmul":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch("jaxadv.models.conv2d", xla_convolution))
    stack.enter_context(mock.patch("jaxadv.models.max_pool", reduce_window_pool))
    return stack


def compiled_steps(model, params, images, labels, steps):
    """(compiled, compile seconds): `steps` Adam steps of the zoo's loss as one jitted scan, as `fit` runs them."""
    optimizer = optax.adam(2e-3)

    def loss_fn(params, x, y):
        logits = model.apply(params, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + weight_decay_penalty(model, params)

    def run(params, opt_state, x, y):
        def step(carry, batch):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss
        return jax.lax.scan(step, (params, opt_state), (x, y))

    x = jnp.asarray(images[:steps * BATCH]).reshape(steps, BATCH, *images.shape[1:])
    y = jnp.asarray(labels[:steps * BATCH]).reshape(steps, BATCH)
    tic = time.perf_counter()
    compiled = jax.jit(run).lower(params, optimizer.init(params), x, y).compile()
    return (lambda: compiled(params, optimizer.init(params), x, y)), time.perf_counter() - tic


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="minibatches per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=0, help="then train both for this many epochs (0: no)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.epochs < 0:
        parser.error("--steps and --repeats must be >= 1, --epochs >= 0")

    model = get_model(MODEL)
    data = load_dataset("fashion_mnist", "train", args.data_dir)
    if args.steps * BATCH > len(data.labels):
        parser.error(f"--steps: at most {len(data.labels) // BATCH} batches of {BATCH}")
    params = model.init(jax.random.PRNGKey(0))
    print(f"{MODEL}: {args.steps} training steps of {BATCH} images per run; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)", flush=True)

    runs, compile_seconds = {}, {}
    for variant in ("matmul", "xla"):
        with layers(variant):
            runs[variant], compile_seconds[variant] = compiled_steps(model, params, data.images, data.labels,
                                                                     args.steps)
    finals = {v: jax.block_until_ready(run()) for v, run in runs.items()}
    wall = dict.fromkeys(runs, np.inf)
    cpu = dict.fromkeys(runs, np.inf)
    for _ in range(args.repeats):
        for variant, run in runs.items():
            tic, tic_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(run())
            wall[variant] = min(wall[variant], time.perf_counter() - tic)
            cpu[variant] = min(cpu[variant], time.process_time() - tic_cpu)
    for variant in runs:
        print(f"{variant:7s} compile {compile_seconds[variant]:5.1f} s; {args.steps} steps {wall[variant]:6.2f} s wall "
              f"({wall[variant] / args.steps * 1e3:.0f} ms a step), {cpu[variant]:6.2f} s CPU", flush=True)
    (new_params, _), new_losses = finals["matmul"]
    (old_params, _), old_losses = finals["xla"]
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(new_params), jax.tree.leaves(old_params)))
    print(f"matmul against xla: {wall['xla'] / wall['matmul']:.2f}x faster in wall time, "
          f"{cpu['xla'] / cpu['matmul']:.2f}x in CPU time; after {args.steps} steps the parameters differ "
          f"by at most {gap:.2g} (last loss {float(new_losses[-1]):.4f} against {float(old_losses[-1]):.4f})")

    if args.epochs:
        test = load_dataset("fashion_mnist", "test", args.data_dir)
        config = zoo_config(model, verbose=False)._replace(epochs=args.epochs)
        for variant in runs:
            with layers(variant):
                tic = time.perf_counter()
                trained = jax.block_until_ready(train(model, data.images, data.labels, jax.random.PRNGKey(0), config))
                seconds = time.perf_counter() - tic
            print(f"{variant:7s} {args.epochs} epoch(s): {seconds:.0f} s, test error "
                  f"{error_rate(model, trained, test.images, test.labels):.2%}", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    run_main(main)
