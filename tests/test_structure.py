"""The shape of the code, as the project's rules state it: short functions, no module that
does everything. Counted with the ast, so the test fails the day a rule is broken."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "vit_flax").rglob("*.py")) + [ROOT / "train.py"]
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
    lines = {str(path.relative_to(ROOT)): len(path.read_text().splitlines())
             for path in (ROOT / "vit_flax").rglob("*.py")}
    total = sum(lines.values())
    largest = max(lines, key=lines.get)
    assert lines[largest] <= LARGEST_MODULE * total, (largest, lines[largest], total)


def test_the_architecture_page_lists_every_module():
    page = ROOT / "docs" / "architecture.md"
    listed = set(re.findall(r"^((?:vit_flax|parity)/[\w/]+\.py)", page.read_text(), re.M))
    modules = {str(path.relative_to(ROOT)) for folder in ("vit_flax", "parity")
               for path in (ROOT / folder).rglob("*.py")
               if path.name not in ("__init__.py", "conftest.py")
               and not path.name.startswith("test_")}
    assert listed == modules, {"not in docs/architecture.md": modules - listed,
                               "not in the code": listed - modules}


def test_every_package_folder_has_tests_that_mirror_it():
    packages = {path.name for path in (ROOT / "vit_flax").iterdir()
                if (path / "__init__.py").is_file()}
    mirrored = {path.name for path in (ROOT / "tests").iterdir()
                if path.is_dir() and any(path.glob("test_*.py"))}
    assert packages <= mirrored, packages - mirrored
