"""The training loop: a LoRA on a frozen MM-DiT, trained with TACA's temperature in the forward.

One optimizer step: the global batch (`batch_size` pairs, from the seeded `BatchSampler`) is split
into `grad_accum` micro-batches, each split over the processes; every sample draws its noise and t
from (seed, step, its index in the global batch), so 1 process with accumulation and N processes
compute the same samples. Gradients are averaged over processes (training/distributed.py),
clipped, and AdamW steps with a linear warm-up (then constant, or a cosine decay to 0). Only the
adapter's A and B matrices train, in float32; the base stays in `dtype` and the forward runs under
bf16 autocast by default. With `train="full"` every weight of the transformer trains instead (how
the tiny model of assets/tiny-flux is trained from its random initialization; use dtype float32).

Every `checkpoint_every` steps, on Ctrl-C or SIGTERM (after the current step) and at the end, a checkpoint is
written atomically (training/checkpoint.py); `resume` continues from one exactly. A non-finite
loss stops the run before the step is applied, naming the last good checkpoint. The result is
`OUTPUT/lora.safetensors` (Diffusers/PEFT layout with TACA metadata, `convert.save_lora`), or with
`train="full"` `OUTPUT/transformer.safetensors` (the whole transformer, BFL keys), and
`OUTPUT/log.jsonl`, one line per step.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from tqdm.auto import tqdm

import convert
from convert.files import save_safetensors_atomic, write_atomic
from mmdit.lora import inject_lora
from sampling import TacaSchedule, load_pipeline
from sampling.hub import resolve
from sampling.offload import blocks_of

from . import distributed as dist
from .checkpoint import checkpoint_path, list_checkpoints, prune, resume, save_checkpoint
from .config import TrainConfig
from .data import BatchSampler, CachedData, Encoders, derive_seed, encoders_from_pipeline, generator, prepare, scan
from .loss import batch_temperature, flow_matching_loss, sample_t

log = logging.getLogger(__name__)

ADAPTER = "taca"  # the adapter's name inside the model


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message names the last good checkpoint."""


