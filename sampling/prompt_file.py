"""The prompt file of `mmdit sample --prompts FILE` and the `--seeds` flag: the list of items to draw.

FILE is read as UTF-8 with any line ending (\\n, \\r\\n: T2I-CompBench's lists have both):
- a text file: one prompt a line, stripped of surrounding spaces; blank lines and lines starting
  with `#` are skipped;
- a `.jsonl` file: one JSON object a line, `{"prompt": "...", "negative": "...", "seed": 7}`;
  "prompt" is required, "negative" (this line's negative prompt, over `--negative`) and "seed" (this
  line's one seed, over `--seeds`) are optional; blank lines and `#` lines are skipped; any other
  field is refused, so that a misspelt one is not silently ignored.
Each prompt gives one item per seed (`--seeds`, default 0), prompt-major: item `index = p * len(seeds) + s`
for the p-th prompt and its s-th seed (a JSONL line with a seed: one item), which is the order the
T2I-CompBench scripts expect (`3_in_1_eval/3_in_1.py` reads prompt i's images at `i*num:(i+1)*num`).
Every error names the file and the line, and nothing is written before the file is read whole.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from .limits import MAX_SEED

FIELDS = ("prompt", "negative", "seed")  # a JSONL line's fields


@dataclass(frozen=True)
class Item:
    """One image to draw: its place in the whole list, its prompt, seed and negative prompt (None: `--negative`)."""

    index: int
    prompt: str
    seed: int
    negative: str | None = None
    line: int = 0  # its line in the prompt file (1-based), for messages


def parse_seeds(text: str) -> list[int]:
    """An argparse type for one `--seeds` word: a seed "7" or an inclusive range "0-3" -> [0, 1, 2, 3]."""
    low, dash, high = text.partition("-")
    try:
        first, last = int(low), int(high if dash else low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a seed or a range of seeds (e.g. 7 or 0-3): {text!r}") from None
    if first > last:
        raise argparse.ArgumentTypeError(f"an empty range of seeds: {text!r} (write the lower seed first, e.g. 1-3)")
    if not (0 <= first and last <= MAX_SEED):
        raise argparse.ArgumentTypeError(f"seeds lie in 0..2**64 - 1, got {text!r}")
    return list(range(first, last + 1))


def read_prompts(path: Path, seeds: list[int]) -> list[Item]:
    """The items of the prompt file at `path` (text, or JSONL for a `.jsonl` name), `seeds` for each prompt.

    Raises ValueError (or OSError) naming the file, and the line where it applies: an unreadable file,
    no prompt at all, a line that is not a JSON object, a missing or non-string "prompt", a bad
    "negative" or "seed", an unknown field.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first prompt
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except IsADirectoryError:
        raise IsADirectoryError(f"{path}: is a folder; name a prompt file") from None
    except OSError as e:
        raise type(e)(f"{path}: cannot read the prompt file: {e.strerror}") from None
    jsonl = path.suffix.lower() == ".jsonl"
    items: list[Item] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, negative, own_seed = parse_line(line, path, number) if jsonl else (line, None, None)
        for seed in [own_seed] if own_seed is not None else seeds:
            items.append(Item(len(items), prompt, seed, negative, number))
    if not items:
        what = "JSON lines" if jsonl else "prompts"
        raise ValueError(f"{path}: no {what} (the file is empty, or holds only blank lines and # comments)")
    return items


def parse_line(line: str, path: Path, number: int) -> tuple[str, str | None, int | None]:
    """(prompt, negative, seed) of one JSONL line; errors name the file and the line."""
    where = f"{path} line {number}"
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(value, dict):
        raise ValueError(f'{where}: expected a JSON object such as {{"prompt": "a red cube"}}')
    unknown = [k for k in value if k not in FIELDS]
    if unknown:
        raise ValueError(f"{where}: unknown field {unknown[0]!r} (the fields are {', '.join(FIELDS)})")
    if "prompt" not in value:
        raise ValueError(f'{where}: no "prompt"')
    prompt, negative, seed = value["prompt"], value.get("negative"), value.get("seed")
    if not isinstance(prompt, str):
        raise ValueError(f'{where}: "prompt" must be a string, got {prompt!r}')
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f'{where}: "negative" must be a string, got {negative!r}')
    if seed is not None and (type(seed) is not int or not 0 <= seed <= MAX_SEED):
        raise ValueError(f'{where}: "seed" must be an integer in 0..2**64 - 1, got {seed!r}')
    return prompt, negative, seed
