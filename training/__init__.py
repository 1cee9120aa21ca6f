"""TACA + LoRA fine-tuning of the MM-DiT models: data caching, the flow-matching loss in TACA's window,
the loop (AdamW, accumulation, checkpoints with exact resume, data parallel over processes), the CLI.

    from training import TrainConfig, train
    result = train(TrainConfig(model="flux1-dev.safetensors", data="pairs/", output="run/", steps=2000))
"""

from .config import TrainConfig, make_config
from .data import Encoders, encoders_from_pipeline
from .loop import TrainingError, TrainResult, train

__all__ = ["Encoders", "TrainConfig", "TrainResult", "TrainingError", "encoders_from_pipeline", "make_config", "train"]
