"""The bounds of a sampling run: what the models, the memory and the PNG format allow.

Each bound is checked before the work it guards. Those that need no model (`MAX_SIDE`, `MAX_STEPS`,
`MAX_SEED`, `MAX_PNG_PIXELS`) bound the CLI's flags at parse time; `check_size` checks a size against
the model (SD3's position table) as soon as its files are read, before its weights are loaded
(`load_pipeline(..., image_size=)`) and again in `generate`; `check_memory` checks, before the prompts
are encoded, that the memory free on the device can hold at least the run's largest activation.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

# Image side, pixels: 16x the models' native 1024 (FLUX.1 was trained up to about 2 MP, SD3.5 at about
# 1 MP); a 16384x16384 FLUX image is 1M image tokens. A bound on typos: within it, the model (SD3's
# position table) and the memory decide.
MAX_SIDE = 16_384
# Sampling steps: ten per training timestep (the models are trained on 1000, Diffusers'
# `num_train_timesteps`); more only costs time.
MAX_STEPS = 10_000
# Seeds: `torch.Generator.manual_seed` takes 0..2**64 - 1 (it also wraps negative numbers: refused here).
MAX_SEED = 2**64 - 1
# Pixels of a written PNG: PIL's `Image.MAX_IMAGE_PIXELS`, above which PIL warns that opening the file may
# be a decompression bomb (and refuses twice as many): a larger `mmdit sample` PNG would not open cleanly.
MAX_PNG_PIXELS = 89_478_485
MULTIPLE = 16  # sides are multiples of 16: the autoencoder's 8x, then 2x2 patches


def check_finite(**values: float | None) -> None:
    """Refuse NaN and Inf among the named numbers (None: not given)."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")


def check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must lie in 0..2**64 - 1 (torch.Generator.manual_seed), got {seed}")


class SizeError(ValueError):
    """An image size the model or the memory cannot take; the message gives the size and the bound."""


def check_size(height: int, width: int, params, downscale: int) -> None:
    """Refuse a size that is not a positive multiple of 16, exceeds `MAX_SIDE`, or exceeds what the
    transformer (`params`) can place at this autoencoder factor `downscale`: SD3's learned position table
    covers P x P patches (`pos_embed_max_size`; SAI sd3.5 `mmditx.py` `cropped_pos_embed`), so an SD3
    image side is at most P x patch x downscale pixels (3072 for SD3/SD3.5 Large, 6144 for SD3.5 Medium).
    FLUX has no table (RoPE): only `MAX_SIDE` and the memory bound it.
    """
    size = f"{width}x{height}"
    if height <= 0 or width <= 0 or height % MULTIPLE or width % MULTIPLE:
        raise SizeError(f"size {size} (WxH): width and height must be positive multiples of {MULTIPLE}")
    if max(height, width) > MAX_SIDE:
        raise SizeError(f"size {size} (WxH): width and height are at most {MAX_SIDE}")
    if params.family == "sd3":
        side = params.pos_embed_max_size * params.patch_size * downscale
        if max(height, width) > side:
            raise SizeError(
                f"size {size} (WxH): this SD3 model's position table covers {params.pos_embed_max_size}x"
                f"{params.pos_embed_max_size} patches (pos_embed_max_size), i.e. images up to {side}x{side}"
            )


def free_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device`: CUDA's free memory plus what PyTorch holds unused; on the
    CPU, Linux's MemAvailable; None where unknown (other devices and systems)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def largest_activation(height: int, width: int, batch: int, transformer_params, ae_params, itemsize: int,
                       autoencoder_itemsize: int, tiled: bool = False) -> int:
    """A lower bound, in bytes, of the memory a run needs beyond the weights: the larger of
    - the transformer's MLP hidden activation of one block, (batch, image tokens, mlp_hidden), which
      every block of every family computes (image tokens: one per 2x2 latent patch);
    - the autoencoder decoder's last level, which runs at full resolution with `ch` channels (128 in
      FLUX's and SD3's): its input and output, 2 x (batch, ch, H, W) (none with tiled decoding, or for
      a decoder without levels such as assets/tiny-flux's pixel codec).
    """
    tokens = math.prod(s // (ae_params.downscale * 2) for s in (height, width))
    mlp = batch * tokens * getattr(transformer_params, "mlp_hidden", 0) * itemsize
    channels = getattr(ae_params, "ch", 0)
    decode = 0 if tiled else 2 * batch * channels * height * width * autoencoder_itemsize
    return max(mlp, decode)


def check_memory(need: int, device: torch.device, height: int, width: int) -> None:
    """Refuse a size whose largest activation alone (`need` bytes, a lower bound) exceeds the free memory."""
    free = free_memory(device)
    if free is not None and need > free:
        raise SizeError(
            f"size {width}x{height} (WxH): one activation of this run alone needs {need / 2**30:.1f} GiB, "
            f"{device} has {free / 2**30:.1f} GiB free: choose a smaller size"
        )
