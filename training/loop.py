"""The training loop: a LoRA on a frozen MM-DiT, trained with TACA's temperature in the forward.

One optimizer step: the global batch (`batch_size` pairs, from the seeded `BatchSampler`) is split
into `grad_accum` micro-batches, each split over the processes; every sample draws its noise and t
from (seed, step, its index in the global batch), so 1 process with accumulation and N processes
compute the same samples. Gradients are averaged over processes (training/distributed.py; with
`fsdp`, the weights are sharded over the processes and FSDP2's reduce-scatter averages them:
training/fsdp.py), clipped, and AdamW steps with a linear warm-up (then constant, or a cosine decay to 0). Only the
adapter's A and B matrices train, in float32; the base stays in `dtype` and the forward runs under
bf16 autocast by default. With `train="full"` every weight of the transformer trains instead (how
the tiny model of assets/tiny-flux is trained from its random initialization; use dtype float32).

Every `checkpoint_every` steps, on Ctrl-C or SIGTERM and at the end, a checkpoint is written atomically
(training/checkpoint.py); `resume` continues from one exactly, with the run's own settings. A stop
request abandons the step in progress within a block's time and keeps the last complete one
(training/interrupt.py). A non-finite loss stops the run before the step is applied, naming the last
good checkpoint; a file that cannot be written (a full disk) stops it with a `WriteError` naming the
file (training/disk.py), and the temporary files an earlier kill left are removed at start. The
result is `OUTPUT/lora.safetensors` (Diffusers/PEFT layout with TACA metadata, `convert.save_lora`),
or with `train="full"` `OUTPUT/transformer.safetensors` (the whole transformer, BFL keys) and
`OUTPUT/model/`, the base model with it in place (training/model_folder.py); and `OUTPUT/log.jsonl`,
one line per step.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed._composable import checkpoint
from tqdm.auto import tqdm

import convert
from convert.files import CheckpointError, save_safetensors_atomic, write_atomic
from mmdit.lora import inject_lora
from sampling import TacaSchedule, load_pipeline
from sampling.hub import resolve
from sampling.offload import blocks_of

from . import distributed as dist
from . import fsdp
from .checkpoint import (
    check_resumed_settings,
    checkpoint_path,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune,
    read_run,
    save_checkpoint,
)
from .config import TrainConfig, native_resolution
from .data import (BatchSampler, CachedData, Encoders, derive_seed, empty_caption, encoders_from_pipeline, generator,
                   prepare, scan)
from .disk import remove_stale_temporaries, writing
from .interrupt import StepAborted, StopOnSignal
from .loss import batch_temperature, flow_matching_loss, sample_t
from .model_folder import NoModelFolder, write_model_folder

log = logging.getLogger(__name__)

ADAPTER = "taca"  # the adapter's name inside the model


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss); the message names the last good checkpoint."""


