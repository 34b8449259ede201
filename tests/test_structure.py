"""The shape of the code, as the project's rules state it: short functions, no module that
does everything. Counted with the ast, so the test fails the day a rule is broken."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "vit_flax").glob("*.py")) + [ROOT / "train.py"]
LONGEST_FUNCTION = 60  # lines, decorators and docstring included
LARGEST_MODULE = 0.25  # of vit_flax/'s lines


def function_lengths(path: Path) -> dict[str, int]:
    """{"file:line:name": lines} of every function and method: keyed by line too, so that
    two methods of one name (every class's __init__) are both counted."""
    tree = ast.parse(path.read_text())
    lengths = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lengths[f"{path.name}:{node.lineno}:{node.name}"] = node.end_lineno - first + 1
    return lengths


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


def test_the_readme_layout_lists_every_module():
    listed = set(re.findall(r"^(vit_flax/\w+\.py)", (ROOT / "README.md").read_text(), re.M))
    modules = {f"vit_flax/{path.name}" for path in (ROOT / "vit_flax").glob("*.py")
               if path.name != "__init__.py"}
    assert listed == modules, {"not in the README": modules - listed,
                               "not in vit_flax/": listed - modules}
