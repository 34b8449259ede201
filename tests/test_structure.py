"""The shape of the code, as the project's rules state it: short functions, no module that
does everything. Counted with the ast, so the test fails the day a rule is broken."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "vit_flax").glob("*.py")) + [ROOT / "train.py"]
LONGEST_FUNCTION = 60  # lines, decorators and docstring included
LARGEST_MODULE = 0.25  # of vit_flax/'s lines


def function_lengths(path: Path) -> dict[str, int]:
    tree = ast.parse(path.read_text())
    return {f"{path.name}:{node.name}": node.end_lineno - node.lineno + 1
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_no_function_is_longer_than_60_lines():
    lengths = {}
    for path in SOURCES:
        lengths.update(function_lengths(path))
    too_long = {name: n for name, n in lengths.items() if n > LONGEST_FUNCTION}
    assert not too_long, too_long
    assert len(lengths) > 100  # The walk found the functions (a sanity check of the test).


def test_no_module_holds_a_quarter_of_the_library():
    lines = {path.name: len(path.read_text().splitlines())
             for path in (ROOT / "vit_flax").glob("*.py")}
    total = sum(lines.values())
    largest = max(lines, key=lines.get)
    assert lines[largest] <= LARGEST_MODULE * total, (largest, lines[largest], total)
