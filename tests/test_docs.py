"""
The code in docs/ is real: a block marked ``<!-- from PATH -->`` is copied from PATH (``# ...``
stands for lines left out), and any other Python block runs as it is. The README's marked
blocks are checked too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"(?:<!-- from (?P<source>\S+) -->\n)?```python\n(?P<code>.*?)```", re.DOTALL)
ELIDED = re.compile(r"^ *# \.\.\.\n", re.MULTILINE)


def blocks() -> list[tuple[str, str | None, str]]:
    found = []
    for page in [*PAGES, ROOT / "README.md"]:
        for n, match in enumerate(BLOCK.finditer(page.read_text()), 1):
            if page.name == "README.md" and match["source"] is None:
                continue  # tests/test_readme.py runs the README's example
            found.append((f"{page.name}#{n}", match["source"], match["code"]))
    return found


@pytest.mark.parametrize(("where", "source", "code"), blocks(), ids=[b[0] for b in blocks()])
def test_each_block_is_copied_from_its_source_or_runs(
    where: str, source: str | None, code: str
) -> None:
    if source is None:
        exec(compile(code, where, "exec"), {})  # a self-contained snippet (no I/O)
        return
    text = (ROOT / source).read_text()
    position = 0
    for part in ELIDED.split(code):
        found = text.find(part, position)
        assert found >= 0, f"{where}: not in {source} (or out of order):\n{part}"
        position = found + len(part)


def test_the_readme_links_every_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert PAGES, "no docs pages"
    for page in PAGES:
        assert f"](docs/{page.name})" in readme, page.name
