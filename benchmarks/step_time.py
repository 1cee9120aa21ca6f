"""Step time, TACA overhead and memory of our MM-DiT transformers, side by side with Diffusers' (issue 7).

    python -m benchmarks.step_time --models flux-dev sd3.5-large sd3.5-medium flux2-klein-4b --compile
    python -m benchmarks.step_time --models flux-dev --modes compiled --compile-blocks    # compiled rows only
    python -m benchmarks.step_time --models sd3.5-large --batch 2    # a CFG step (conditional + unconditional)
    python -m benchmarks.step_time --tiny --device cpu    # reduced sizes: a smoke run of the harness
    python -m benchmarks.step_time --models none --pipeline    # the full FLUX pipeline only
    python -m benchmarks.step_time --cost    # what an eager step asks of a GPU, counted on the meta device
    python -m benchmarks.step_time --models flux-dev --profile    # and the top kernels of one eager step
    bash benchmarks/gpu_suite.sh /tmp/gpu_suite/gpu_suite.md    # every GPU block of issue 17 (see that script)

Per model (random weights, 1024x1024: 128x128 latents = 4096 image tokens; 512 text tokens for FLUX.1 and
FLUX.2 [klein] (its Qwen3 prompt is padded to 512), 333 for SD3), ours is built straight on the device in
the benchmark dtype (bf16 on a GPU: the 12B model is never allocated in fp32). Diffusers'
`FluxTransformer2DModel` / `SD3Transformer2DModel` / `Flux2Transformer2DModel` is built on the meta device
and gets the same tensors with `load_state_dict(assign=True)` after the key conversion (FLUX:
benchmarks/diffusers_flux.py, Diffusers' rules for any size; SD3 and FLUX.2: Diffusers' own single-file
converters), so both models are resident with one copy of the weights (Diffusers' own copies: the swapped
final adaLNs, and for SD3 the q, k, v projections, which its converter copies). Before timing, each variant's
output is compared with Diffusers' eager output on the same input (the `rel err` column: ~1e-7 in fp32;
in bf16 FLUX differs more, as Diffusers (like BFL) rounds 1000 t and 1000 guidance to bf16 where we keep fp32).
FLUX.2 [klein] 4B (`flux2-klein-4b`): 32-channel latents patchified 2x2 to 128, no pooled vector, no guidance.

Variants: ours plain and with TACA (`temperature=1.2`, the split-SDPA path of mmdit/attention.py);
Diffusers plain; in eager mode also Diffusers with TACA the paper's unfused way (explicit logits,
`F.scaled_dot_product_attention` swapped for `softmax(T * q k^T / sqrt(d)) v` during its calls).
`--modes eager compiled` picks the modes timed (default: eager; `--compile` adds compiled);
compiled is `torch.compile(model)` of each (not the explicit-logits one), compile warm-up excluded;
`--compile-mode` picks torch.compile's mode for both (e.g. `max-autotune`: longer warm-up);
`--compile-blocks` compiles each repeated block in place instead of the whole model (regional
compilation, as Diffusers' `compile_repeated_blocks`): one compile per block class, so seconds to a
minute of warm-up where a whole 12B model takes minutes.

Timing: on CUDA a pair of CUDA events around each step (`torch.cuda.Event(enable_timing=True)`), the
steps queued back to back as a sampling loop runs them and read after one synchronize; on a CPU
`time.perf_counter` around each step. The median of `--steps` (default 20) after `--warmup`. Peak
memory (CUDA only): the model's own weights plus the peak of what the steps allocate above what was
allocated before them (`max_memory_allocated` after `reset_peak_memory_stats`), so the shared weights
are counted once per model, as if it were alone; `reserved GB` likewise from `max_memory_reserved`,
the allocator's cache emptied first (what the process holds from the driver, fragmentation included).
Also reported: graph breaks of `torch._dynamo.explain` on a tiny model of the same layout (plain,
float and tensor temperature), and on CUDA the host-device syncs of one eager step
(`torch.cuda.set_sync_debug_mode`).

The full FLUX pipeline (`--pipeline`): sampling.FluxPipeline with random-weight CLIP-L, T5-XXL,
transformer and autoencoder (tokenizers replaced by fixed random ids), for each `--offload` mode
(default: the text encoders streamed to the GPU block by block, copied whole, and every part copied
whole for its phase): seconds per image and peak memory.

The cost model (`--cost`, no GPU needed): one eager step at full size, ours and Diffusers', counted op
by op on the meta device (benchmarks/step_cost.py): kernels, matmul and attention FLOPs, bytes moved.
The profile (`--profile`): one eager step of ours, plain and TACA, under `torch.profiler`: the kernels
that take the most device time (on a CPU: the ATen ops), where a goal is missed.

Results go to the "## Step time (GPU)" section of `--out` (one `###` block per model and mode, replaced
by a run of the same; other sections and blocks are kept), with device, driver, versions, date and
command; `--append PATH` also appends each block to PATH as soon as it is measured (a run cut short
keeps the blocks it finished: benchmarks/gpu_suite.sh).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

import mmdit
from convert.files import write_atomic
from mmdit.autoencoder import AutoEncoder, AutoEncoderParams
from mmdit.autoencoder import preset as ae_preset
from mmdit.clip import CLIP_PRESETS, CLIPConfig, CLIPTextEncoder
from mmdit.flux import PRESETS as FLUX_PRESETS
from mmdit.flux import image_ids
from mmdit.flux2 import PRESETS as FLUX2_PRESETS
from mmdit.flux2 import image_ids as flux2_image_ids
from mmdit.flux2 import patchify as flux2_patchify
from mmdit.flux2 import text_ids as flux2_text_ids
from mmdit.sd3 import PRESETS as SD3_PRESETS
from mmdit.t5 import T5_PRESETS, T5Config, T5Encoder
from sampling.offload import EVERY_PART, blocks_of
from sampling.pipeline import FluxPipeline

from .diffusers_flux import diffusers_flux, flux_bfl_to_diffusers
from .load_sd3 import diffusers_config, machine
from .step_cost import StepCost, step_cost

ROOT = Path(__file__).resolve().parent.parent

SECTION = "## Step time (GPU)"
PIPELINE = "FLUX.1-dev pipeline"
MODELS = ("flux-dev", "sd3.5-large", "sd3.5-medium", "flux2-klein-4b")
GAMMA = 1.2  # TACA's temperature in the timed runs (the paper's FLUX value)
# 1024x1024 prompts: T5 512 (FLUX-dev); 77 CLIP + 256 T5 (SD3); Qwen3 padded to 512 (FLUX.2 [klein], Diffusers'
# Flux2KleinPipeline max_sequence_length)
TEXT_TOKENS = {"flux": 512, "sd3": 333, "flux2": 512}
LATENT = 128  # 1024 px / 8
TINY_TEXT_TOKENS = {"flux": 16, "sd3": 11, "flux2": 16}
TINY_LATENT = 16
GOALS = ("eager step <= 0.95x Diffusers'; compiled FLUX-dev step <= 0.13 s (H100); TACA step <= 1.02x plain; "
         "FLUX pipeline peak <= 26 GB")


# ---- models and inputs ----


def model_params(name: str, tiny: bool):
    """The full-size preset, or (tiny) its `tiny()` layout: the same input widths at two blocks of each kind."""
    presets = {**FLUX_PRESETS, **SD3_PRESETS, **FLUX2_PRESETS}
    if name not in presets:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(presets)}")
    return presets[name].tiny() if tiny else presets[name]


def rel_err(a: Tensor, b: Tensor) -> float:
    """max |a - b| / max |b|, the tests' measure (their float32 tolerance: 1e-4)."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_ours(params, device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Our model with random weights (PyTorch's default init), created directly on `device` in `dtype`."""
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype):
        model = mmdit.build_model(params).eval()
        if params.family == "sd3":
            model.pos_embed.normal_()  # the table is a buffer (zeros at init): make positions matter
    return model


def diffusers_twin(ours: nn.Module) -> nn.Module:
    """Diffusers' model of the same config, holding the very tensors of `ours` where its conversion does not copy."""
    p, sd = ours.params, ours.state_dict()
    with torch.device("meta"):
        if p.family == "flux":
            ref, sd = diffusers_flux(p), flux_bfl_to_diffusers(sd, p)
        elif p.family == "flux2":
            from diffusers import Flux2Transformer2DModel
            from diffusers.loaders.single_file_utils import (
                convert_flux2_transformer_checkpoint_to_diffusers,
            )

            ref = Flux2Transformer2DModel(
                in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
                attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
                joint_attention_dim=p.context_in_dim, mlp_ratio=p.mlp_ratio, axes_dims_rope=p.axes_dim,
                rope_theta=p.theta, guidance_embeds=p.guidance_embed,
            )
            sd = convert_flux2_transformer_checkpoint_to_diffusers(dict(sd))  # it pops keys: give it a copy
        else:
            from diffusers import SD3Transformer2DModel
            from diffusers.loaders.single_file_utils import (
                convert_sd3_transformer_checkpoint_to_diffusers,
            )

            ref = SD3Transformer2DModel.from_config(diffusers_config(p))
            sd = convert_sd3_transformer_checkpoint_to_diffusers(dict(sd))  # it pops keys: give it a copy
    ref.load_state_dict(sd, strict=True, assign=True)
    device = next(ours.parameters()).device
    if left := [n for n, t in [*ref.named_parameters(), *ref.named_buffers()] if t.device != device]:
        raise RuntimeError(f"Diffusers' model kept tensors off {device}: {left[:5]}")
    return ref.eval()


