"""An experiment's output files: results JSON, markdown tables and figures, each written whole (atomically).

    write_json_atomic(out / "results.json", {"error": 0.0123, "l2": np.float32(0.5)})
    write_text_atomic(out / "table.md", markdown_table(["model", "error"], [["FC10", percent(0.0123)]]))
    save_figure_atomic(fig, out / "figure.png", dpi=120)

Only the writing process of a --distributed run writes (`jaxadv.io.is_writer`); a reader sees the old file or
the new one, never half of one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from jaxadv.io import atomic_path, is_writer, write_atomic

#: What a table shows where there is no value.
MISSING = "–"


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` (from the writing process only)."""
    if is_writer():
        write_atomic(path, text)


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write `obj` as indented JSON (numpy scalars and arrays are converted)."""
    write_text_atomic(path, json.dumps(obj, indent=2, default=_to_json) + "\n")


def save_figure_atomic(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """fig.savefig to a temporary file in the same folder, then os.replace."""
    if not is_writer():
        return
    with atomic_path(path) as tmp:
        fig.savefig(tmp, **savefig_kwargs)


def markdown_table(headers: Sequence, rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table; floats are shown with 4 significant digits."""
    if any(len(row) != len(headers) for row in rows):
        raise ValueError(f"rows: every row must have {len(headers)} cells, one per header")
    cells = lambda row: "| " + " | ".join(_cell(c) for c in row) + " |"
    return "\n".join([cells(headers), "|" + "---|" * len(headers)] + [cells(r) for r in rows]) + "\n"


def percent(x: float | None, digits: int = 2) -> str:
    """0.1234 -> "12.34%" (`digits` decimals); None -> MISSING."""
    return MISSING if x is None else f"{100 * x:.{digits}f}%"


def fixed(x: float | None, digits: int = 3) -> str:
    """0.12345 -> "0.123" (`digits` decimals); None -> MISSING."""
    return MISSING if x is None else f"{x:.{digits}f}"


def significant(x: float | None, digits: int = 4) -> str:
    """`digits` significant digits ("12.35", "1.2e-05"); None -> MISSING, ±inf -> "∞" / "-∞"."""
    if x is None:
        return MISSING
    if np.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}g}"


def _cell(value) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def _to_json(value):
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return np.asarray(value).tolist()
    if isinstance(value, (np.integer, np.floating, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_outputs(out_dir: str | os.PathLike, results: dict, markdown: str, figures: dict | None = None) -> None:
    """An experiment's outputs: results.json, table.md and each of `figures` ({file name: figure}), each
    written atomically; the table is printed too."""
    write_json_atomic(os.path.join(out_dir, "results.json"), results)
    write_text_atomic(os.path.join(out_dir, "table.md"), markdown)
    for name, figure in (figures or {}).items():
        save_figure_atomic(figure, os.path.join(out_dir, name))
    print(markdown)


def carry_over_timing(path: str | os.PathLike, timing: dict, same: dict, work_keys: Sequence[str]) -> dict:
    """`timing` ({name: {part: seconds}}), where a name did none of `work_keys`' work in this run (every chunk
    resumed) taking the seconds that the results at `path` recorded for it, marked "carried_over".

    Only results whose fields `same` (e.g. {"num_images": 1000, "seed": 0}) match are read, so a table keeps
    the time its numbers cost, not the time it took to read them back.
    """
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return timing
    if any(old.get(key) != value for key, value in same.items()):
        return timing
    for name, seconds in timing.items():
        previous = old.get("timing", {}).get(name)
        if previous and not any(seconds.get(k) for k in work_keys):
            timing[name] = {**previous, "carried_over": True}
    return timing
