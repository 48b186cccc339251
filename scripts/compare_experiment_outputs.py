"""Compare two workdirs' experiment outputs: every results.json (timing fields left out) and table.md.

    python scripts/compare_experiment_outputs.py runs/before runs/after [table1 table3 ...]

Prints SAME or DIFFER per run folder, with the keys or lines that differ; exit status 1 if any results.json
differs or is missing. Keys naming seconds, elapsed time, timing or wall time are left out of the results,
so a run on a busy machine compares equal to a quiet one; table.md is compared line by line as it is (a table
that prints seconds shows them as differences). Used to show that a refactor leaves every experiment's results
as they were.
"""
from __future__ import annotations

import difflib
import json
import sys
from pathlib import Path

TIMING = ("seconds", "elapsed", "timing", "wall")


def without_timing(value):
    """`value` (parsed JSON) without the dict entries whose key names a time."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if not any(t in k for t in TIMING)}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def compare(before: Path, after: Path, experiments: list[str]) -> bool:
    """Print the comparison of every run folder of `before` (or of `experiments`); True if all results match."""
    same_everywhere = True
    for results in sorted(before.glob("*/*/results.json")):
        experiment = results.parent.parent.name
        if experiments and experiment not in experiments:
            continue
        other = after / results.relative_to(before)
        if not other.exists():
            print(f"MISSING {other}")
            same_everywhere = False
            continue
        a, b = (without_timing(json.loads(p.read_text())) for p in (results, other))
        same = a == b and list(a) == list(b)
        same_everywhere &= same
        print(f"{experiment}/{results.parent.name} results.json {'SAME' if same else 'DIFFER'}")
        for key in [] if same else sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                print(f"    {key}: {str(a.get(key))[:150]} | {str(b.get(key))[:150]}")
        tables = [p.parent / "table.md" for p in (results, other)]
        if all(t.exists() for t in tables):
            lines = difflib.unified_diff(*(t.read_text().splitlines() for t in tables), lineterm="", n=0)
            changed = [line for line in lines if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            print(f"{experiment}/{results.parent.name} table.md {'SAME' if not changed else 'DIFFER'}")
            for line in changed[:12]:
                print(f"    {line[:200]}")
    return same_everywhere


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print("usage: compare_experiment_outputs.py BEFORE_WORKDIR AFTER_WORKDIR [EXPERIMENT ...]", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(0 if compare(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]) else 1)