def input_sizes(params, args: argparse.Namespace) -> tuple[int, int, str]:
    """(latent side, text tokens, a description) of the benchmark inputs: full size, or `--tiny`."""
    latent = TINY_LATENT if args.tiny else LATENT
    n_txt = (TINY_TEXT_TOKENS if args.tiny else TEXT_TOKENS)[params.family]
    batch = f"batch {args.batch}" + (" (one CFG step: conditional and unconditional halves)" if args.batch == 2 else "")
    shape = f"{batch}, {latent}x{latent} latents ({(latent // 2) ** 2} image tokens), {n_txt} text tokens"
    return latent, n_txt, shape


@dataclass
class Inputs:
    x: Tensor  # (B, 16, h, w) latents; FLUX.2: (B, 32, h, w)
    t: Tensor  # (B,) in [0, 1]
    context: Tensor  # (B, L_txt, 4096); FLUX.2 [klein] 4B: (B, L_txt, 7680), three stacked Qwen3 layers
    pooled: Tensor | None  # (B, 768 | 2048); None for FLUX.2
    guidance: Tensor | None  # (B,) FLUX-dev only


def make_inputs(
    params, latent: int, n_txt: int, device: torch.device, dtype: torch.dtype, batch: int = 1, seed: int = 1
) -> Inputs:
    """Random inputs of one step: `latent` x `latent` latents, `n_txt` text tokens (see `Inputs` for the shapes)."""
    g = torch.Generator(device).manual_seed(seed)
    fam = params.family
    # latent channels: 16 for FLUX.1 (packed 2x2 into in_channels = 64) and SD3; 32 for FLUX.2 (2x2 -> 128)
    c = params.in_channels // 4 if fam == "flux2" else 16

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    x = randn(batch, c, latent, latent)
    t = torch.rand(batch, generator=g, device=device)
    context = randn(batch, n_txt, params.context_in_dim)
    pooled = None if fam == "flux2" else randn(batch, params.vec_in_dim if fam == "flux" else params.adm_in_channels)
    # distilled guidance (FLUX.1-dev 3.5, FLUX.2 [dev] 4.0: the pipelines' defaults); [klein] has none
    scale = {"flux": 3.5, "flux2": 4.0}.get(fam)
    guidance = torch.full((batch,), scale, device=device) if scale and params.guidance_embed else None
    return Inputs(x, t, context, pooled, guidance)


