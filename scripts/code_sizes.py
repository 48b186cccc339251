"""Module and function sizes in jaxadv/: the modules over 450 lines and the functions over 60 lines.

    python scripts/code_sizes.py [--max-module 450] [--max-function 60]

Prints each module over the limit, each function over it (with whether it has a docstring), and the
counts; exits 1 when a module is over its limit or a long function has no docstring (issue 25's bar).
"""
from __future__ import annotations

import argparse
import ast
import statistics
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxadv"


def function_sizes(path: Path):
    """(qualified name, lines, has a docstring) of every function and method in the file at `path`."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = f"{prefix}{child.name}"
                found.append((name, child.end_lineno - child.lineno + 1, ast.get_docstring(child) is not None))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
    visit(tree, "")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-module", type=int, default=450)
    parser.add_argument("--max-function", type=int, default=60)
    args = parser.parse_args(argv)
    modules = sorted(PACKAGE.rglob("*.py"))
    lengths = {path: len(path.read_text().splitlines()) for path in modules}
    long_modules = [(path, n) for path, n in lengths.items() if n > args.max_module]
    functions = [(path, *row) for path in modules for row in function_sizes(path)]
    long_functions = [row for row in functions if row[2] > args.max_function]
    for path, n in sorted(long_modules, key=lambda item: -item[1]):
        print(f"module   {path.relative_to(PACKAGE.parent)}: {n} lines")
    for path, name, n, documented in sorted(long_functions, key=lambda row: -row[2]):
        print(f"function {path.relative_to(PACKAGE.parent)}:{name}: {n} lines{'' if documented else ', no docstring'}")
    undocumented = [row for row in long_functions if not row[3]]
    print(f"{len(modules)} modules (median {statistics.median(lengths.values()):.0f} lines), "
          f"{len(long_modules)} over {args.max_module}; {len(functions)} functions (median "
          f"{statistics.median(row[2] for row in functions):.0f} lines), {len(long_functions)} over "
          f"{args.max_function}, {len(undocumented)} of them without a docstring")
    return 1 if long_modules or undocumented else 0


if __name__ == "__main__":
    sys.exit(main())
