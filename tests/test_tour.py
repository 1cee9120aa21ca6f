"""docs/tour.md runs: its ```python blocks are executed in order, in one namespace, so the tour cannot go stale."""

from __future__ import annotations

import code
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


def interactive_syntax_errors(code_text: str) -> list[int]:
    """The lines (0-based) where pasting `code_text` line by line into an interactive `python` prompt
    stops with a SyntaxError: an indented block not closed by a blank line before the next statement,
    or a blank line inside one. The prompt's own reader (`code.InteractiveConsole.push`), compiling only."""
    class Paste(code.InteractiveConsole):
        def __init__(self):
            super().__init__()
            self.line, self.errors = 0, []

        def runcode(self, _compiled):  # compile, never run
            pass

        def showsyntaxerror(self, filename=None, **kwargs):
            self.errors.append(self.line)

    prompt = Paste()
    for i, text in enumerate([*code_text.split("\n"), ""]):
        prompt.line = i
        prompt.push(text)
    return prompt.errors


def test_interactive_check_finds_an_unclosed_block():
    assert interactive_syntax_errors("for i in range(2):\n    x = i\ny = 1\n") == [2]
    assert interactive_syntax_errors("for i in range(2):\n    x = i\n\ny = 1\n") == []
    assert interactive_syntax_errors("def f():\n    a = 1\n\n    return a\n") == [3]  # a blank line ends the def


def test_tour_blocks_paste_into_the_interactive_prompt():
    """Every block can be pasted into `python`: each indented block is followed by a blank line."""
    for line, code_text in python_blocks(TOUR.read_text(encoding="utf-8")):
        bad = [line + i for i in interactive_syntax_errors(code_text)]
        assert not bad, f"docs/tour.md line(s) {bad}: add a blank line after the indented block above"
