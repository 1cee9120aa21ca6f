"""The settings of a training run: one dataclass, read from a TOML file and/or command-line flags.

Every field is a flag of `mmdit train` (training/cli.py) with the field's help text and default.
Precedence: the dataclass defaults, then the TOML file (`--config run.toml`, keys as the field
names, dashes or underscores), then the flags given on the command line. A resumed run (`resume`)
takes its checkpoint's settings in place of the defaults: `--output` and `--resume` are all it needs
(training/checkpoint.py says which settings may then change). The defaults follow the TACA paper
(arXiv 2506.07986): a rank-16 LoRA on the attention projections, trained with the temperature
gamma = 1.2 on the model timesteps >= 970 (t >= 0.97) only; the image size is the model's own, as
`mmdit sample` draws it (`native_resolution`).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from convert import detect_transformer
from sampling.hub import resolve
from sampling.parts import model_index
from sampling.pipeline import defaults_for

from .checkpoint import find_checkpoint, read_run

TIMESTEP_SAMPLING = ("window", "logit-normal", "uniform")
MIXED_PRECISION = ("bf16", "no")
TRAIN = ("lora", "full")
LR_SCHEDULES = ("constant", "cosine")
DTYPES = ("bfloat16", "float16", "float32")
REQUIRED = ("model", "data", "output")
HOW_TO_GIVE = {  # what to pass for each required setting
    "model": "--model SOURCE (a Diffusers folder such as assets/tiny-flux, an official single file such as "
             "flux1-dev.safetensors, or a hub repo id such as black-forest-labs/FLUX.1-dev)",
    "data": "--data FOLDER (images with same-name .txt captions) or --data FILE.jsonl (lines of {image, caption})",
    "output": "--output FOLDER (for the LoRA, the checkpoints and the log; with --resume: the run's folder)",
}


def setting(default, help: str):
    """A field of `TrainConfig` with the help text of its flag."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    model: str = setting("", "model source, as for mmdit sample: Diffusers folder, official single file "
                             "or hub repo id")
    data: str = setting("", "folder of images with same-name .txt captions (searched recursively), "
                            "or a .jsonl manifest of {image, caption}")
    output: str = setting("", "folder for lora.safetensors, log.jsonl, checkpoints/ and cache/")
    cache: str | None = setting(None, "folder of the cached latents and text embeddings (default OUTPUT/cache)")
    steps: int = setting(1000, "optimizer steps")
    batch_size: int = setting(1, "global batch: pairs per optimizer step, over all processes and micro-steps")
    grad_accum: int = setting(1, "micro-steps per optimizer step, their gradients summed")
    resolution: int | None = setting(None, "image side in pixels, a multiple of 16; with --buckets, the bucket "
                                           "area is its square (default: the model's own size, as mmdit sample "
                                           "draws it: 32 for assets/tiny-flux, 1024 for FLUX.1 and SD3.5)")
    buckets: bool = setting(False, "aspect-ratio buckets instead of a center-cropped square")
    native_size: bool = setting(False, "train each image at its own size, center-cropped to sides that are "
                                       "multiples of 16 (no resizing): data drawn at several sizes trains at each, "
                                       "one size per batch; --resolution and --buckets are then unused")
    rank: int = setting(16, "LoRA rank")
    alpha: float | None = setting(None, "LoRA alpha (default: the rank, a scale of 1)")
    targets: list[str] = setting(["attn"], "comma-separated LoRA targets: attn, mlp, mod (mmdit.lora) "
                                           "or module regexes")
    dropout: float = setting(0.0, "LoRA dropout")
    train: str = setting("lora", "what trains: lora, a TACA LoRA on the frozen model; or full, every weight "
                                 "(e.g. from a random init)")
    lr: float = setting(1e-4, "AdamW learning rate")
    warmup_steps: int = setting(0, "steps of linear warm-up from 0")
    lr_schedule: str = setting("constant", "after the warm-up: constant, or cosine down to 0 at the last step")
    weight_decay: float = setting(0.01, "AdamW weight decay")
    max_grad_norm: float = setting(1.0, "gradient clipping norm, 0 for none")
    taca_gamma: float = setting(1.2, "TACA temperature of the image-to-text logits, paper: 1.2; 1 for plain attention")
    t_min: float = setting(0.97, "TACA's window: gamma applies where t >= T_MIN, as at sampling; "
                                 "paper: 0.97, model timestep 970")
    timesteps: str = setting("window", "timestep sampling: window, t ~ U[t_min, 1]; logit-normal, "
                                       "sigmoid(N(0, 1)); or uniform, U[0, 1]")
    caption_dropout: float = setting(0.0, "probability that a pair trains with the empty caption in place of its "
                                          "own, so that the model also learns the unconditional velocity that "
                                          "classifier-free guidance samples against (0.1 is usual)")
    guidance: float = setting(3.5, "distilled guidance fed to guidance-embedded models (FLUX.1-dev, FLUX.2 [dev]); "
                                   "ignored by others")
    seed: int = setting(0, "seed of the LoRA init, data order, noise and timesteps")
    dtype: str = setting("bfloat16", "dtype of the frozen base weights: bfloat16, float16 or float32; "
                                     "the LoRA trains in float32")
    mixed_precision: str = setting("bf16", "autocast of the forward: bf16, or no for the base dtype")
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward, for less memory")
    fsdp: bool = setting(False, "under torchrun, shard the model's weights (and what trains, and its optimizer "
                                "state) over the processes with PyTorch's FSDP2, for a model one GPU cannot hold")
    checkpoint_every: int = setting(500, "steps between training checkpoints")
    keep_checkpoints: int = setting(2, "the newest N training checkpoints are kept")
    resume: str | None = setting(None, "continue from the newest checkpoint in OUTPUT/checkpoints (no value) "
                                       "or the checkpoint file given, with the run's own settings (default: "
                                       "a new run)")
    device: str | None = setting(None, "device (default: cuda, this process's local rank, if available, else cpu)")
    progress: bool = setting(True, "progress bar")

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "resolution", "rank", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.resolution is not None and self.resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16 (8x autoencoder, 2x2 patches): {self.resolution}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must lie in [0, 1), got {self.caption_dropout}")
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


