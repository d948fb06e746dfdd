"""Every ```python block in README.md and docs/*.md runs as written, or says why not.

A block that is not meant to run (it needs a server, or it is a fragment of an API
overview) has ``<!-- not run: why -->`` on the line right before it. Every other block is
run in a fresh interpreter (on the embedded backend: no DCOORD_URL) and must exit 0.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?P<lang>[^\n`]*)\n(?P<code>.*?)^```[ \t]*$", re.S | re.M)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(?P<why>\S.*?)\s*-->")


@dataclass(frozen=True)
class Snippet:
    where: str
    """file:line of the opening fence."""
    code: str
    not_run: str | None
    """Why it is not run (the marker's text), or None: it must run."""


def snippets(path: Path) -> list[Snippet]:
    """The python blocks of ``path`` with the marker before each, if any."""
    text = path.read_text()
    found = []
    for block in FENCE.finditer(text):
        lang = block["lang"].strip().lower()
        line = text.count("\n", 0, block.start()) + 1
        where = f"{path.relative_to(ROOT)}:{line}"
        if lang.startswith("py") and lang != "python":
            pytest.fail(f"{where}: fence it as ```python so that this test sees it")
        if lang != "python":
            continue
        before = text[: block.start()].rstrip().rsplit("\n", 1)[-1].strip()
        marker = NOT_RUN.fullmatch(before)
        found.append(Snippet(where, block["code"], None if marker is None else marker["why"]))
    return found


ALL = [snippet for path in DOCS for snippet in snippets(path)]


def test_every_not_run_marker_is_right_before_a_python_block() -> None:
    markers = sum(len(NOT_RUN.findall(path.read_text())) for path in DOCS)
    assert markers == sum(1 for s in ALL if s.not_run is not None)


def test_the_readme_and_the_transactions_guide_have_blocks_that_run() -> None:
    runs = {s.where.split(":")[0] for s in ALL if s.not_run is None}
    assert {"README.md", "docs/transactions.md"} <= runs


@pytest.mark.parametrize("snippet", ALL, ids=[s.where for s in ALL])
def test_python_block_runs(snippet: Snippet, tmp_path: Path) -> None:
    if snippet.not_run is not None:
        pytest.skip(f"marked not run: {snippet.not_run}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCOORD_")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", snippet.code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{snippet.where} failed:\n{result.stderr}"