@dataclass
class TrainResult:
    model: nn.Module  # the transformer with the trained adapter `ADAPTER` (train="full": the trained transformer)
    losses: list[float]  # the global mean loss of each step this run made
    step: int  # optimizer steps done in total
    interrupted: bool  # stopped by Ctrl-C (a checkpoint was written, no LoRA file)
    data: CachedData


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps` (step 0 gets lr / warmup_steps), then constant or cosine to 0 at `steps`."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
    return lr


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM (torchrun, schedulers) asks the loop to stop after the current step;
    the same signal again acts at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self._previous[signum])
        log.warning("%s: stopping after this step and writing a checkpoint (again to quit at once)",
                    signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")


def load_data_and_model(
    cfg: TrainConfig, device: torch.device, model: nn.Module | None, encoders: Encoders | None
) -> tuple[CachedData, nn.Module]:
    """The cached pairs, and the transformer (`model`, else loaded from `cfg.model`). The pipeline's encoders
    are loaded only if some pair is not cached yet; its transformer is then kept, the rest freed."""
    dtype = getattr(torch, cfg.dtype)
    pipe = None  # the pipeline, if its encoders were needed

    def load_encoders() -> Encoders:
        nonlocal pipe
        pipe = load_pipeline(cfg.model, device=device, dtype=dtype)
        return encoders_from_pipeline(pipe)

    tag = f"{cfg.model}|{cfg.dtype}"  # the encoders, in the cache keys
    data = prepare(scan(cfg.data), cfg.cache_dir, cfg.resolution, cfg.buckets, tag,
                   load_encoders if encoders is None else lambda: encoders)
    if model is None and pipe is not None:
        model = pipe.transformer
    pipe = None  # the encoders go
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if model is None:
        model = convert.load_transformer(resolve(cfg.model)[0], device=device, dtype=dtype)
    return data, model.to(device)


def trainable_parameters(cfg: TrainConfig, model: nn.Module) -> dict[str, nn.Parameter]:
    """Freeze the model and add the adapter (seeded, the same in every process), or with train="full"
    unfreeze every weight; the trained parameters by name, rank 0's values in every process."""
    model.requires_grad_(cfg.train == "full")
    torch.manual_seed(cfg.seed)
    if cfg.train == "lora":
        inject_lora(model, ADAPTER, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout, dtype=torch.float32)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    dist.broadcast_(list(params.values()))
    return params


def checkpoint_blocks(model: nn.Module) -> None:
    """Activation checkpointing: each repeated block (FLUX's double and single blocks, SD3's joint blocks)
    keeps only its inputs and recomputes its activations in the backward pass. Applied from outside by
    module hooks (`torch.distributed._composable.checkpoint`, as torchtitan applies it), so the model's
    code and keys do not change."""
    for block in blocks_of(model):
        checkpoint(block)


def cut_log(path: Path, step: int) -> None:
    """Keep the lines of steps <= `step` (a resumed run's log continues its checkpoint's)."""
    lines = path.read_text().splitlines() if step and path.is_file() else []
    kept = "".join(f"{ln}\n" for ln in lines if json.loads(ln)["step"] <= step)
    write_atomic(path, lambda tmp: Path(tmp).write_text(kept))


def train(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    encoders: Encoders | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a TACA LoRA as `cfg` says. `model` / `encoders`: already loaded parts (default: from `cfg.model`).
    `on_step(step, loss)` is called after every step. Joins torchrun's process group if there is one."""
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_from_env(device.type)
    rank, world = dist.rank(), dist.world()
    B, micro = cfg.batch_size, cfg.batch_size // cfg.grad_accum  # pairs per step, per micro-step (all processes)
    if micro % world:
        raise ValueError(f"batch_size / grad_accum = {micro} pairs per micro-step do not split over {world} processes")
    local = micro // world  # this process's pairs per micro-step
    out = Path(cfg.output)
    ckpt_dir, log_file = out / "checkpoints", out / "log.jsonl"
    if cfg.resume is None and list_checkpoints(ckpt_dir):
        raise FileExistsError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, "
                              "or choose another output folder")

    data, model = load_data_and_model(cfg, device, model, encoders)
    if rank == 0:
        log.info("%d pairs (%d encoded now, %d unreadable images skipped)", len(data), data.encoded, data.skipped)
    params = trainable_parameters(cfg, model)
    model.train()
    if cfg.gradient_checkpointing:
        checkpoint_blocks(model)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = resume(cfg, ckpt_dir, params, optimizer)
    if rank == 0:
        cut_log(log_file, start)
    sampler = BatchSampler(data.sizes, B, cfg.seed)
    schedule = TacaSchedule(cfg.taca_gamma, cfg.t_min)
    guided = model.family == "flux" and model.params.guidance_embed  # FLUX-dev: distilled guidance is an input
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (cfg.progress and rank == 0))

    def save(step: int) -> None:
        if rank == 0:
            save_checkpoint(checkpoint_path(ckpt_dir, step), step, params, optimizer, cfg)
            prune(ckpt_dir, cfg.keep_checkpoints)

    step, losses, interrupted = start, [], False
    with StopOnSignal() as stop:
        while step < cfg.steps and not interrupted:
            t0 = time.perf_counter()
            batch = sampler(step)  # the global batch: indices of cached pairs
            # summed over processes in one all-reduce: the t of each sample (each process fills its own),
            # the global mean loss (each process adds its share) and the stop request
            sums = torch.zeros(B + 2, device=device)
            t_all, loss_sum, stop_flag = sums[:B], sums[B], sums[B + 1]  # views
            optimizer.zero_grad()
            torch.manual_seed(derive_seed(cfg.seed, "dropout", step, rank))  # LoRA dropout
            for m in range(cfg.grad_accum):
                js = range(m * micro + rank * local, m * micro + (rank + 1) * local)  # indices in the global batch
                x0, context, pooled = data.load([batch[j] for j in js], device)  # (b, 16, h, w), (b, L, D), (b, P)
                # each sample's t and noise: its own generator, named by (seed, step, index in the global batch)
                gens = [generator(cfg.seed, "sample", step, j) for j in js]
                t = torch.cat([sample_t(cfg.timesteps, cfg.t_min, g) for g in gens]).to(device)  # (b,)
                noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(device)
                guidance = torch.full((local,), cfg.guidance, device=device) if guided else None
                temperature = batch_temperature(schedule, t)  # gamma where t >= t_min, per sample
                with autocast:
                    loss = flow_matching_loss(model, x0, noise, t, context, pooled, guidance, temperature)
                (loss / cfg.grad_accum).backward()
                t_all[list(js)] = t.float()
                loss_sum += loss.detach().float() / (cfg.grad_accum * world)
            stop_flag.fill_(float(stop.requested))
            dist.all_sum(sums)
            loss = loss_sum.item()
            if not math.isfinite(loss):
                good = list_checkpoints(ckpt_dir)
                raise TrainingError(
                    f"loss is {loss} at step {step + 1}: stopped before applying it; the last good checkpoint is "
                    + (str(good[-1]) if good else "none (no checkpoint written yet)")
                )
            for p in params.values():  # an adapter the forward did not reach still steps (as in every process)
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            dist.average_gradients(list(params.values()))
            clip = cfg.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(params.values(), clip).item() if clip else None
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            step += 1
            losses.append(loss)
            seconds = time.perf_counter() - t0
            if rank == 0:
                entry = dict(step=step, loss=loss, lr=lr, t_min=t_all.min().item(), t_max=t_all.max().item(),
                             grad_norm=grad_norm, seconds=round(seconds, 4))
                with open(log_file, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{B / seconds:.2f}")
            if on_step is not None:
                on_step(step, loss)
            interrupted = bool(stop_flag > 0)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps and not interrupted:
                save(step)
    bar.close()
    save(step)
    if interrupted:
        log.warning("interrupted at step %d: %s written; continue with --resume", step, checkpoint_path(ckpt_dir, step))
    elif rank == 0 and cfg.train == "full":
        meta = {"train.steps": str(step), "train.config": cfg.to_json()}
        save_safetensors_atomic(model.state_dict(), out / "transformer.safetensors", meta)
        log.info("wrote %s", out / "transformer.safetensors")
    elif rank == 0:
        meta = {"taca.gamma": cfg.taca_gamma, "taca.until": cfg.t_min, "train.steps": step,
                "train.config": cfg.to_json()}
        convert.save_lora(model, out / "lora.safetensors", ADAPTER, meta)
        log.info("wrote %s", out / "lora.safetensors")
    dist.barrier()
    model.eval()
    return TrainResult(model, losses, step, interrupted, data)
