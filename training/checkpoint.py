"""Training checkpoints in safetensors only (nothing is pickled), written atomically.

One file `checkpoints/step-NNNNNNN.safetensors` holds the LoRA parameters (`lora.<parameter name>`)
and the optimizer's state tensors (`optimizer.<index>.exp_avg`, ...); the header holds, as JSON, the
step, the optimizer's param groups and scalar state, and the run's config. The learning-rate
schedule and every random draw are functions of the step and the seed (training/data.py), so the
step is the whole scheduler and RNG state: a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from convert.files import Checkpoint, CheckpointError, save_safetensors_atomic

NAME = re.compile(r"step-(\d+)\.safetensors")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.safetensors"


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, oldest first."""
    found = [(int(m[1]), p) for p in folder.glob("step-*.safetensors") if (m := NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
    path: Path, step: int, params: dict[str, Tensor], optimizer: torch.optim.Optimizer, config_json: str
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
        "mmdit.config": config_json,
    }
    save_safetensors_atomic(tensors, path, header)


def load_checkpoint(path: Path, params: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore the LoRA parameters and the optimizer in place; returns (step, the saved config)."""
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
    return int(ckpt.metadata["mmdit.step"]), json.loads(ckpt.metadata["mmdit.config"])


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for p in list_checkpoints(folder)[:-keep]:
        p.unlink(missing_ok=True)
