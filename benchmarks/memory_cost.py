"""Peak GPU memory of the FLUX.1-dev pipeline for each offload mode, computed on the meta device (issue 7).

    python -m benchmarks.memory_cost            # full size (1024x1024, bf16): seconds on a CPU, no GPU
    python -m benchmarks.memory_cost --tiny --out -
    python -m benchmarks.memory_cost --measure  # on a GPU: the measured peaks beside the computed ones

Computed, not measured. Every part is built at full size on the meta device (shapes only, no memory):
the transformer, T5-XXL, CLIP-L and the autoencoder, random weights in bf16, batch 1. For each part:
- weights: the bytes of its parameters and buffers;
- activation peak of its phase (`live_bytes_peak`): T5 on 512 tokens, CLIP-L on 77, one transformer
  step (4096 image + 512 text tokens, guidance), the decode of one 128x128x16 latent (default: whole, not
  tiled) with the pipeline's float/clamp. It is the most bytes alive at once among the tensors that the
  phase's ops create, tracked op by op under a `TorchDispatchMode`: a new output adds its storage's
  bytes, and a `weakref.finalize` on it takes them off when the last tensor holding that storage dies.
  Views, in-place ops and ops returning an input share a storage and add nothing; tensors that existed
  before the call (weights, inputs) count 0. That is CUDA's `max_memory_allocated` during the phase minus
  what was allocated before it, up to the caching allocator's rounding (512-byte blocks), library
  workspaces (cuBLAS, cuDNN) and the CUDA context, which are not counted;
- streamed: what sampling/offload.py's `streamed` keeps on the device while the part runs: the weights
  outside the repeated blocks (for the whole call) + the largest block (one at a time).

`F.scaled_dot_product_attention` and `F.rms_norm` count as the fused CUDA kernels (flash attention:
a q-sized output, no L x L matrix; `_fused_rms_norm`: an x-sized output), as in benchmarks/step_cost.py;
their meta decompositions would allocate the logits and fp32 intermediates. The pipeline peak of an offload
mode (sampling/offload.py) is then the weights on the device during a phase + that phase's activation
peak, the largest over the phases. Ignored: what crosses phases (prompt embeddings, latents: a few MB).

`--measure` also runs the pipeline (benchmarks/step_time.py's `bench_pipeline`: random weights, random
token ids, `--pipeline-steps` steps, one warm-up image then one timed) for each `--offload` mode and puts
its `torch.cuda.max_memory_allocated` and `max_memory_reserved` (weights included) beside the computed
peak of that mode: its own block, "FLUX.1-dev pipeline memory (measured)". Peak memory does not grow
with the number of steps, so a few steps measure what 28 would.
"""

from __future__ import annotations

import argparse
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmdit.autoencoder import AutoEncoder
from mmdit.clip import CLIPTextEncoder
from mmdit.t5 import T5Encoder
from sampling.offload import EVERY_PART, OFFLOAD, blocks_of

from .step_cost import StepCost, _fused_ops_counted
from .step_time import (
    LATENT,
    ROOT,
    TEXT_TOKENS,
    TINY_LATENT,
    TINY_TEXT_TOKENS,
    Inputs,
    PipelineResult,
    bench_pipeline,
    build_ours,
    default_dtype,
    environment,
    make_inputs,
    model_params,
    ours_step,
    pipeline_configs,
    publish,
    tensor_bytes,
)
from .step_time import parse_args as step_time_args

TITLE = "FLUX.1-dev pipeline memory (computed, meta device)"
MEASURED = "FLUX.1-dev pipeline memory (measured)"
GOAL_GB = 26.0
MODES = OFFLOAD
ENCODERS = ("t5", "clip_l")
GB, GIB = 1e9, 2**30


# ---- live bytes of one call ----


@dataclass
class MemoryPeak:
    peak_bytes: int  # the most bytes alive at once, of tensors created during the call
    end_bytes: int  # still alive when the call returns (its outputs, and what it kept)


def _storage(t: Tensor) -> tuple[int, int]:
    """(an id of the storage while it lives, its bytes)."""
    s = t.untyped_storage()
    return s._cdata, s.nbytes()