Step = Callable[[], Tensor]


def ours_step(model: nn.Module, inp: Inputs, temperature=None) -> Step:
    return lambda: model(inp.x, inp.t, inp.context, inp.pooled, inp.guidance, temperature=temperature)


def diffusers_step(ref: nn.Module, params, inp: Inputs) -> Step:
    """One call of Diffusers' transformer on the same inputs; returns the velocity in our layout (B, C, h, w)."""
    if params.family == "sd3":
        return lambda: ref(
            hidden_states=inp.x, encoder_hidden_states=inp.context, pooled_projections=inp.pooled,
            timestep=inp.t * 1000, return_dict=False,
        )[0]
    if params.family == "flux2":
        return flux2_diffusers_step(ref, inp)
    h, w = inp.x.shape[-2] // 2, inp.x.shape[-1] // 2
    # the packing and the position ids are what Diffusers' pipeline prepares once, outside its transformer
    packed = rearrange(inp.x, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=2, pw=2)
    img_ids, txt_ids = image_ids(h, w, inp.x.device), torch.zeros(inp.context.shape[1], 3, device=inp.x.device)

    def step() -> Tensor:
        out = ref(
            hidden_states=packed, encoder_hidden_states=inp.context, pooled_projections=inp.pooled, timestep=inp.t,
            img_ids=img_ids, txt_ids=txt_ids, guidance=inp.guidance, return_dict=False,
        )[0]
        return rearrange(out, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=h, ph=2, pw=2)

    return step


def flux2_diffusers_step(ref: nn.Module, inp: Inputs) -> Step:
    """Diffusers' `Flux2Transformer2DModel` on the tokens and position ids its pipeline prepares once, outside
    the transformer (`_patchify_latents` + `_pack_latents`, `_prepare_latent_ids`, `_prepare_text_ids`; ours
    equal them: tests/test_flux2.py); it takes t in [0, 1] and multiplies by 1000 inside."""
    h, w = inp.x.shape[-2] // 2, inp.x.shape[-1] // 2
    packed = flux2_patchify(inp.x)  # (B, h*w, 128)
    img_ids = flux2_image_ids(h, w, device=inp.x.device)  # (h*w, 4): (0, row, col, 0)
    txt_ids = flux2_text_ids(inp.context.shape[1], inp.x.device)  # (L_txt, 4): (0, 0, 0, l)

    def step() -> Tensor:
        out = ref(
            hidden_states=packed, encoder_hidden_states=inp.context, timestep=inp.t, img_ids=img_ids,
            txt_ids=txt_ids, guidance=inp.guidance, return_dict=False,
        )[0]
        return rearrange(out, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=h, ph=2, pw=2)

    return step


@contextmanager
def explicit_taca(gamma: float, n_txt: int, n_img: int, text_first: bool) -> Iterator[None]:
    """While inside, every joint SDPA call (length n_txt + n_img) computes explicit logits with image queries x
    text keys times gamma, the paper's unfused TACA; other calls (MMDiT-X's image-only `attn2`) stay plain."""
    sdpa = F.scaled_dot_product_attention
    txt = slice(0, n_txt) if text_first else slice(n_img, None)
    img = slice(n_txt, None) if text_first else slice(0, n_img)

    def explicit(query: Tensor, key: Tensor, value: Tensor, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, **kwargs) -> Tensor:  # (B, H, L, D), as torch's SDPA
        if query.shape[-2] != n_txt + n_img or attn_mask is not None or dropout_p or is_causal:
            return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        logits = (query @ key.transpose(-1, -2)) * (scale or 1 / math.sqrt(query.shape[-1]))  # (B, H, L, L)
        logits[..., img, txt] *= gamma
        return logits.softmax(-1) @ value

    F.scaled_dot_product_attention = explicit
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def explicit_taca_step(step: Step, gamma: float, n_txt: int, n_img: int, text_first: bool) -> Step:
    def run() -> Tensor:
        with explicit_taca(gamma, n_txt, n_img, text_first):
            return step()

    return run


# ---- measuring ----


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@dataclass
class Measured:
    seconds: float  # median per step (or per image)
    peak_gb: float | None  # max_memory_allocated (CUDA only)
    reserved_gb: float | None  # max_memory_reserved (CUDA only)


def measure(
    step: Step, device: torch.device, warmup: int, steps: int, weight_bytes: int, absolute: bool = False
) -> Measured:
    """The median seconds per step and the peak memory; the warm-up (compilation included) is not timed.
    On CUDA each step lies between two CUDA events, the steps queued back to back and read after one
    synchronize; elsewhere `time.perf_counter` around each step. Peak: `weight_bytes` + what the steps
    allocate (reserve) above what was allocated (reserved, the cache emptied) before them, or with
    `absolute` everything allocated (reserved) on the device at the peak."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return Measured(statistics.median(times), None, None)
    torch.cuda.empty_cache()
    base = 0 if absolute else torch.cuda.memory_allocated(device)
    base_reserved = 0 if absolute else torch.cuda.memory_reserved(device)
    torch.cuda.reset_peak_memory_stats(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    synchronize(device)
    seconds = statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)  # elapsed_time: ms
    peak = (torch.cuda.max_memory_allocated(device) - base + weight_bytes) / 1e9
    reserved = (torch.cuda.max_memory_reserved(device) - base_reserved + weight_bytes) / 1e9
    return Measured(seconds, peak, reserved)


def host_syncs(step: Step) -> int:
    """Synchronizing CUDA calls made by one step, as `torch.cuda.set_sync_debug_mode("warn")` reports them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


