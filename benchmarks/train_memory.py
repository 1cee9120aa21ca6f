"""GPU memory per process of `mmdit train` for FLUX.1-dev and FLUX.2 [dev], per mode, computed on the meta device
(issue 15).

    python -m benchmarks.train_memory             # full size (1024x1024, bf16): a minute on a CPU, no GPU
    python -m benchmarks.train_memory --tiny --dry-run

Computed, not measured, as benchmarks/memory_cost.py computes the sampling pipeline's memory: the
transformer is built at full size on the meta device (shapes only), and one training step (batch 1,
1024x1024: 4096 image + 512 text tokens, TACA on, the loss of training/loss.py, its backward) runs
under memory_cost's live-bytes tracker: the most bytes alive at once among the tensors the step's ops
create, weights and inputs not counted. Here the tracker runs with autograd on, so what the backward
keeps (saved activations, gradients) counts until it is freed. SDPA and `F.rms_norm` count as the fused
CUDA kernels (flash attention keeps q, k, v, its output and one float32 log-sum-exp per query row;
the fused RMSNorm keeps its input and one float32 scale per row). The modes of the loop:

- LoRA: the base frozen in bf16, a rank-16 LoRA on the attention (the paper's, `--targets attn`)
  trained in float32 (16 bytes a parameter: value, gradient, AdamW's two moments); the forward runs
  under bf16 autocast, measured as a LoRA in bf16 (autocast computes it so).
- full (`--train full --dtype bfloat16`): every weight trains in bf16 (8 bytes a parameter).
- FSDP over N processes (`--fsdp`, training/fsdp.py): weights, gradients and AdamW state are split N
  ways; while a block runs its weights are gathered whole, and FSDP2 gathers the next block ahead:
  two blocks whole at once, plus the weights outside the blocks, which the root keeps gathered from
  the forward to the backward (FSDP2's default for the root); with full training, a block's whole
  gradients before they are reduce-scattered. Activations are each process's own (batch 1 a process).

The peak of a mode (bytes) is the largest of the step's phases: the forward and backward (activations and
gradients on top of the weights and AdamW state) and the optimizer step (AdamW's moments and the
temporaries of its foreach implementation, CUDA's default, tracked on meta tensors like the trained ones):

    one GPU:  weights + state + max(step_peak, gradients + adamw_temporaries)
    FSDP, N:  (weights + state) / N + max(activations + gradients / N + gathered, (gradients + adamw_temporaries) / N)

`step_peak` is the tracked step with the gradients kept; `activations` the tracked step with each
gradient dropped as soon as it is made (FSDP reduce-scatters it to a 1/N shard); `gathered` the
FSDP working set above. With `--gradient-checkpointing` each block keeps its inputs only and
recomputes the rest in the backward (`torch.distributed._composable.checkpoint`, as the loop applies
it). Not counted: the CUDA context, cuBLAS/NCCL workspaces, the allocator's rounding and fragmentation
(budget a few GB more), the text encoders and autoencoder (the loop encodes the data once, before
training, and frees them), and the host: with --fsdp each process reads the whole base into CPU memory
before its share moves to its GPU (N copies of the weights in host RAM while loading).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed._composable import checkpoint

import mmdit
from mmdit.flux import PRESETS as FLUX_PRESETS
from mmdit.flux2 import PRESETS as FLUX2_PRESETS
from mmdit.lora import inject_lora
from sampling.offload import blocks_of
from training.loss import flow_matching_loss

from .memory_cost import GB, _LiveBytes
from .results import machine, write_section
from .step_time import default_dtype

SECTION = "## Training memory per GPU (computed, meta device)"
MODELS = {"FLUX.1-dev": FLUX_PRESETS["flux-dev"], "FLUX.2 [dev]": FLUX2_PRESETS["flux2-dev"]}
GPU_COUNTS = (2, 4, 8)
LORA_RANK, TEXT_TOKENS, LATENT = 16, 512, 128  # the paper's rank; FLUX's prompt length; 1024 px / 8
TINY_TEXT_TOKENS, TINY_LATENT = 16, 16
GAMMA = 1.2  # TACA on: the image-query x text-key logits scaled (two attention calls)
META = torch.device("meta")


# ---- the fused CUDA kernels, with a backward ----


class FlashAttention(torch.autograd.Function):
    """Flash attention's memory: the output (q-sized, flash's layout) and the float32 log-sum-exp (B, H, L)
    are made; q, k, v, output and log-sum-exp are kept for the backward, which makes dq, dk, dv."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # (B, H, L, D)
        B, H, L, _ = q.shape
        out = q.new_empty(B, L, H, v.shape[-1]).transpose(1, 2)  # (B, H, L, D)
        lse = q.new_empty(B, H, L, dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class FusedRMSNorm(torch.autograd.Function):
    """The fused RMSNorm's memory: an x-sized output; x, the weight and one float32 scale per row kept."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None) -> Tensor:
        rstd = x.new_empty(*x.shape[:-1], 1, dtype=torch.float32)
        ctx.save_for_backward(x, weight, rstd)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, _ = ctx.saved_tensors
        dw = torch.empty_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        return torch.empty_like(x), dw


class fused_kernels:
    """Inside: `F.scaled_dot_product_attention` and `F.rms_norm` are the stand-ins above."""

    def __enter__(self):
        self.saved = F.scaled_dot_product_attention, F.rms_norm
        F.scaled_dot_product_attention = lambda q, k, v, *args, **kwargs: FlashAttention.apply(q, k, v)
        F.rms_norm = lambda x, shape, weight=None, eps=None: FusedRMSNorm.apply(x, weight)

    def __exit__(self, *exc):
        F.scaled_dot_product_attention, F.rms_norm = self.saved


def tracked_peak(fn: Callable[[], object]) -> int:
    """The most bytes alive at once among the tensors `fn`'s ops create (autograd on: what the backward
    keeps counts while it is kept)."""
    mode = _LiveBytes()
    with fused_kernels(), mode:
        fn()
    return mode.peak


# ---- the model, its step and its optimizer, on the meta device ----


@dataclass
class Setup:
    model: nn.Module
    trained: list[nn.Parameter]
    step: Callable[[], None]  # one forward and backward of the loss


def setup(params, train: str, gradient_checkpointing: bool, tiny: bool) -> Setup:
    """The bf16 transformer on the meta device, what trains, and its training step on random inputs."""
    latent, n_txt = (TINY_LATENT, TINY_TEXT_TOKENS) if tiny else (LATENT, TEXT_TOKENS)
    with META, default_dtype(torch.bfloat16):
        model = mmdit.build_model(params)
    model.requires_grad_(train == "full")
    if train == "lora":  # bf16 here: autocast computes the float32 LoRA in bf16
        inject_lora(model, "taca", LORA_RANK, LORA_RANK, ["attn"], 0.0, dtype=torch.bfloat16)
    if gradient_checkpointing:
        for block in blocks_of(model):
            checkpoint(block)
    model.train()
    trained = [p for p in model.parameters() if p.requires_grad]
    flux = params.family == "flux"
    with META:
        x0 = torch.empty(1, params.in_channels // 4, latent, latent)  # the cached latents, float32
        noise, t = torch.empty_like(x0), torch.empty(1)
        context = torch.empty(1, n_txt, params.context_in_dim, dtype=torch.bfloat16)
        pooled = torch.empty(1, params.vec_in_dim, dtype=torch.bfloat16) if flux else None
        guidance = torch.empty(1) if params.guidance_embed else None

    def step() -> None:
        flow_matching_loss(model, x0, noise, t, context, pooled, guidance, GAMMA).backward()

    return Setup(model, trained, step)


def step_peaks(params, train: str, gradient_checkpointing: bool, tiny: bool) -> tuple[int, int]:
    """(step_peak: gradients kept, activations: each gradient dropped when made)."""
    kept = setup(params, train, gradient_checkpointing, tiny)
    with_grads = tracked_peak(kept.step)
    dropped = setup(params, train, gradient_checkpointing, tiny)
    for p in dropped.trained:
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    return with_grads, tracked_peak(dropped.step)


def adamw_temporaries(shapes: list[torch.Size], dtype: torch.dtype) -> int:
    """The bytes AdamW's foreach step allocates beyond its moments, on meta tensors of `shapes`."""
    with META:
        ps = [nn.Parameter(torch.empty(s, dtype=dtype)) for s in shapes]
        for p in ps:
            p.grad = torch.empty_like(p)
    optimizer = torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, foreach=True)
    optimizer.step()  # the moments made: the second step is the steady one
    mode = _LiveBytes()
    with mode:
        optimizer.step()
    return mode.peak


