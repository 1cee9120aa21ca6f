"""Reading the official and community file formats: detection, key mapping, strict loading."""

from importlib import import_module

from .files import Checkpoint, CheckpointError, save_safetensors_atomic
from .load import Detected, detect_transformer, load_transformer

# Loaders of the other parts live in their own modules, imported on first use.
_LAZY = {
    "load_text_encoder": "text_encoders",
    "load_tokenizer": "tokenizer",
    "load_autoencoder": "autoencoder",
    "load_lora": "lora",
    "load_text_encoder_lora": "lora",
    "save_lora": "lora",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'convert' has no attribute {name!r}")


__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Detected",
    "detect_transformer",
    "load_transformer",
    "save_safetensors_atomic",
    *_LAZY,
]