TEMPERATURE_KINDS = ("plain", "TACA float", "TACA tensor")


@torch.no_grad()
def graph_breaks(
    name: str, device: torch.device, dtype: torch.dtype, kinds=TEMPERATURE_KINDS
) -> dict[str, list[str]]:
    """Graph breaks of `torch._dynamo.explain` on a tiny model of the layout of `name`, per temperature kind."""
    params = model_params(name, tiny=True)
    model = build_ours(params, device, dtype)
    inp = make_inputs(params, TINY_LATENT, TINY_TEXT_TOKENS[params.family], device, dtype)
    matrix = torch.tensor([[1.0, 1.0], [GAMMA, 1.0]], device=device)
    temperatures = {"plain": None, "TACA float": GAMMA, "TACA tensor": matrix}
    found = {}
    for kind in kinds:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(ours_step(model, inp, temperatures[kind]))()
        found[kind] = [
            f"{b.reason} ({b.user_stack[-1].filename}:{b.user_stack[-1].lineno})" if b.user_stack else b.reason
            for b in explained.break_reasons
        ]
    torch._dynamo.reset()
    return found


@dataclass
class Row:
    model: str
    impl: str  # "ours" | "diffusers"
    mode: str  # "eager" | "compiled"
    taca: str  # "-" | "1.2" | "1.2 explicit"
    seconds: float
    peak_gb: float | None
    rel_err: float | None  # vs Diffusers eager (with explicit TACA for TACA rows); None: it is the reference
    reserved_gb: float | None = None


@dataclass
class ModelResult:
    name: str
    dtype: torch.dtype
    shape: str  # what one step computes
    rows: list[Row]
    taca_effect: float  # rel. difference of TACA's output from plain (Diffusers eager): the TACA check means something
    graph_breaks: dict[str, list[str]] = field(default_factory=dict)
    syncs: dict[str, int] = field(default_factory=dict)
    title: str = ""  # of its RESULTS.md block: the model, and the mode where only compiled rows were timed
    compiled_frames: list[str] = field(default_factory=list)  # what dynamo compiled: "frame: recompiled because"


def timed_modes(args: argparse.Namespace) -> list[str]:
    """`--modes`, or eager (+ compiled with `--compile`)."""
    return args.modes or ["eager", *(["compiled"] if args.compile else [])]


def block_title(name: str, args: argparse.Namespace) -> str:
    """The model's RESULTS.md block: `name`, or with the compiled rows alone `name (compiled[, blocks])`."""
    if timed_modes(args) != ["compiled"]:
        return name
    return f"{name} (compiled{', blocks' if args.compile_blocks else ''})"


def compiled_frames() -> list[str]:
    """The frames dynamo compiled since its last reset (`folder/file.py:line function`), each with the reason
    it was compiled again, if it was. A graph break shows as a `torch_dynamo_resume_in_...` frame."""
    frames = []
    for m in torch._dynamo.utils.get_compilation_metrics():
        where = Path(m.co_filename or "?")
        again = (m.recompile_reason or "").strip().splitlines()
        frames.append(f"{where.parent.name}/{where.name}:{m.co_firstlineno} {m.co_name}"
                      + (f" (recompiled: {again[0].split('#')[0].strip()})" if again else ""))
    return frames