class _LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.holders: dict[int, list[int]] = {}  # storage id -> [bytes, tracked tensors holding it]

    def _hold(self, t: Tensor, key: int) -> None:
        self.holders[key][1] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        entry = self.holders[key]
        entry[1] -= 1
        if entry[1] == 0:  # the storage's last tracked tensor is gone: CUDA would free it here
            self.live -= entry[0]
            del self.holders[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t)[0] for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor):
                continue
            key, nbytes = _storage(t)
            if key in self.holders:  # a view of, or the very tensor of, something made in the call
                self._hold(t, key)
            elif key not in inputs:  # new storage (an input's storage is older than the call: counts 0)
                self.holders[key] = [nbytes, 0]
                self._hold(t, key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
        return out


@torch.no_grad()
def live_bytes_peak(fn: Callable[[], object]) -> MemoryPeak:
    """Run `fn()` and track the bytes of the tensors its ops create (SDPA and F.rms_norm as fused kernels)."""
    mode = _LiveBytes()
    with _fused_ops_counted(StepCost()), mode:  # the fused stand-ins allocate their outputs only
        out = fn()
    end = mode.live
    del out
    return MemoryPeak(mode.peak, end)


# ---- the parts of the pipeline and their phases ----


def block_stream_bytes(module: nn.Module) -> int:
    """What sampling/offload.py's `streamed` keeps on the device: the weights outside the repeated blocks
    (borrowed for the whole call) + the largest block (one at a time)."""
    blocks = [tensor_bytes(b) for b in blocks_of(module)]
    return tensor_bytes(module) - sum(blocks) + max(blocks, default=0)


@dataclass
class Part:
    name: str
    phase: str
    weights: int
    activations: MemoryPeak
    streamed: int  # outside-block weights + largest block
    module: nn.Module = field(repr=False)  # on the meta device


def pipeline_parts(tiny: bool) -> list[Part]:
    """T5, CLIP-L, the transformer and the autoencoder of FLUX.1-dev on the meta device, bf16, batch 1."""
    meta, dtype = torch.device("meta"), torch.bfloat16
    params = model_params("flux-dev", tiny)
    t5_cfg, clip_cfg, ae_params = pipeline_configs(params, tiny)  # as step_time's pipeline
    latent, n_txt = (TINY_LATENT, TINY_TEXT_TOKENS["flux"]) if tiny else (LATENT, TEXT_TOKENS["flux"])
    transformer = build_ours(params, meta, dtype)
    with meta, default_dtype(dtype):
        t5, clip, ae = T5Encoder(t5_cfg).eval(), CLIPTextEncoder(clip_cfg).eval(), AutoEncoder(ae_params).eval()
        t5_ids = torch.zeros(1, n_txt, dtype=torch.long)
        clip_ids = torch.zeros(1, clip_cfg.max_positions, dtype=torch.long)
        z = torch.empty(1, ae_params.z_channels, latent, latent, dtype=torch.float32)  # the sampler's fp32 latents
    cpu_inputs = make_inputs(params, latent, n_txt, torch.device("cpu"), dtype)
    inp = Inputs(**{k: None if t is None else t.to(meta) for k, t in vars(cpu_inputs).items()})
    phases: list[tuple[str, str, nn.Module, Callable[[], object]]] = [
        ("t5", f"T5-XXL encode ({n_txt} tokens)", t5, lambda: t5(t5_ids)),
        ("clip_l", f"CLIP-L encode ({clip_cfg.max_positions} tokens)", clip, lambda: clip(clip_ids)),
        ("transformer", f"one step ({(latent // 2) ** 2} image + {n_txt} text tokens)", transformer,
         ours_step(transformer, inp)),
        ("autoencoder", f"decode ({latent}x{latent}x{ae_params.z_channels} latent, whole)", ae,
         lambda: (ae.decode(z.to(ae.dtype)).float() / 2 + 0.5).clamp(0, 1)),  # as FluxPipeline.generate
    ]
    return [Part(name, phase, tensor_bytes(m), live_bytes_peak(run), block_stream_bytes(m), m)
            for name, phase, m, run in phases]


# ---- offload modes ----


def mode_peak(parts: list[Part], mode: str | None) -> int:
    """The computed peak of `mode`: the largest over phases of the weights on the device + the phase's activations."""
    def on_device(p: Part, running: Part) -> int:
        """The bytes of `p`'s weights on the device while `running`'s phase runs."""
        offloaded = mode in EVERY_PART or (mode is not None and p.name in ENCODERS)
        if not offloaded:
            return p.weights  # resident the whole time
        if p is not running:
            return 0
        return p.streamed if mode.startswith("stream") else p.weights

    return max(sum(on_device(p, running) for p in parts) + running.activations.peak_bytes for running in parts)


# ---- reporting ----


def parts_table(parts: list[Part]) -> str:
    lines = ["| part | phase | weights GB | activation peak GB | streamed GB (outside blocks + largest block) |",
             "|---|---|---|---|---|"]
    for p in parts:
        lines.append(f"| {p.name} | {p.phase} | {p.weights / GB:.3f} | {p.activations.peak_bytes / GB:.3f} "
                     f"| {p.streamed / GB:.3f} |")
    total = sum(p.weights for p in parts)
    lines.append(f"| all | - | {total / GB:.3f} | {max(p.activations.peak_bytes for p in parts) / GB:.3f} (max) | - |")
    return "\n".join(lines)


def modes_table(parts: list[Part], goal_gb: float = GOAL_GB) -> str:
    lines = [f"| offload | computed peak GB | GiB | <= {goal_gb:g} GB |", "|---|---|---|---|"]
    for mode in MODES:
        peak = mode_peak(parts, mode)
        lines.append(f"| {mode or 'none'} | {peak / GB:.2f} | {peak / GIB:.2f} | {'yes' if peak <= goal_gb * GB else 'no'} |")
    return "\n".join(lines)


METHOD = (
    "Computed, not measured (`python -m benchmarks.memory_cost`, benchmarks/memory_cost.py; no GPU): every part of "
    "FLUX.1-dev at full size on the meta device (shapes only), random bf16 weights, 1024x1024, batch 1. Weights: "
    "parameters + buffers. Activation peak: the most bytes alive at once among the tensors a phase's ops create "
    "(SDPA and `F.rms_norm` as CUDA's fused kernels), i.e. `max_memory_allocated` minus what was allocated before, "
    "without allocator rounding, library workspaces (cuBLAS, cuDNN) and the CUDA context. Streamed: the "
    "weights outside the repeated blocks + the largest block, what a part streamed by sampling/offload.py keeps "
    "on the device."
)
MODES_NOTE = (
    "Offload modes (sampling/offload.py): `none`: all weights resident; `encoders`: the text encoders copied whole "
    "to the device for their phase; `stream-encoders`: streamed block by block; `model`: every part copied whole "
    "for its phase; `stream`: every part streamed. Peak: the largest over phases of the weights on the device + "
    "that phase's activation peak. 1 GB = 1e9 bytes."
)


def block(parts: list[Part], env: list[str], tiny: bool) -> str:
    lines = [
        f"### {TITLE}", "",
        METHOD,
        "",
        MODES_NOTE,
    ]
    if tiny:
        lines += ["", "Reduced sizes (`--tiny`): a smoke run, not the figures of issue 7."]
    lines += ["", *env, "", parts_table(parts), "", modes_table(parts)]
    return "\n".join(lines) + "\n"


# ---- measured on a GPU, beside the computed figures ----


def measure_pipeline(args: argparse.Namespace) -> list[PipelineResult]:
    """step_time's pipeline run for each of `args.offload`: one warm-up image, one timed."""
    argv = ["--models", "none", "--pipeline", "--offload", *args.offload, "--pipeline-steps", str(args.pipeline_steps),
            "--pipeline-images", "1", "--device", args.device, "--out", "-", *(["--tiny"] if args.tiny else [])]
    st_args = step_time_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return bench_pipeline(st_args, device, dtype)


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def measured_table(parts: list[Part], results: list[PipelineResult], goal_gb: float = GOAL_GB) -> str:
    lines = ["| offload | max allocated GB | max reserved GB | computed GB | allocated / computed "
             f"| <= {goal_gb:g} GB (allocated) | s/image | rel err vs first row | note |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        computed = mode_peak(parts, r.offload) / GB
        ratio = f"{r.peak_gb / computed:.3f}" if r.peak_gb is not None else "-"
        goal = "-" if r.peak_gb is None else ("yes" if r.peak_gb <= goal_gb else "no")
        lines.append(f"| {r.offload or 'none'} | {_num(r.peak_gb, '.2f')} | {_num(r.reserved_gb, '.2f')} "
                     f"| {computed:.2f} | {ratio} | {goal} | {_num(r.seconds, '.2f')} | {_num(r.rel_err, '.1e')} "
                     f"| {r.note} |")
    return "\n".join(lines)


def measured_block(parts: list[Part], results: list[PipelineResult], env: list[str], tiny: bool) -> str:
    first = results[0]
    lines = [
        f"### {MEASURED}", "",
        (f"Measured: FLUX.1-dev text to image (`sampling.FluxPipeline`) with random weights, bf16 on a GPU (CLIP-L, "
         f"T5-XXL, transformer, autoencoder), random token ids, {first.size}, batch 1, {first.steps} steps (the peak "
         "does not grow with the steps); one warm-up image, then one timed image whose peak is read: "
         "`torch.cuda.max_memory_allocated` and `max_memory_reserved`, everything on the device (weights included, "
         "the allocator's cache emptied first). Computed: this module's figure for the same mode "
         f"(block \"{TITLE}\"). `rel err`: the image against the first mode's (offloading must not change it). "
         "1 GB = 1e9 bytes."),
    ]
    if tiny:
        lines += ["", "Reduced sizes (`--tiny`): a smoke run, not the figures of issue 17."]
    lines += ["", *env, "", measured_table(parts, results)]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="reduced sizes (as step_time's tiny configs)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="'-' to write nothing")
    ap.add_argument("--append", type=Path, help="also append each block to this file as soon as it is done")
    ap.add_argument("--measure", action="store_true", help="also run the pipeline and measure its peaks (a GPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="for --measure")
    ap.add_argument("--offload", nargs="+", default=["none", "encoders", "stream-encoders"],
                    choices=["none", *(m for m in MODES if m)], help="the modes --measure runs")
    ap.add_argument("--pipeline-steps", type=int, default=4, help="steps of each --measure image")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Part]:
    args = parse_args(argv)
    command = " ".join(["python -m benchmarks.memory_cost", *(sys.argv[1:] if argv is None else argv)])
    parts = pipeline_parts(args.tiny)
    publish(TITLE, block(parts, environment(torch.device("meta"), command), args.tiny), args.out, args.append)
    if args.measure:
        results = measure_pipeline(args)
        env = environment(torch.device(args.device), command)
        publish(MEASURED, measured_block(parts, results, env, args.tiny), args.out, args.append)
    return parts


if __name__ == "__main__":
    main()
