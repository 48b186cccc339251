"""Images per second of a sharded attack against the number of devices and the batch size.

    python scripts/bench_scaling.py [--devices 1 2 4] [--batch-sizes 64 256 1024]
                                    [--workload attack|gradient] [--model FC100-100-10] [--out bench.json]

Each device count runs in its own process, because the number of CPU devices
is fixed when JAX starts: on the CPU the child gets
XLA_FLAGS=--xla_force_host_platform_device_count=N (forced host devices share
the same cores, so expect no speedup there: the figure measures the overhead
of sharding); on a GPU machine the child uses the first N of `jax.devices()`.
The workload is `jaxadv.sharding.sharded` over a batch of random images:

* attack: `jaxadv.attacks.lbfgs_attack` on a randomly initialised model,
  random wrong targets (the real thing; work per image varies with the data);
* gradient: a fixed 100 steps of input-gradient descent per image (fixed work).

Prints a markdown table (images/s, and the ratio to one device at the same
batch size) and, with --out, writes the figures as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(num_devices, batch_sizes, workload, model_name, repeats, block_size):
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxadv.models import get_model
    from jaxadv.sharding import batch_mesh, sharded

    if len(jax.devices()) < num_devices:
        return {"num_devices": num_devices, "skipped": f"only {len(jax.devices())} devices"}
    mesh = batch_mesh(jax.devices()[:num_devices])
    model = get_model(model_name)
    params = model.init(jax.random.PRNGKey(0))
    logits_fn = functools.partial(model.apply, params)

    if workload == "attack":
        from jaxadv.attacks import AttackConfig, lbfgs_attack
        config = AttackConfig()

        def fn(x, t):
            result = lbfgs_attack(logits_fn, x, t, config)
            return {"success": result.success, "distortion": result.distortion}
    else:
        def fn(x, t):
            def loss(z):
                return -jnp.sum(jax.nn.log_softmax(logits_fn(z))[jnp.arange(z.shape[0]), t])

            def step(z, _):
                return jnp.clip(z - 0.01 * jnp.sign(jax.grad(loss)(z)), 0.0, 1.0), None
            z, _ = jax.lax.scan(step, x, None, length=100)
            return {"success": jnp.argmax(logits_fn(z), -1) == t, "distortion": jnp.sqrt(jnp.mean((z - x) ** 2, (1, 2, 3)))}

    rows = []
    for batch in batch_sizes:
        rng = np.random.RandomState(batch)
        x = rng.rand(batch, *model.input_shape).astype(np.float32)
        t = rng.randint(0, 10, batch).astype(np.int32)
        call = sharded(fn, mesh=mesh, block_size=block_size)
        t0 = time.perf_counter()
        jax.block_until_ready(call(x, t))
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(call(x, t))
            times.append(time.perf_counter() - t0)
        best = min(times)
        rows.append({"batch_size": batch, "seconds": best, "images_per_second": batch / best,
                     "first_call_seconds": compile_s, "success_rate": float(np.mean(np.asarray(out["success"])))})
    return {"num_devices": num_devices, "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(), "rows": rows}


def run_child(num_devices, args):
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(num_devices),
           "--batch-sizes", *map(str, args.batch_sizes), "--workload", args.workload, "--model", args.model,
           "--repeats", str(args.repeats)] + (["--block-size", str(args.block_size)] if args.block_size else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"worker with {num_devices} devices failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results):
    single = {r["batch_size"]: r["images_per_second"] for res in results if res["num_devices"] == 1
              for r in res.get("rows", [])}
    lines = ["| devices | batch | images/s | vs 1 device | first call (s) | success |",
             "|---|---|---|---|---|---|"]
    for res in results:
        if "skipped" in res:
            lines.append(f"| {res['num_devices']} | – | skipped: {res['skipped']} | | | |")
            continue
        for r in res["rows"]:
            ratio = r["images_per_second"] / single[r["batch_size"]] if r["batch_size"] in single else float("nan")
            lines.append(f"| {res['num_devices']} | {r['batch_size']} | {r['images_per_second']:.1f} | "
                         f"{ratio:.2f}x | {r['first_call_seconds']:.1f} | {r['success_rate']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--workload", choices=("attack", "gradient"), default="attack")
    parser.add_argument("--model", default="FC100-100-10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=None,
                        help="images per device pass (default: each device's whole share at once)")
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("devices", "batch_sizes"):
        if any(v < 1 for v in getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')}: values must be >= 1")
    bad = [(b, n) for b in args.batch_sizes for n in args.devices if b % n]
    if bad:
        parser.error(f"--batch-sizes: each must be a multiple of every device count (padding would skew "
                     f"images/s): {bad[0][0]} vs {bad[0][1]} devices")

    if args.worker is not None:
        print(json.dumps(worker(args.worker, args.batch_sizes, args.workload, args.model, args.repeats,
                                args.block_size)))
        return None
    results = []
    for n in args.devices:
        results.append(run_child(n, args))
        print(f"{n} device(s) done", file=sys.stderr)
    meta = {k: results[0].get(k) for k in ("platform", "device_kind", "cpu_count")}
    print(f"workload {args.workload}, model {args.model}, {meta}")
    print(table(results))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"workload": args.workload, "model": args.model, "results": results}, f, indent=2)
        os.replace(tmp, args.out)
    return results


if __name__ == "__main__":
    main()