# ---- the modes ----


@dataclass
class Sizes:
    """Bytes of one model in one training mode (see the module docstring)."""

    weights: int  # every weight, frozen and trained, in its training dtype
    state: int  # AdamW's two moments
    gradients: int
    adamw_temporaries: int
    outside_blocks: int  # weights outside the repeated blocks
    largest_block: int
    largest_block_trained: int  # the gradient bytes of the largest block (full training)
    step_peak: dict[bool, int]  # by gradient checkpointing
    activations: dict[bool, int]

    def one_gpu(self, ckpt: bool) -> int:
        return self.weights + self.state + max(self.step_peak[ckpt], self.gradients + self.adamw_temporaries)

    def fsdp(self, n: int, ckpt: bool) -> int:
        gathered = self.outside_blocks + 2 * self.largest_block + self.largest_block_trained
        backward = self.activations[ckpt] + self.gradients // n + gathered
        return (self.weights + self.state) // n + max(backward, (self.gradients + self.adamw_temporaries) // n)


def nbytes(ps) -> int:
    return sum(p.numel() * p.element_size() for p in ps)


def sizes(params, train: str, tiny: bool) -> Sizes:
    s = setup(params, train, False, tiny)
    trained_dtype = torch.float32 if train == "lora" else torch.bfloat16  # the LoRA trains in float32
    per_value = torch.finfo(trained_dtype).bits // 8
    trained = sum(p.numel() for p in s.trained) * per_value
    frozen = nbytes(p for p in s.model.parameters() if not p.requires_grad) + nbytes(s.model.buffers())
    blocks = blocks_of(s.model)
    largest = max(blocks, key=lambda b: nbytes(b.parameters()))
    block_bytes = nbytes(largest.parameters()) + sum(  # its LoRA in float32
        p.numel() * (per_value - p.element_size()) for p in largest.parameters() if p.requires_grad)
    peaks = {ckpt: step_peaks(params, train, ckpt, tiny) for ckpt in (False, True)}
    return Sizes(
        weights=frozen + trained, state=2 * trained, gradients=trained,
        adamw_temporaries=adamw_temporaries([p.shape for p in s.trained], trained_dtype),
        outside_blocks=nbytes(s.model.parameters()) - sum(nbytes(b.parameters()) for b in blocks),
        largest_block=block_bytes,
        largest_block_trained=sum(p.numel() for p in largest.parameters()) * per_value if train == "full" else 0,
        step_peak={k: v[0] for k, v in peaks.items()}, activations={k: v[1] for k, v in peaks.items()},
    )


