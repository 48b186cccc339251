"""Print the module reference of docs/api.md: each module's summary and its public names' one-line summaries.

    python scripts/api_reference.py > /tmp/reference.md     # then paste it under docs/api.md's "Modules"

The names and lines come from the docstrings, so the page follows the code; `tests/test_api.py` checks that
docs/api.md names every public name.
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: The modules by what a user comes for, in the order docs/api.md lists them.
GROUPS = {
    "Attacks": ["attacks.config", "attacks.lbfgs", "attacks.boundary", "attacks.projection", "attacks.targets",
                "attacks.dataset", "attacks.sizes", "attacks.minimal", "attacks.ddn", "attacks.alma", "attacks.fmn", "attacks.deepfool", "attacks.fast",
                "attacks.sparse", "attacks.lanes", "attacks.common", "attacks.exact"],
    "Models": ["functional", "models", "zoo", "train", "checkpoint", "alexnet"],
    "Data": ["data"],
    "Sweeps": ["sweep", "sharding", "chunk_folder", "chunk_files", "progress", "io"],
    "Bounds": ["certify", "lipschitz", "spectral", "radii", "linear_bounds", "forward_bounds", "relaxations", "graph",
               "patterns",
               "lipschitz_rules", "lipschitz_layers"],
    "Analyses and reports": ["transfer", "units", "blind_spots", "metrics", "adversarial_training", "report",
                             "tables", "paper", "checks"],
    "Plots": ["plots.images", "plots.studies", "plots.transfer"],
    "Optim": ["optim", "box_lbfgs"],
}


def summary(obj) -> str:
    """The first paragraph of `obj`'s own docstring, on one line."""
    doc = inspect.cleandoc(obj.__doc__ or "")
    return " ".join(doc.split("\n\n")[0].split())


def public_names(module):
    """(name, object) of the functions and classes `module` defines under a name without a leading underscore."""
    for name, obj in vars(module).items():
        if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj)) \
                and getattr(obj, "__module__", None) == module.__name__:
            yield name, obj


def reference() -> str:
    """The module reference as markdown."""
    lines = []
    for group, modules in GROUPS.items():
        lines.append(f"### {group}\n")
        for short in modules:
            module = importlib.import_module(f"jaxadv.{short}")
            lines.append(f"**`jaxadv.{short}`**: {summary(module)}\n")
            lines += [f"- `{name}`: {summary(obj)}" for name, obj in public_names(module)]
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference())
