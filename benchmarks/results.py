"""benchmarks/RESULTS.md: each benchmark replaces its own section, and says on which machine it ran."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

from convert.files import write_atomic

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """CPU model, cores, memory and OS of this machine, in one line (Linux: /proc)."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    if info.exists() and (m := re.search(r"^model name\s*:\s*(.+)$", info.read_text(), re.M)):
        cpu = m[1].strip()
    mem = int(re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)[1]) / 2**20
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} {platform.release()}"


def write_section(text: str) -> None:
    """Replace the section whose heading is the first line of `text` (or append it), leaving the others alone."""
    heading = text.split("\n", 1)[0]
    old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.M | re.S)
    new = pattern.sub(lambda _: text, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    write_atomic(RESULTS, lambda tmp: Path(tmp).write_text(new))
    print(f"wrote the section {heading!r} of {RESULTS}")
