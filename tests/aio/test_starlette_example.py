"""The Starlette example of docs/asyncio.md, run as written on Redis and etcd.

tests/unit/test_doc_snippets.py runs it on ``memory://``; here ``DCOORD_URL`` points it
at the shared test server, and its namespace is swapped for the test's own (a confined
user of DCOORD_TEST_SECURE may only use that one).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## A Starlette app guarded by a lock"


def example() -> str:
    text = (ROOT / "docs" / "asyncio.md").read_text()
    section = text[text.index(HEADING) :]
    block = re.search(r"^```python\n(.*?)^```", section, re.S | re.M)
    assert block is not None, "the example's python block"
    return block.group(1)


@pytest.mark.parametrize("backend", ["redis", "etcd"], indirect=True)
def test_the_starlette_example_runs_on_a_server(aio_url: str, namespace: str) -> None:
    code = example()
    assert 'namespace="shop"' in code
    code = code.replace('namespace="shop"', f"namespace={namespace!r}")
    env = {**os.environ, "DCOORD_URL": aio_url, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
