"""Reading the official and community file formats: detection, key mapping, strict loading.

Every file is validated (convert/header.py) and its quantization recognized (convert/quant.py) before
a loader reads a shape; `describe` says what a file is (`python -m convert inspect`). The layouts
each loader reads, and why each mapping is what it is: docs/formats.md.
"""

from .autoencoder import load_autoencoder
from .describe import describe
from .errors import CheckpointError, UnsupportedQuantization
from .files import Checkpoint, save_safetensors_atomic, write_atomic
from .load import Detected, detect_transformer, load_transformer
from .lora import load_lora, load_text_encoder_lora, save_lora
from .text_encoders import load_text_encoder
from .tokenizer import load_tokenizer

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Detected",
    "UnsupportedQuantization",
    "describe",
    "detect_transformer",
    "load_autoencoder",
    "load_lora",
    "load_text_encoder",
    "load_text_encoder_lora",
    "load_tokenizer",
    "load_transformer",
    "save_lora",
    "save_safetensors_atomic",
    "write_atomic",
]