@dataclass
class TrainResult:
    model: nn.Module  # the transformer with the trained adapter `ADAPTER` (train="full": the trained transformer)
    losses: list[float]  # the global mean loss of each step this run made
    step: int  # optimizer steps done in total
    interrupted: bool  # stopped by Ctrl-C or SIGTERM (a checkpoint was written, no LoRA file)
    data: CachedData


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps` (step 0 gets lr / warmup_steps), then constant or cosine to 0 at `steps`."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
    if cfg.lr_schedule == "cosine" and step >= cfg.warmup_steps:
        lr *= 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)))
    return lr


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device(f"cuda:{dist.local_rank()}" if torch.cuda.is_available() else "cpu")


def load_data_and_model(
    cfg: TrainConfig, device: torch.device, model: nn.Module | None, encoders: Encoders | None
) -> tuple[CachedData, nn.Module]:
    """The cached pairs, and the transformer (`model`, else loaded from `cfg.model`). The pipeline's encoders
    are loaded only if some pair is not cached yet; its transformer is then kept, the rest freed. With
    `fsdp` the transformer stays on the CPU (fsdp.shard moves each process's share to the device) and the
    pipeline's is not kept (it was offloaded)."""
    dtype = getattr(torch, cfg.dtype)
    pipe = None  # the pipeline, if its encoders were needed

    def load_encoders() -> Encoders:
        nonlocal pipe
        if pipe is None:
            pipe = load_pipeline(cfg.model, device=device, dtype=dtype, offload="model" if cfg.fsdp else None)
        return encoders_from_pipeline(pipe)

    tag = f"{cfg.model}|{cfg.dtype}"  # the encoders, in the cache keys
    get_encoders = load_encoders if encoders is None else lambda: encoders
    data = prepare(scan(cfg.data), cfg.cache_dir, cfg.resolution, cfg.buckets, tag, get_encoders, cfg.native_size)
    if cfg.caption_dropout > 0:
        data.empty = empty_caption(cfg.cache_dir, tag, get_encoders)
    if model is None and pipe is not None and not cfg.fsdp:
        model = pipe.transformer
    pipe = None  # the encoders go
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if cfg.fsdp:
        return data, model if model is not None else convert.load_transformer(resolve(cfg.model)[0], dtype=dtype)
    if model is None:
        model = convert.load_transformer(resolve(cfg.model)[0], device=device, dtype=dtype)
    return data, model.to(device)


def trainable_parameters(cfg: TrainConfig, model: nn.Module, device: torch.device) -> dict[str, nn.Parameter]:
    """Freeze the model and add the adapter (seeded, the same in every process), or with train="full"
    unfreeze every weight; the trained parameters by name, rank 0's values in every process. With `fsdp`
    the model is then sharded, and the parameters are its shards (DTensors); they are not broadcast first
    (the model is on the CPU, which NCCL cannot send from): every process read the same file and drew the
    same seeded adapter on the CPU."""
    model.requires_grad_(cfg.train == "full")
    torch.manual_seed(cfg.seed)
    if cfg.train == "lora":
        inject_lora(model, ADAPTER, cfg.rank, cfg.alpha, cfg.targets, cfg.dropout, dtype=torch.float32)
    if cfg.gradient_checkpointing:  # before sharding, as torchtitan does
        checkpoint_blocks(model)
    if cfg.fsdp:
        fsdp.shard(model, device)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not cfg.fsdp:
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
    """Keep the lines of steps <= `step` (a resumed run's log continues its checkpoint's). A torn last line
    (the run was killed, or the disk filled, while writing it) is dropped; any other bad line is an error
    naming the log."""
    lines = path.read_text(errors="replace").splitlines() if step and path.is_file() else []
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            entry_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            if n == len(lines):
                log.warning("%s: its last line is incomplete (written when the run stopped): dropped", path)
                continue
            raise ValueError(f"{path}:{n}: not a line of mmdit train's log ({line[:60]!r}); move the log away "
                             "to resume without it") from None
        if entry_step <= step:
            kept.append(f"{line}\n")
    with writing(path):
        write_atomic(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def remove_stale_files(cfg: TrainConfig) -> None:
    """Delete what an interrupted write left in the run's folders (a `--cache` folder elsewhere may be shared
    by runs going on at once: there, only files untouched for an hour)."""
    out = Path(cfg.output)
    own = cfg.cache_dir.resolve().parent == out.resolve()
    remove_stale_temporaries([out, out / "checkpoints", *([cfg.cache_dir] if own else [])])
    if not own:
        remove_stale_temporaries([cfg.cache_dir], older_than=3600)


def train(
    cfg: TrainConfig,
    model: nn.Module | None = None,
    encoders: Encoders | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train a TACA LoRA as `cfg` says. `model` / `encoders`: already loaded parts (default: from `cfg.model`).
    `on_step(step, loss)` is called after every step. Joins torchrun's process group if there is one.
    `cfg.resolution` None: the model's own size (`native_resolution`), or resuming, the run's."""
    device = pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_from_env(device.type)
    rank, world = dist.rank(), dist.world()
    if cfg.fsdp:
        fsdp.check_launch()
    B, micro = cfg.batch_size, cfg.batch_size // cfg.grad_accum  # pairs per step, per micro-step (all processes)
    if micro % world:
        raise ValueError(f"batch_size / grad_accum = {micro} pairs per micro-step do not split over {world} processes")
    local = micro // world  # this process's pairs per micro-step
    out = Path(cfg.output)
    ckpt_dir, log_file = out / "checkpoints", out / "log.jsonl"
    resumed = find_checkpoint(out, cfg.resume)
    if resumed is not None:
        resumed_step, saved = read_run(resumed)
        if cfg.resolution is None:
            cfg = dataclasses.replace(cfg, resolution=saved.get("resolution"))
        check_resumed_settings(resumed, resumed_step, saved, dataclasses.asdict(cfg))
    elif cfg.resume is None and list_checkpoints(ckpt_dir):
        raise FileExistsError(f"{out} holds checkpoints of an earlier run: pass --resume to continue it, "
                              "or choose another output folder")
    elif cfg.resume is not None and rank == 0:
        log.warning("no checkpoint in %s: starting from step 0", ckpt_dir)
    if cfg.resolution is None:
        cfg = dataclasses.replace(cfg, resolution=native_resolution(cfg.model))
        if rank == 0 and not cfg.native_size:  # with native_size each image keeps its own size
            log.info("resolution %d: the model's own size (--resolution to change it)", cfg.resolution)
    if rank == 0:
        remove_stale_files(cfg)

    data, model = load_data_and_model(cfg, device, model, encoders)
    if rank == 0:
        log.info("%d pairs (%d encoded now, %d unreadable images skipped)", len(data), data.encoded, data.skipped)
    params = trainable_parameters(cfg, model, device)
    model.train()
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = load_checkpoint(resumed, params, optimizer) if resumed is not None else 0
    if resumed is not None and rank == 0:
        log.info("resumed from %s at step %d", resumed, start)
    if rank == 0:
        cut_log(log_file, start)
    sampler = BatchSampler(data.sizes, B, cfg.seed)
    schedule = TacaSchedule(cfg.taca_gamma, cfg.t_min)
    guided = getattr(model.params, "guidance_embed", False)  # FLUX.1-dev, FLUX.2 [dev]: distilled guidance is an input
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not (cfg.progress and rank == 0))
    settings = cfg.to_json()
    saved_at = start if resumed == checkpoint_path(ckpt_dir, start) else None  # the step of the newest checkpoint here

    def save(step: int) -> None:
        nonlocal saved_at
        tensors, optimizer_state = fsdp.gathered(params, optimizer)  # every process: FSDP gathers
        if rank == 0:
            save_checkpoint(checkpoint_path(ckpt_dir, step), step, tensors, optimizer_state, settings)
            prune(ckpt_dir, cfg.keep_checkpoints)
        saved_at = step

    step, losses, interrupted = start, [], False
    # with FSDP every process must abandon a step at the same block: the processes vote at each check
    with StopOnSignal(model, fsdp.vote() if cfg.fsdp else None) as stop:
        while step < cfg.steps and not interrupted:
            t0 = time.perf_counter()
            batch = sampler(step)  # the global batch: indices of cached pairs
            # summed over processes in one all-reduce: the t of each sample (each process fills its own),
            # the global mean loss (each process adds its share), the stop request and the abandoned step
            sums = torch.zeros(B + 3, device=device)
            t_all, loss_sum, stop_flag, aborted = sums[:B], sums[B], sums[B + 1], sums[B + 2]  # views
            optimizer.zero_grad()
            torch.manual_seed(derive_seed(cfg.seed, "dropout", step, rank))  # LoRA dropout
            try:
                with stop.abortable():  # a stop request abandons the step (StepAborted) within a block
                    for m in range(cfg.grad_accum):
                        js = range(m * micro + rank * local, m * micro + (rank + 1) * local)  # indices in the global batch
                        x0, context, pooled = data.load([batch[j] for j in js], device)  # (b, C, h, w), (b, L, D), (b, P) | None
                        if cfg.caption_dropout > 0:  # each sample's draw: its own generator, named as its noise
                            dropped = [torch.rand(1, generator=generator(cfg.seed, "caption", step, j)).item()
                                       < cfg.caption_dropout for j in js]
                            context, pooled = data.with_empty_caption(dropped, context, pooled)
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
            except StepAborted:
                aborted.fill_(1.0)
            stop_flag.fill_(float(stop.requested))
            dist.all_sum(sums)
            if aborted.item() > 0:  # some process abandoned the step: every process discards it
                optimizer.zero_grad()
                interrupted = True
                break
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
            if not cfg.fsdp:  # FSDP's reduce-scatter has averaged them
                dist.average_gradients(list(params.values()))
            clip = cfg.max_grad_norm
            grad_norm = fsdp.full(torch.nn.utils.clip_grad_norm_(params.values(), clip)).item() if clip else None
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
                with writing(log_file), open(log_file, "a") as f:
                    f.write(json.dumps(entry) + "\n")
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{B / seconds:.2f}")
            if on_step is not None:
                on_step(step, loss)
            interrupted = bool(stop_flag > 0) or (world == 1 and stop.requested)
            if step % cfg.checkpoint_every == 0 and step < cfg.steps and not interrupted:
                save(step)
    bar.close()
    if saved_at != step:
        save(step)
    if interrupted:
        log.warning("stopped at step %d (the last complete one): %s written; continue with "
                    "mmdit train --output %s --resume", step, checkpoint_path(ckpt_dir, step), out)
    elif cfg.train == "full":
        weights = {}
        for k, v in model.state_dict().items():
            value = fsdp.full(v)  # every process: FSDP gathers
            if rank == 0:
                weights[k] = value
        if rank == 0:
            write_full_model(cfg, model, weights, step, settings)
    else:
        with fsdp.full_parameters(model, list(params)):  # every process: FSDP gathers
            if rank == 0:
                meta = {"taca.gamma": cfg.taca_gamma, "taca.until": cfg.t_min, "train.steps": step,
                        "train.config": settings}
                with writing(out / "lora.safetensors"):
                    convert.save_lora(model, out / "lora.safetensors", ADAPTER, meta)
                taca = f" --taca {cfg.taca_gamma:g} --taca-until {cfg.t_min:g}" if cfg.taca_gamma != 1 else ""
                log.info("wrote %s: mmdit sample \"PROMPT\" --model %s%s --lora %s (with --taca the LoRA is on in "
                         "the TACA steps only, as trained)", out / "lora.safetensors", cfg.model, taca,
                         out / "lora.safetensors")
    dist.barrier()
    model.eval()
    return TrainResult(model, losses, step, interrupted, data)


def write_full_model(cfg: TrainConfig, model: nn.Module, weights: dict[str, torch.Tensor], step: int,
                     settings: str) -> None:
    """`OUTPUT/transformer.safetensors` (`weights`: the whole transformer) and `OUTPUT/model/`, the base model
    with it in place (or a warning saying how to sample without it)."""
    out = Path(cfg.output)
    meta = {"train.steps": str(step), "train.config": settings}
    with writing(out / "transformer.safetensors"):
        save_safetensors_atomic(weights, out / "transformer.safetensors", meta)
    log.info("wrote %s", out / "transformer.safetensors")
    try:
        write_model_folder(resolve(cfg.model)[0], model.family, out / "transformer.safetensors", out / "model",
                           fsdp.model_class(model).__name__)  # Flux, not FSDP's FSDPFlux
        log.info("wrote %s, the base model with the trained transformer: mmdit sample --model %s",
                 out / "model", out / "model")
    except (NoModelFolder, CheckpointError, FileNotFoundError) as e:  # the base's parts are not to be linked
        log.warning("no model folder written: %s. To sample in Python: pipe = sampling.load_pipeline(%r); "
                    "pipe.transformer = convert.load_transformer(%r)", e, cfg.model,
                    str(out / "transformer.safetensors"))
