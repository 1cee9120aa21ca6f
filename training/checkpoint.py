"""Training checkpoints in safetensors only (nothing is pickled), written atomically.

One file `checkpoints/step-NNNNNNN.safetensors` holds the trained parameters (`lora.<parameter name>`)
and the optimizer's state tensors (`optimizer.<index>.exp_avg`, ...); the header holds, as JSON, the
step, the optimizer's param groups and scalar state, and the run's config. The learning-rate
schedule and every random draw are functions of the step and the seed (training/data.py), so the
step is the whole scheduler and RNG state: a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from convert.files import Checkpoint, CheckpointError, save_safetensors_atomic

from .config import TrainConfig

log = logging.getLogger(__name__)

NAME = re.compile(r"step-(\d+)\.safetensors")
# settings a resumed run may change without breaking the continuation
RESUMABLE_CHANGES = {"steps", "resume", "progress", "checkpoint_every", "keep_checkpoints", "device", "cache"}


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.safetensors"


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, oldest first."""
    found = [(int(m[1]), p) for p in folder.glob("step-*.safetensors") if (m := NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    path: Path, step: int, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, cfg: TrainConfig
) -> None:
    sd = optimizer.state_dict()
    tensors = {f"lora.{k}": v for k, v in params.items()}
    scalars: dict[str, dict] = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    header = {
        "mmdit.step": str(step),
        "mmdit.optimizer": json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}),
        "mmdit.config": cfg.to_json(),
    }
    save_safetensors_atomic(tensors, path, header)


def load_checkpoint(path: Path, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> int:
    """Restore the trained parameters and the optimizer in place; returns the checkpoint's step. Settings
    changed since (other than `RESUMABLE_CHANGES`) get a warning: the run will not repeat an uninterrupted one."""
    ckpt = Checkpoint.open(path)
    if "mmdit.step" not in ckpt.metadata:
        raise CheckpointError(f"{path}: not a training checkpoint (no mmdit.step in its header)")
    saved = {k[len("lora."):] for k in ckpt if k.startswith("lora.")}
    if saved != set(params):
        missing, unexpected = sorted(set(params) - saved), sorted(saved - set(params))
        raise CheckpointError(
            f"{path}: its LoRA does not match this run's (other rank, targets or model?); "
            f"missing {len(missing)} {missing[:3]}, unexpected {len(unexpected)} {unexpected[:3]}"
        )
    with torch.no_grad():
        for k, p in params.items():
            value = ckpt.load(f"lora.{k}")
            if value.shape != p.shape:
                raise CheckpointError(f"{path}: lora.{k} has shape {list(value.shape)}, this run's is {list(p.shape)}")
            p.copy_(value)
    opt = json.loads(ckpt.metadata["mmdit.optimizer"])
    state: dict[int, dict] = {}
    for k in ckpt:
        if k.startswith("optimizer."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = ckpt.load(k)
    for idx, values in opt["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in opt["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})

    saved_cfg, now = json.loads(ckpt.metadata["mmdit.config"]), dataclasses.asdict(cfg)
    changed = sorted(k for k, v in now.items() if saved_cfg.get(k, v) != v and k not in RESUMABLE_CHANGES)
    if changed:
        log.warning("resuming with changed settings %s: the run will not repeat an uninterrupted one", changed)
    return int(ckpt.metadata["mmdit.step"])


def resume(cfg: TrainConfig, folder: Path, params: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> int:
    """The step to start from: 0, or with `cfg.resume` the step of the checkpoint restored in place
    (the newest in `folder` for "latest", else the file named)."""
    if cfg.resume is None:
        return 0
    existing = list_checkpoints(folder)
    if cfg.resume == "latest" and not existing:
        log.warning("no checkpoint in %s: starting from step 0", folder)
        return 0
    path = existing[-1] if cfg.resume == "latest" else Path(cfg.resume)
    step = load_checkpoint(path, params, optimizer, cfg)
    log.info("resumed from %s at step %d", path, step)
    return step


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for p in list_checkpoints(folder)[:-keep]:
        p.unlink(missing_ok=True)