# ---- reporting ----


def modes_table(name: str, by_train: dict[str, Sizes], gpu_counts=GPU_COUNTS) -> str:
    head = " | ".join(f"{n} GPUs (--fsdp)" for n in gpu_counts)
    lines = [f"| {name} | checkpointing | 1 GPU | {head} |", "|---|---|---|" + "---|" * len(gpu_counts)]
    for train, sz in by_train.items():
        for ckpt in (False, True):
            label = "LoRA rank 16 (attn)" if train == "lora" else "full (bf16)"
            cells = [sz.one_gpu(ckpt)] + [sz.fsdp(n, ckpt) for n in gpu_counts]
            figures = " | ".join(f"{c / GB:.1f}" for c in cells)
            lines.append(f"| {label} | {'on' if ckpt else 'off'} | {figures} |")
    return "\n".join(lines)


def parts_table(name: str, by_train: dict[str, Sizes]) -> str:
    lines = [f"| {name} | weights | AdamW state | gradients | AdamW temporaries | outside blocks | largest block "
             "| step peak (ckpt off / on) | activations (ckpt off / on) |", "|---|---|---|---|---|---|---|---|---|"]
    for train, s in by_train.items():
        lines.append(f"| {train} | {s.weights / GB:.2f} | {s.state / GB:.2f} | {s.gradients / GB:.2f} "
                     f"| {s.adamw_temporaries / GB:.2f} | {s.outside_blocks / GB:.2f} | {s.largest_block / GB:.2f} "
                     f"| {s.step_peak[False] / GB:.2f} / {s.step_peak[True] / GB:.2f} "
                     f"| {s.activations[False] / GB:.2f} / {s.activations[True] / GB:.2f} |")
    return "\n".join(lines)


ONE_GPU = "one GPU: weights + state + max(step_peak, gradients + adamw_temporaries)"
FSDP = ("FSDP over N: (weights + state) / N + max(activations + gradients / N + outside_blocks + 2 largest_block "
        "[+ its gradients, full], (gradients + adamw_temporaries) / N)")


def report(results: dict[str, dict[str, Sizes]], tiny: bool, command: str) -> str:
    lines = [
        SECTION, "",
        "Computed, not measured: peak GPU memory per process in GB (1e9 bytes) of one training step, batch 1 per "
        f"process, {'reduced sizes (--tiny), a smoke run' if tiny else '1024x1024 (4096 image + 512 text tokens)'}, "
        "TACA on, AdamW; the transformer only (the encoders run once, before training, and are freed). "
        "How: benchmarks/train_memory.py's docstring. Not counted: CUDA context, library workspaces, allocator "
        "rounding (budget a few GB more).", "",
    ]
    for name, by_train in results.items():
        lines += [modes_table(name, by_train), ""]
    lines += ["Parts (GB):", ""]
    for name, by_train in results.items():
        lines += [parts_table(name, by_train), ""]
    lines += [f"- Peak of a mode: {ONE_GPU}; {FSDP}.",
              f"- Machine: {machine()} (the meta device: shapes only); torch {torch.__version__}",
              f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
              f"- Command: `{command}`"]
    return "\n".join(lines) + "\n"


def compute(tiny: bool) -> dict[str, dict[str, Sizes]]:
    out = {}
    for name, params in MODELS.items():
        p = params.tiny() if tiny else params
        out[name] = {train: sizes(p, train, tiny) for train in ("lora", "full")}
    return out


def main(argv: list[str] | None = None) -> dict[str, dict[str, Sizes]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="reduced sizes (the presets' tiny() layouts)")
    ap.add_argument("--dry-run", action="store_true", help="print the section, write nothing")
    args = ap.parse_args(argv)
    command = " ".join(["python -m benchmarks.train_memory", *(sys.argv[1:] if argv is None else argv)])
    results = compute(args.tiny)
    text = report(results, args.tiny, command)
    print(text)
    if not args.dry_run:
        write_section(text)
    return results


if __name__ == "__main__":
    main()
