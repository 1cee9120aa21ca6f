"""The settings of a training run: one dataclass, read from a TOML file and/or command-line flags.

Precedence: the dataclass defaults, then the TOML file (`--config run.toml`, keys as the field
names, dashes or underscores), then the flags given on the command line. The defaults follow the
TACA paper (arXiv 2506.07986): a rank-16 LoRA on the attention projections, trained with the
temperature gamma = 1.2 on the model timesteps >= 970 (t >= 0.97) only.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

TIMESTEP_SAMPLING = ("window", "logit-normal", "uniform")
MIXED_PRECISION = ("bf16", "no")
TRAIN = ("lora", "full")
LR_SCHEDULES = ("constant", "cosine")
DTYPES = ("bfloat16", "float16", "float32")


@dataclass
class TrainConfig:
    model: str = ""  # transformer source: file, folder or hub id (as `load_pipeline` takes it)
    data: str = ""  # folder of images + same-name .txt captions, or a .jsonl manifest
    output: str = ""  # lora.safetensors, log.jsonl, checkpoints/, cache/ (unless `cache` is set)
    cache: str | None = None  # where latents and text embeddings are cached (default OUTPUT/cache)
    steps: int = 1000
    batch_size: int = 1  # global: summed over processes and accumulation micro-steps
    grad_accum: int = 1
    resolution: int = 512  # square side in pixels, or the bucket area resolution**2 with `buckets`
    buckets: bool = False  # aspect-ratio buckets instead of the center-cropped square
    rank: int = 16
    alpha: float | None = None  # default: rank (scale 1)
    targets: list[str] = field(default_factory=lambda: ["attn"])  # mmdit.lora target groups or regexes
    dropout: float = 0.0  # LoRA dropout
    train: str = "lora"  # lora: a TACA LoRA on the frozen model; full: every weight (training from scratch)
    lr: float = 1e-4
    warmup_steps: int = 0  # linear warm-up from 0, then `lr_schedule`
    lr_schedule: str = "constant"  # constant, or cosine: down to 0 at the last step
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0: no clipping
    taca_gamma: float = 1.2  # 1.0: plain attention (a LoRA without TACA)
    t_min: float = 0.97  # TACA's window: gamma applies where t >= t_min, as at sampling
    timesteps: str = "window"  # window: t ~ U[t_min, 1]; logit-normal: sigmoid(N(0, 1)); uniform: U[0, 1]
    guidance: float = 3.5  # distilled guidance fed to guidance-embedded models (FLUX-dev); ignored otherwise
    seed: int = 0
    dtype: str = "bfloat16"  # of the frozen base weights; the LoRA trains in float32
    mixed_precision: str = "bf16"  # autocast dtype of the forward ("no": the base dtype)
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # the newest N training checkpoints are kept
    resume: str | None = None  # "latest" (in OUTPUT/checkpoints) or a checkpoint file
    device: str | None = None  # default: cuda (this process's local rank) if available, else cpu
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "resolution", "rank", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 (8x autoencoder, 2x2 patches): {self.resolution}")
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"t_min must lie in [0, 1), got {self.t_min}")
        choices = {"timesteps": TIMESTEP_SAMPLING, "mixed_precision": MIXED_PRECISION, "dtype": DTYPES,
                   "train": TRAIN, "lr_schedule": LR_SCHEDULES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if isinstance(self.targets, str):
            self.targets = [s for s in self.targets.split(",") if s]

    @property
    def cache_dir(self) -> Path:
        return Path(self.cache) if self.cache else Path(self.output) / "cache"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


def read_toml(path: str | Path) -> dict:
    """The fields a TOML file sets; unknown keys are an error naming them."""
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    known = {f.name for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return values


def make_config(toml: str | Path | None = None, **flags) -> TrainConfig:
    """Defaults < TOML file < flags (flags set to None count as not given)."""
    values = read_toml(toml) if toml else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    missing = [k for k in ("model", "data", "output") if not values.get(k)]
    if missing:
        raise ValueError(f"no {', '.join(missing)} given (flags --{' --'.join(missing)} or the TOML file)")
    return TrainConfig(**values)
