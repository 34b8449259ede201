"""The README is a front page whose code runs: every ```python block is executed, in order,
in one namespace, in a temporary directory (so the README's names cannot rot), and its
links into docs/ lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
FRONT_PAGE_LINES = 250


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= FRONT_PAGE_LINES
    own_loop = README.split("## Your own training loop", 1)[1].split("\n## ", 1)[0]
    assert "create_train_state" in own_loop and "```python" in own_loop


def test_every_docs_link_of_the_readme_leads_to_a_file():
    links = re.findall(r"\]\((docs/[^)#]+)", README)
    assert links, "the README links its details in docs/"
    assert [link for link in links if not (ROOT / link).is_file()] == []


@pytest.mark.slow
def test_the_python_blocks_of_the_readme_run_as_written(tmp_path, monkeypatch):
    assert PYTHON_BLOCKS
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for number, block in enumerate(PYTHON_BLOCKS, 1):
        exec(compile(block, f"README.md python block {number}", "exec"), namespace)
