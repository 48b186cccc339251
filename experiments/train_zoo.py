"""Train every zoo model and compare its errors with the paper's Table 1.

    python -m experiments.train_zoo --dataset fashion_mnist [--data-dir DIR] [--workdir DIR] [--quick]

Models already trained in WORKDIR/models/ are loaded, not retrained. Writes
WORKDIR/train_zoo/<run>/results.json (`rows`: model, train_error, test_error,
num_params, train_seconds) and table.md (<run>: "default", or "quick").
"""
from __future__ import annotations

import sys
import time

from experiments.common import ArgumentParser, add_common_args, output_dir, parse_args
from jaxadv.report import markdown_table, percent, write_json_atomic, write_text_atomic
from experiments.cli import run_main
from jaxadv.data import load_dataset
from jaxadv.models import ALL_MODELS
from jaxadv.train import error_rate
from jaxadv.zoo import load_meta, trained_models

#: (training error, test error) on MNIST as the paper reports them. Table 1, and
#: Table 3 for FC123-456-10 (trained on P1 only; its "training error" is the error on P1).
PAPER_ERRORS = {
    "FC10(1e-4)": (0.067, 0.074),
    "FC10(1e-2)": (0.10, 0.094),
    "FC10(1)": (0.212, 0.20),
    "FC100-100-10": (0.0, 0.0164),
    "FC200-200-10": (0.0, 0.0154),
    "AE400-10": (0.0057, 0.019),
    "FC123-456-10": (0.0, 0.021),
}
#: --quick measures the test error on this many test images.
QUICK_TEST_SIZE = 2000


def build_parser() -> ArgumentParser:
    return add_common_args(ArgumentParser(description=__doc__.splitlines()[0]))


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parse_args(parser, argv)
    workdir = args.workdir
    out = output_dir(parser, args, "train_zoo")
    start = time.perf_counter()

    models = trained_models(ALL_MODELS, args.dataset, workdir, args.data_dir, args.quick)
    train = load_dataset(args.dataset, "train", args.data_dir)
    test = load_dataset(args.dataset, "test", args.data_dir)
    if args.quick:
        test = type(test)(test.images[:QUICK_TEST_SIZE], test.labels[:QUICK_TEST_SIZE])

    rows = []
    for name, (zoo_model, params) in models.items():
        meta = load_meta(workdir, name)
        # The training error is measured on the images the model was trained on.
        train_error = error_rate(zoo_model.module, params, train.images[:meta["num_train"]], train.labels[:meta["num_train"]])
        rows.append({
            "model": name, "description": zoo_model.description,
            "train_error": train_error, "test_error": error_rate(zoo_model.module, params, test.images, test.labels),
            "num_params": zoo_model.num_params(), "train_seconds": meta["train_seconds"],
            "num_train": meta["num_train"], "quick": meta["quick"], "config": meta["config"],
            "paper_train_error": PAPER_ERRORS.get(name, (None, None))[0],
            "paper_test_error": PAPER_ERRORS.get(name, (None, None))[1],
        })
        print(f"{name}: train error {percent(train_error)}, test error {percent(rows[-1]['test_error'])}",
              file=sys.stderr, flush=True)

    results = {"dataset": args.dataset, "quick": args.quick, "num_test": len(test.labels),
               "optimizer": "minibatch Adam, cosine-decayed learning rate (the paper: L-BFGS to convergence)",
               "wall_seconds": round(time.perf_counter() - start, 2), "rows": rows}
    write_json_atomic(out / "results.json", results)
    write_text_atomic(out / "table.md", _table(results))
    print(_table(results))
    return results


def _table(results: dict) -> str:
    headers = ["Model", "Description", "Params", "Train error", "Test error",
               "Paper train error (MNIST)", "Paper test error (MNIST)", "Train time (s)"]
    rows = [[r["model"], r["description"], r["num_params"], percent(r["train_error"]), percent(r["test_error"]),
             percent(r["paper_train_error"]),
             percent(r["paper_test_error"]), f"{r['train_seconds']:.1f}"] for r in results["rows"]]
    note = (f"Trained on {results['dataset']}"
            f"{' (QUICK smoke test: a subset, 1-2 epochs)' if results['quick'] else ''}; test error on "
            f"{results['num_test']} test images. The paper's figures are for MNIST (Table 1; FC123-456-10 "
            f"from Table 3, trained on P1 only). Optimiser: {results['optimizer']}. "
            f"Wall time of this run: {results['wall_seconds']:.0f} s.\n\n")
    return "# Table 1: the model zoo\n\n" + note + markdown_table(headers, rows)


if __name__ == "__main__":
    run_main(main)
