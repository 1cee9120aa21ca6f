"""The errors convert/ raises about files: every message names the file, and the key or field at fault."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked: the message names the file, key or shape."""


class UnsupportedQuantization(CheckpointError):
    """A file quantized in a format this project does not read; `format` names the format (convert/quant.py)."""

    def __init__(self, message: str, format: str):
        super().__init__(message)
        self.format = format
