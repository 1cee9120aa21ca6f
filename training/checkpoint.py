"""Training checkpoints in safetensors only (nothing is pickled), written atomically.

One file `checkpoints/step-NNNNNNN.safetensors` holds the trained parameters (`lora.<parameter name>`)
and the optimizer's state tensors (`optimizer.<index>.exp_avg`, ...); the header holds, as JSON, the
step, the optimizer's param groups and scalar state, and the run's settings. The learning-rate
schedule and every random draw are functions of the step and the seed (training/data.py), so the
step is the whole scheduler and RNG state: a resumed run repeats the uninterrupted one exactly.
Under `--fsdp` the tensors are gathered whole first (training/fsdp.py): the file is the same, so
either mode resumes the other's checkpoints.

Resuming, the run's settings come from its checkpoint (`read_run`; training/config.py `make_config`
fills in every setting not given anew). A setting given anew that differs is refused if it changes
what the checkpoint's tensors are (`FIXED`), else applied with its old and new values printed
(`check_resumed_settings`). A checkpoint is not a LoRA file: `mmdit sample --lora` takes the run's
`lora.safetensors`, and says so when given a checkpoint (its header entry `mmdit.step` marks it).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import Tensor

from convert.files import Checkpoint, CheckpointError, read_header, save_safetensors_atomic

from .disk import writing
from .fsdp import shard_like

log = logging.getLogger(__name__)

NAME = re.compile(r"step-(\d+)\.safetensors")
MARKER = "mmdit.step"  # the header entry that makes a file a training checkpoint: its step
# settings that say what the checkpoint's tensors are: a resumed run cannot change them
FIXED = ("model", "train", "rank", "alpha", "targets")
# settings whose change keeps a resumed run equal to an uninterrupted one (and steps, with a constant lr)
NEUTRAL = {"resume", "output", "cache", "device", "progress", "checkpoint_every", "keep_checkpoints",
           "gradient_checkpointing", "fsdp"}


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:07d}.safetensors"


def list_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in `folder`, oldest first."""
    found = [(int(m[1]), p) for p in folder.glob("step-*.safetensors") if (m := NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(path: Path, step: int, params: dict[str, Tensor], optimizer_state: dict, settings: str) -> None:
    """Write the checkpoint of `step`: the trained parameters and `optimizer.state_dict()`, full tensors (under
    --fsdp, training/fsdp.py `gathered`); settings: the run's `TrainConfig.to_json()`. `WriteError` if it cannot."""
    sd = optimizer_state
    tensors = {f"lora.{k}": v for k, v in params.items()}
    scalars: dict[str, dict] = {}
    for idx, state in sd["state"].items():
        for k, v in state.items():
            if isinstance(v, Tensor):
                tensors[f"optimizer.{idx}.{k}"] = v
            else:
                scalars.setdefault(str(idx), {})[k] = v
    header = {
        MARKER: str(step),
        "mmdit.optimizer": json.dumps({"param_groups": sd["param_groups"], "scalars": scalars}),
        "mmdit.config": settings,
    }
    with writing(path):
        save_safetensors_atomic(tensors, path, header)


def load_checkpoint(path: Path, params: dict[str, Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Restore the trained parameters and the optimizer in place (under --fsdp, each process its shards of
    them); returns the checkpoint's step."""
    ckpt = Checkpoint.open(path)
    if MARKER not in ckpt.metadata:
        raise CheckpointError(f"{path}: not a training checkpoint (no {MARKER} in its header)")
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
            p.copy_(shard_like(value, p))
    opt = json.loads(ckpt.metadata["mmdit.optimizer"])
    state: dict[int, dict] = {}
    trained = list(params.values())  # the optimizer's parameters, in its order
    for k in ckpt:
        if k.startswith("optimizer."):
            _, idx, name = k.split(".", 2)
            value = ckpt.load(k)
            p = trained[int(idx)] if int(idx) < len(trained) else None
            sharded = p is not None and value.shape == p.shape  # a moment of parameter idx (not its step count)
            state.setdefault(int(idx), {})[name] = shard_like(value, p) if sharded else value
    for idx, values in opt["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in opt["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    return int(ckpt.metadata[MARKER])


def find_checkpoint(output: str | Path | None, resume: str | None) -> Path | None:
    """The checkpoint a run continues from: None for a new run (`resume` None), and for "latest" when
    OUTPUT/checkpoints holds none; else the newest there ("latest"), or the file named."""
    if resume is None:
        return None
    if resume != "latest":
        return Path(resume)
    existing = list_checkpoints(Path(output) / "checkpoints") if output else []
    return existing[-1] if existing else None


def read_run(path: Path) -> tuple[int, dict]:
    """(step, settings) of the run that wrote checkpoint `path`, from its header (nothing else is read)."""
    meta = read_header(path).get("__metadata__") or {}
    if MARKER not in meta or "mmdit.config" not in meta:
        raise CheckpointError(f"{path}: not a training checkpoint of mmdit train (no {MARKER} in its header)")
    try:
        settings = json.loads(meta["mmdit.config"])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its mmdit.config header entry is not JSON ({e})") from None
    if not isinstance(settings, dict):
        raise CheckpointError(f"{path}: its mmdit.config header entry is not a JSON object")
    return int(meta[MARKER]), settings


def check_resumed_settings(path: Path, step: int, saved: dict, now: dict) -> None:
    """The settings a run resumes from `path` (at `step`) with (`now`) against the run's own (`saved`):
    a change of a `FIXED` setting, or fewer steps than done, is a ValueError; any other change is logged
    with its old and new values, and whether the run still repeats an uninterrupted one."""
    changed = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v and k != "resume"}
    refused = [k for k in FIXED if k in changed]
    if refused:
        listed = ", ".join(f"--{k.replace('_', '-')} {changed[k][1]!r} (the run's: {changed[k][0]!r})" for k in refused)
        raise ValueError(f"{path}: a resumed run keeps its model, what trains and the LoRA's shape: {listed}; "
                         "leave them out, or start a new run in another --output folder")
    if now["steps"] < step:
        raise ValueError(f"{path}: the run is at step {step}: --steps must be at least that, got {now['steps']}")
    if not changed:
        return
    neutral = NEUTRAL | ({"steps"} if now["lr_schedule"] == "constant" else set())
    listed = ", ".join(f"--{k.replace('_', '-')} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
    inexact = sorted(k for k in changed if k not in neutral)
    note = f"; the run will not repeat an uninterrupted one ({', '.join(inexact)} changed)" if inexact else ""
    log.warning("resuming from %s (step %d) with changed settings: %s%s", path, step, listed, note)


def prune(folder: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints."""
    for p in list_checkpoints(folder)[:-keep]:
        p.unlink(missing_ok=True)