# the TOML value types each field's annotation accepts (an int is a float too; a bool is neither)
TOML_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "list[str]": (list, str)}


def read_toml(path: str | Path) -> dict:
    """The fields a TOML file sets. ValueError naming the file: invalid TOML, unknown keys, a value of the
    wrong type (`steps = "two"`, `lr = "x"`, `fsdp = "yes"`)."""
    with open(path, "rb") as f:
        try:
            raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e})") from None
    kinds = {f.name: f.type.removesuffix(" | None") for f in fields(TrainConfig)}
    values = {k.replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(kinds))
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(kinds))}")
    for name, value in values.items():
        ok = isinstance(value, TOML_TYPES[kinds[name]]) and (kinds[name] == "bool" or not isinstance(value, bool))
        if kinds[name] == "list[str]" and isinstance(value, list):
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            raise ValueError(f"{path}: {name.replace('_', '-')} = {value!r}: expected {kinds[name]}")
    return values


def make_config(toml: str | Path | None = None, **flags) -> TrainConfig:
    """Defaults < TOML file < flags (flags set to None count as not given); resuming, the run's own settings
    (read from its checkpoint: the newest in OUTPUT/checkpoints, or the file `resume` names) take the
    defaults' place. ValueError naming what is missing and what to pass."""
    values = read_toml(toml) if toml else {}
    values.update({k: v for k, v in flags.items() if v is not None})
    resumed = find_checkpoint(values.get("output"), values.get("resume"))
    if resumed is not None:
        known = {f.name for f in fields(TrainConfig)}
        _, saved = read_run(resumed)
        values = {**{k: v for k, v in saved.items() if k in known and k != "resume"}, **values}
    missing = [k for k in REQUIRED if not values.get(k)]
    if missing:
        nothing = " (and no checkpoint to resume from)" if values.get("resume") else ""
        raise ValueError(f"no {', '.join(missing)} given{nothing}: pass " + "; ".join(HOW_TO_GIVE[k] for k in missing))
    return TrainConfig(**values)


def native_resolution(model: str) -> int:
    """The image side `mmdit sample` draws `model` at: its folder's `sampling_defaults` size (assets/tiny-flux:
    32), else its variant's (sampling/pipeline.py `DEFAULTS`: 1024). Reads headers only (a hub source is
    downloaded, as training would)."""
    path = resolve(model)[0]
    own = (model_index(path).get("sampling_defaults") or {}).get("size")
    return int(own) if own else defaults_for(detect_transformer(path).variant).size