def compile_model(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """`torch.compile(model)`, or with `--compile-blocks` each repeated block compiled in place (regional
    compilation: one compile per block class and variant, where the whole model takes minutes)."""
    options = {"mode": args.compile_mode, "backend": args.compile_backend}
    if not args.compile_blocks:
        return torch.compile(model, **options)
    for block in blocks_of(model):  # FLUX's double and single blocks, SD3's joint blocks (ours and Diffusers')
        block.compile(**options)
    return model


@torch.no_grad()
def bench_model(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> ModelResult:
    params = model_params(name, args.tiny)
    fam = params.family
    latent, n_txt, shape = input_sizes(params, args)
    n_img = (latent // 2) ** 2
    ours = build_ours(params, device, dtype, args.seed)
    ref = diffusers_twin(ours)
    inp = make_inputs(params, latent, n_txt, device, dtype, args.batch, args.seed + 1)
    taca, explicit = f"{GAMMA}", f"{GAMMA} explicit"

    # (impl, TACA column) -> (module, its step for a module or its compiled wrapper); Diffusers first (the reference)
    variants = {
        ("diffusers", "-"): (ref, lambda m: diffusers_step(m, params, inp)),
        ("diffusers", explicit): (ref, lambda m: explicit_taca_step(
            diffusers_step(m, params, inp), GAMMA, n_txt, n_img, text_first=fam != "sd3")),
        ("ours", "-"): (ours, lambda m: ours_step(m, inp)),
        ("ours", taca): (ours, lambda m: ours_step(m, inp, GAMMA)),
    }
    reference = {"-": variants["diffusers", "-"][1](ref)(), taca: variants["diffusers", explicit][1](ref)()}
    reference[explicit] = reference[taca]

    result = ModelResult(name, dtype, shape, [], taca_effect=rel_err(reference[taca], reference["-"]),
                         title=block_title(name, args))
    for mode in timed_modes(args):
        torch._dynamo.reset()
        torch._dynamo.utils.clear_compilation_metrics()
        compiled = {id(m): compile_model(m, args) for m in (ours, ref)} if mode == "compiled" else {}
        for (impl, column), (module, make) in variants.items():
            if mode == "compiled" and column == explicit:
                continue
            step = make(compiled.get(id(module), module))
            timed = measure(step, device, args.warmup, args.steps, tensor_bytes(module))
            is_ref = mode == "eager" and impl == "diffusers"
            err = None if is_ref else rel_err(step(), reference[column])
            result.rows.append(Row(name, impl, mode, column, timed.seconds, timed.peak_gb, err, timed.reserved_gb))
            if device.type == "cuda" and mode == "eager" and column != explicit:
                result.syncs[f"{impl} {'TACA' if column == taca else 'plain'}"] = host_syncs(step)
            print(format_row(result.rows[-1], result.rows), flush=True)
        if mode == "compiled":
            result.compiled_frames = compiled_frames()
        torch._dynamo.reset()
    return result


# ---- the cost of one eager step, counted on the meta device (no memory, no GPU) ----

@dataclass
class CostResult:
    name: str
    shape: str
    costs: dict[tuple[str, str], StepCost]  # (impl, TACA column) -> cost


def bench_cost(name: str, args: argparse.Namespace) -> CostResult:
    """Ours (plain, TACA) and Diffusers (plain) at the benchmark sizes, bf16, on the meta device."""
    params = model_params(name, args.tiny)
    latent, n_txt, shape = input_sizes(params, args)
    meta = torch.device("meta")
    ours = build_ours(params, meta, torch.bfloat16)
    ref = diffusers_twin(ours)
    cpu_inputs = make_inputs(params, latent, n_txt, torch.device("cpu"), torch.bfloat16, args.batch)
    inp = Inputs(**{k: None if t is None else t.to(meta) for k, t in vars(cpu_inputs).items()})
    costs = {
        ("diffusers", "-"): step_cost(diffusers_step(ref, params, inp)),
        ("ours", "-"): step_cost(ours_step(ours, inp)),
        ("ours", f"{GAMMA}"): step_cost(ours_step(ours, inp, GAMMA)),
    }
    return CostResult(name, shape, costs)


# ---- where one eager step spends its time: torch.profiler ----


@dataclass
class Kernel:
    name: str
    calls: int
    seconds: float  # self time over the step: on the device for a CUDA kernel, on the host for a CPU op


@dataclass
class ProfileResult:
    name: str
    shape: str
    device: str  # "cuda": CUDA kernels by device time; "cpu": ATen ops by host time
    kernels: dict[str, list[Kernel]]  # TACA column ("-", "1.2") -> every kernel (op) of one step, slowest first


def step_kernels(prof: torch.profiler.profile, cuda: bool) -> list[Kernel]:
    """The kernels of a profiled step, slowest first: CUDA kernels by self device time (if the profiler saw
    none, the ops by the device time under them), or on a CPU the ATen ops by self host time."""
    kernels, ops = [], []
    for e in prof.key_averages():
        device_us, host_us = e.self_device_time_total, e.self_cpu_time_total  # the profiler counts microseconds
        if e.device_type == (torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU):
            if cuda or e.key.startswith("aten::"):
                kernels.append(Kernel(e.key, e.count, (device_us if cuda else host_us) / 1e6))
        if e.key.startswith("aten::") and e.device_time_total > 0:
            ops.append(Kernel(e.key, e.count, e.device_time_total / 1e6))
    return sorted(kernels if kernels or not cuda else ops, key=lambda k: k.seconds, reverse=True)


@torch.no_grad()
def bench_profile(name: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> ProfileResult:
    """Ours, plain and TACA, one eager step each under `torch.profiler` after `--warmup` steps."""
    params = model_params(name, args.tiny)
    latent, n_txt, shape = input_sizes(params, args)
    ours = build_ours(params, device, dtype, args.seed)
    inp = make_inputs(params, latent, n_txt, device, dtype, args.batch, args.seed + 1)
    cuda = device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU, *([torch.profiler.ProfilerActivity.CUDA] if cuda else [])]
    kernels = {}
    for column, temperature in (("-", None), (f"{GAMMA}", GAMMA)):
        step = ours_step(ours, inp, temperature)
        for _ in range(max(args.warmup, 1)):
            step()
        synchronize(device)
        with torch.profiler.profile(activities=activities) as prof:
            step()
            synchronize(device)
        kernels[column] = step_kernels(prof, cuda)
    return ProfileResult(name, shape, device.type, kernels)


# ---- the FLUX pipeline ----


class RandomTokens:
    """A stand-in tokenizer: fixed random ids of the right length, the highest id (EOS for CLIP's pooling) last."""

    def __init__(self, vocab: int, length: int, seed: int):
        self.vocab, self.length, self.seed = vocab, length, seed

    def __call__(self, prompts: str | list[str]) -> Tensor:
        n = 1 if isinstance(prompts, str) else len(prompts)
        ids = torch.randint(0, self.vocab - 1, (n, self.length), generator=torch.Generator().manual_seed(self.seed))
        ids[:, -1] = self.vocab - 1
        return ids


@dataclass
class PipelineResult:
    offload: str | None
    size: str
    steps: int
    seconds: float | None  # per image
    peak_gb: float | None
    rel_err: float | None = None  # the image against the first mode's: offloading must not change it
    note: str = ""
    reserved_gb: float | None = None


def pipeline_configs(params, tiny: bool) -> tuple[T5Config, CLIPConfig, AutoEncoderParams]:
    """The FLUX.1-dev pipeline's T5-XXL, CLIP-L and autoencoder, or (tiny) one-layer encoders as wide as
    `params`' text inputs and a narrow autoencoder."""
    t5_cfg, clip_cfg, ae_params = T5_PRESETS["t5-v1.1-xxl"], CLIP_PRESETS["clip-l"], ae_preset("flux")
    if not tiny:
        return t5_cfg, clip_cfg, ae_params
    return (
        replace(t5_cfg, vocab_size=128, d_model=params.context_in_dim, num_heads=2, d_kv=32, d_ff=256, num_layers=1),
        replace(clip_cfg, vocab_size=128, width=params.vec_in_dim, layers=1, heads=2, mlp_dim=256),
        replace(ae_params, ch=32, num_res_blocks=1),
    )


@torch.no_grad()
def bench_pipeline(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[PipelineResult]:
    """FLUX-dev text to image with random weights, for each `--offload` mode: one warm-up image, then the
    median of `--pipeline-images`; peak: everything the pipeline holds on the device, weights included
    (allocated and reserved, the allocator's cache emptied before each mode's timed images)."""
    params = model_params("flux-dev", args.tiny)
    t5_cfg, clip_cfg, ae_params = pipeline_configs(params, args.tiny)
    size = 8 * (TINY_LATENT if args.tiny else LATENT)
    transformer = build_ours(params, device, dtype, args.seed)
    with torch.device(device), default_dtype(dtype):  # created on the device (fast init), then parked on the CPU
        encoders = {"clip_l": CLIPTextEncoder(clip_cfg).eval().to("cpu"), "t5": T5Encoder(t5_cfg).eval().to("cpu")}
        autoencoder = AutoEncoder(ae_params).eval()
    t5_length = (TINY_TEXT_TOKENS if args.tiny else TEXT_TOKENS)["flux"]
    tokenizers = {"clip_l": RandomTokens(clip_cfg.vocab_size, clip_cfg.max_positions, args.seed),
                  "t5": RandomTokens(t5_cfg.vocab_size, t5_length, args.seed)}
    results, images = [], {}
    for mode in args.offload:
        offload = None if mode == "none" else mode
        home = "cpu" if offload in EVERY_PART else device  # where the transformer and VAE live
        parts = {"t5": encoders["t5"].to("cpu" if offload else device),
                 "clip_l": encoders["clip_l"].to("cpu" if offload else device)}
        pipe = FluxPipeline(transformer.to(home), autoencoder.to(home), parts, tokenizers, name="random weights",
                            offload=offload, device=device)

        def image(pipe=pipe, mode=mode) -> Tensor:
            images[mode] = pipe.generate("a photo of a cat", height=size, width=size, steps=args.pipeline_steps,
                                         guidance=3.5, seed=args.seed, output="tensor")
            return images[mode]

        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        size_text = f"{size}x{size}"
        try:
            timed = measure(image, device, 1, args.pipeline_images, 0, absolute=True)
            err = rel_err(images[mode], images[args.offload[0]]) if mode != args.offload[0] else None
            results.append(PipelineResult(offload, size_text, args.pipeline_steps, timed.seconds, timed.peak_gb, err,
                                          reserved_gb=timed.reserved_gb))
        except torch.OutOfMemoryError as e:
            results.append(PipelineResult(offload, size_text, args.pipeline_steps, None, None, f"out of memory: {e}"))
        print(pipeline_row(results[-1]), flush=True)
    return results


# ---- reporting ----


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def ratios(row: Row, rows: list[Row]) -> tuple[float | None, float | None]:
    """(s/step over Diffusers' plain step in the same mode, TACA over plain of the same impl and mode)."""
    def seconds(impl: str, taca: str) -> float | None:
        same = (r for r in rows if (r.model, r.impl, r.mode, r.taca) == (row.model, impl, row.mode, taca))
        return next((r.seconds for r in same), None)

    d = seconds("diffusers", "-")
    plain = seconds(row.impl, "-")
    vs_diffusers = row.seconds / d if d and row.impl == "ours" else None
    vs_plain = row.seconds / plain if plain and row.taca != "-" else None
    return vs_diffusers, vs_plain


HEADER = (
    "| model | impl | mode | TACA | s/step (median) | x Diffusers | TACA / plain | peak GB | reserved GB "
    "| rel err vs Diffusers |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def format_row(row: Row, rows: list[Row]) -> str:
    vs_d, vs_p = ratios(row, rows)
    err = "(reference)" if row.rel_err is None else f"{row.rel_err:.1e}"
    return (f"| {row.model} | {row.impl} | {row.mode} | {row.taca} | {row.seconds:.4f} | {_num(vs_d, '.2f')} "
            f"| {_num(vs_p, '.2f')} | {_num(row.peak_gb, '.1f')} | {_num(row.reserved_gb, '.1f')} | {err} |")


def table(rows: list[Row]) -> str:
    return "\n".join([HEADER, *(format_row(r, rows) for r in rows)])


def nvidia_driver() -> str:
    if not shutil.which("nvidia-smi"):
        return "unknown (no nvidia-smi)"
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    out = subprocess.run(query, capture_output=True, text=True, check=False)
    if out.returncode or not out.stdout.strip():
        return "unknown (nvidia-smi failed)"
    return out.stdout.strip().splitlines()[0]


def diffusers_version() -> str:
    """The Diffusers in use if imported, else the one installed (importing it takes seconds: not for a version)."""
    if "diffusers" in sys.modules:
        return sys.modules["diffusers"].__version__
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device, command: str) -> list[str]:
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        memory = prop.total_memory / 2**30
        where = f"{prop.name} ({memory:.0f} GiB), driver {nvidia_driver()}, CUDA {torch.version.cuda}"
    elif device.type == "meta":
        where = "none (the meta device: shapes only)"
    else:
        where = f"CPU: {machine()}"
    return [
        f"- Device: {where}",
        f"- torch {torch.__version__}, diffusers {diffusers_version()}, Python {sys.version.split()[0]}",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `{command}`",
    ]


def model_notes(res: ModelResult) -> list[str]:
    """The lines under the table: TACA's effect, graph breaks, host-device syncs."""
    notes = [f"- TACA {GAMMA} changes the output by {res.taca_effect:.1e} (relative to plain; Diffusers eager)"]
    if res.compiled_frames:
        notes.append(f"- Compiled by dynamo ({len(res.compiled_frames)} frames): " + "; ".join(res.compiled_frames))
    if res.graph_breaks:
        counts = (f"{k}: {len(v)}" + (f" ({', '.join(v)})" if v else "") for k, v in res.graph_breaks.items())
        notes.append("- Graph breaks (`torch._dynamo.explain`, tiny model of this layout): " + "; ".join(counts))
    if res.syncs:
        notes.append("- Host-device syncs in one eager step: " + ", ".join(f"{k} {n}" for k, n in res.syncs.items()))
    return notes


def model_block(res: ModelResult, env: list[str], tiny: bool) -> str:
    lines = [f"### {res.title or res.name}", "",
             f"{res.shape}, {str(res.dtype).removeprefix('torch.')}, random weights."]
    if tiny:
        lines.append("Reduced sizes (`--tiny`): a smoke run of the harness, not the figures of issue 7.")
    lines += ["", *env, "", table(res.rows), "", *model_notes(res)]
    return "\n".join(lines) + "\n"


PIPELINE_HEADER = ("| offload | s/image (median) | peak GB | reserved GB | rel err vs first row | note |\n"
                   "|---|---|---|---|---|---|")


def pipeline_row(res: PipelineResult) -> str:
    return (f"| {res.offload or 'none'} | {_num(res.seconds, '.3f')} | {_num(res.peak_gb, '.1f')} | "
            f"{_num(res.reserved_gb, '.1f')} | {_num(res.rel_err, '.1e')} | {res.note} |")


def pipeline_block(results: list[PipelineResult], env: list[str], tiny: bool) -> str:
    first = results[0]
    lines = [
        f"### {PIPELINE}", "",
        (f"{first.size}, {first.steps} steps, random weights (CLIP-L, T5-XXL, transformer, autoencoder), batch 1. "
        "`offload` (sampling/offload.py): `encoders`: the text encoders live on the CPU and are copied whole to "
        "the device to encode; `stream-encoders`: copied one block at a time; `model`: every part lives on the "
        "CPU and is copied whole for its phase; `none`: all on the device. Peak: `max_memory_allocated` over "
        "whole images, weights included; reserved: `max_memory_reserved`. The goal (<= 26 GB) is for the FLUX "
        "pipeline with its text encoders moved off the device after encoding."),
    ]
    if tiny:
        lines.append("Reduced sizes (`--tiny`): a smoke run of the harness, not the figures of issue 7.")
    lines += ["", *env, "", PIPELINE_HEADER, *map(pipeline_row, results)]
    return "\n".join(lines) + "\n"


COST = "Eager step cost (meta device)"


COST_HEADER = (
    "| model | impl | TACA | kernels | GEMM TFLOP | attn TFLOP | other GB | ideal ms | x Diffusers | TACA / plain |"
)


def cost_block(results: list[CostResult], env: list[str]) -> str:
    lines = [
        f"### {COST}",
        "",
        "What one eager step asks of the GPU, counted op by op on the meta device (`--cost`; no GPU needed): kernels",
        "launched, matmul and attention FLOPs, and the bytes read + written by every other op (SDPA and `F.rms_norm`",
        "counted as the single fused kernels they are on CUDA). `ideal ms`: matmuls at the H100's dense bf16 peak",
        "(790 TFLOP/s) plus the other bytes at its full bandwidth (3.35 TB/s), a floor; ratios are of these floors. Computed, not timed: the GPU timings are the blocks below.",
        "Random weights, bf16; " + "; ".join(f"{r.name}: {r.shape}" for r in results) + ".",
        "",
        *env,
        "",
        COST_HEADER,
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        base, plain = res.costs["diffusers", "-"].ideal_ms(), res.costs["ours", "-"].ideal_ms()
        for (impl, taca), c in res.costs.items():
            ms = c.ideal_ms()
            vs_diffusers = _num(ms / base if impl == "ours" else None, ".2f")
            vs_plain = _num(ms / plain if taca != "-" else None, ".3f")
            lines.append(
                f"| {res.name} | {impl} | {taca} | {c.kernels} | {c.gemm_flop / 1e12:.2f} "
                f"| {c.attention_flop / 1e12:.2f} | {c.other_bytes / 1e9:.1f} | {ms:.1f} "
                f"| {vs_diffusers} | {vs_plain} |"
            )
    return "\n".join(lines) + "\n"


def profile_title(name: str) -> str:
    return f"{name}: one eager step, top kernels (torch.profiler)"


def profile_block(res: ProfileResult, env: list[str], tiny: bool, top: int = 12) -> str:
    cuda = res.device == "cuda"
    what = "CUDA kernels by self device time" if cuda else "ATen ops by self host time (no GPU: the CPU's ops)"
    total = {column: sum(k.seconds for k in kernels) for column, kernels in res.kernels.items()}
    lines = [
        f"### {profile_title(res.name)}", "",
        f"Ours, plain and TACA {GAMMA}, one eager step each after the warm-up, under `torch.profiler`; {res.shape}, "
        f"random weights. The {top} {what}; `% step`: of the sum over all of them in that step.",
    ]
    if tiny:
        lines.append("Reduced sizes (`--tiny`): a smoke run of the harness, not the figures of issue 17.")
    plain, taca = total["-"], total[f"{GAMMA}"]
    lines += ["", *env, "",
              f"- In kernels: plain {plain * 1e3:.2f} ms, TACA {taca * 1e3:.2f} ms "
              f"(TACA / plain {_num(taca / plain if plain else None, '.3f')})"]
    for column, kernels in res.kernels.items():
        lines += ["", f"TACA {column}:" if column != "-" else "Plain:", "",
                  "| # | kernel | calls | ms | % step |", "|---|---|---|---|---|"]
        for i, k in enumerate(kernels[:top], 1):
            name = k.name if len(k.name) <= 100 else k.name[:97] + "..."
            share = 100 * k.seconds / total[column] if total[column] else 0.0
            lines.append(f"| {i} | `{name.replace('|', '/')}` | {k.calls} | {k.seconds * 1e3:.3f} | {share:.1f} |")
    return "\n".join(lines) + "\n"


INTRO = f"""{SECTION}

Written by `python -m benchmarks.step_time` and `python -m benchmarks.memory_cost` (see benchmarks/README.md
and the module docstrings for the method; `benchmarks/gpu_suite.sh` runs every GPU block in one go); one
block per model, mode or measure. Timed blocks need a GPU; a block that is missing has not been run yet.
`x Diffusers`: our step over Diffusers' plain step in the same mode; `TACA / plain`: a TACA step over the
plain step of the same implementation and mode.

Goals of issue 7: {GOALS}.
"""


def block_order(title: str) -> tuple[int, str]:
    """Models first (in MODELS' order, each with its other modes and measures), then the pipeline, the cost."""
    order = [*MODELS, PIPELINE, COST]
    return next((i for i, prefix in enumerate(order) if title.startswith(prefix)), len(order)), title


def write_section(path: Path, blocks: dict[str, str]) -> None:
    """Put `blocks` (title -> `### title` text) into the section, keeping other sections and other blocks."""
    old = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    found = pattern.search(old)
    kept = {}
    for part in re.split(r"^(?=### )", found[0] if found else "", flags=re.MULTILINE)[1:]:
        kept[part.split("\n", 1)[0].removeprefix("### ").strip()] = part.rstrip("\n") + "\n"
    kept.update(blocks)
    text = "\n".join([INTRO, *(kept[t] for t in sorted(kept, key=block_order))]) + "\n"  # blank line before next
    new = pattern.sub(lambda _: text, old) if found else old.rstrip("\n") + "\n\n" + text
    write_atomic(path, lambda tmp: Path(tmp).write_text(new))


def append_block(path: Path | None, text: str) -> None:
    """Append a finished block to `path` at once (flushed and synced), so a run cut short keeps it."""
    if path is None:
        return
    with open(path, "a") as f:
        f.write(text.rstrip("\n") + "\n\n")
        f.flush()
        os.fsync(f.fileno())


def publish(title: str, text: str, out: Path, append: Path | None) -> None:
    """A block is done: print it, append it to `append`, put it in its section of `out` (unless `out` is '-')."""
    print(text, flush=True)
    append_block(append, text)
    if str(out) != "-":
        write_section(out, {title: text})
        print(f"wrote the block {title!r} of the section {SECTION!r} of {out}")


# ---- command line ----


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(MODELS), help=f"any of {' '.join(MODELS)} (or 'none')")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(model)")
    ap.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                    help="the modes to time (default: eager, and compiled with --compile)")
    ap.add_argument("--compile-mode", choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                    help="torch.compile's mode for both implementations (default: its default)")
    ap.add_argument("--compile-blocks", action="store_true",
                    help="compile each repeated block instead of the whole model, for both (a much shorter warm-up)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile's backend ('eager': a smoke test)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens in them)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="reduced sizes (two blocks, 16x16 latents)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--pipeline", action="store_true", help="also time the full FLUX-dev pipeline")
    ap.add_argument("--pipeline-steps", type=int, default=28)
    ap.add_argument("--pipeline-images", type=int, default=3, help="timed images after one warm-up image")
    ap.add_argument("--offload", nargs="+", default=["stream-encoders", "encoders", "model"],
                    choices=["none", "encoders", "stream-encoders", "model", "stream"],
                    help="the pipeline's offload modes to time (sampling/offload.py)")
    ap.add_argument("--no-graph-breaks", dest="graph_breaks", action="store_false",
                    help="skip the torch._dynamo.explain check")
    ap.add_argument("--cost", action="store_true",
                    help="only count what one eager step asks of a GPU, on the meta device (no timing, no GPU)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one eager step of ours per model, plain and TACA (the top kernels)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "RESULTS.md", help="'-' to write nothing")
    ap.add_argument("--append", type=Path, help="also append each block to this file as soon as it is measured")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models if m != "none"]
    for m in args.models:
        model_params(m, True)  # fail early on an unknown name
    return args


@dataclass
class Results:
    models: list[ModelResult] = field(default_factory=list)
    pipeline: list[PipelineResult] = field(default_factory=list)
    cost: list[CostResult] = field(default_factory=list)
    profiles: list[ProfileResult] = field(default_factory=list)


def main(argv: list[str] | None = None) -> Results:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    command = " ".join(["python -m benchmarks.step_time", *(sys.argv[1:] if argv is None else argv)])
    out = Results()

    def finished(title: str, text: str) -> None:
        publish(title, text, args.out, args.append)

    if args.cost:
        out.cost = [bench_cost(name, args) for name in args.models]
        finished(COST, cost_block(out.cost, environment(torch.device("meta"), command)))
        return out
    for name in args.models:
        print(HEADER)
        res = bench_model(name, args, device, dtype)
        gc.collect()  # both models go before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.graph_breaks:
            res.graph_breaks = graph_breaks(name, device, dtype)
        out.models.append(res)
        finished(res.title, model_block(res, environment(device, command), args.tiny))
        if args.profile:
            out.profiles.append(bench_profile(name, args, device, dtype))
            finished(profile_title(name), profile_block(out.profiles[-1], environment(device, command), args.tiny))
    if args.pipeline:
        out.pipeline = bench_pipeline(args, device, dtype)
        finished(PIPELINE, pipeline_block(out.pipeline, environment(device, command), args.tiny))
    return out


if __name__ == "__main__":
    main()
