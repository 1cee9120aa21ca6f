"""The run's files on disk: write failures as one clear error, and the temporary files a kill leaves.

Every file of a run is written whole or not at all (`convert.files.write_atomic`: a hidden temporary
file `.{name}.XXXXXXXX.tmp` beside the target, then a rename). A full disk or a folder that cannot be
written fails that write: `writing(path)` turns the failure (an `OSError`, or the `SafetensorError`
the safetensors writer raises instead, e.g. "I/O error: No space left on device (os error 28)") into
one `WriteError` naming the file, which `mmdit train` reports in one line with its own exit code.
A process killed while writing leaves its temporary file behind (up to a whole checkpoint);
`remove_stale_temporaries` deletes those at the next start.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

log = logging.getLogger(__name__)

# write_atomic's temporary names: "." + the target's name + "." + tempfile's 8 random characters + ".tmp"
TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


class WriteError(OSError):
    """A file of the run could not be written (disk full, no permission): the message names the file."""


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Run a write of `path`; its failure becomes a `WriteError` naming the file and the reason."""
    try:
        yield
    except WriteError:
        raise
    except (OSError, SafetensorError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        reason = reason.removeprefix("Error while serializing: ")  # safetensors' wording
        raise WriteError(f"{path}: cannot write: {reason}") from None


def remove_stale_temporaries(folders: Iterable[Path], older_than: float = 0.0) -> int:
    """Delete the temporary files (and folders) of interrupted writes in `folders` (not below them):
    those whose last change is more than `older_than` seconds ago. Returns how many were removed."""
    removed, now = 0, time.time()
    for folder in folders:
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if not TEMPORARY.fullmatch(p.name) or now - p.lstat().st_mtime < older_than:
                continue
            log.info("removing %s, left by an interrupted write", p)
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed
