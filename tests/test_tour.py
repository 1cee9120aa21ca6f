"""docs/tour.md runs: its ```python blocks are executed in order, in one namespace, so the tour cannot go stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

TOUR = Path(__file__).resolve().parent.parent / "docs" / "tour.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the block's first code line, code) for every ```python block."""
    return [(text[: m.start(1)].count("\n") + 1, m[1]) for m in re.finditer(r"^```python\n(.*?)^```$", text, re.S | re.M)]


def test_tour_snippets_run():
    blocks = python_blocks(TOUR.read_text(encoding="utf-8"))
    assert len(blocks) >= 10, "the tour lost its code blocks"
    namespace: dict = {"__name__": "tour"}
    with torch.random.fork_rng(), torch.enable_grad():  # the tour seeds the RNG and turns gradients off
        for line, code in blocks:
            # pad with newlines so that a failure's traceback points at the line in docs/tour.md
            exec(compile("\n" * (line - 1) + code, str(TOUR), "exec"), namespace)
