"""An exact, weightless stand-in for the autoencoder: pixels folded into channels (space-to-depth).

`encode` turns an image (B, 3, H, W) in [-1, 1] into latents (B, 3 f^2, H/f, W/f) with
`pixel_unshuffle` (each f x f block of pixels becomes 3 f^2 channels), `decode` undoes it with
`pixel_shuffle`: no training, no loss. The tiny embedded model (assets/tiny-flux) works on 32x32
images with f = 2, so its latents are (B, 12, 16, 16) and the transformer sees 8x8 = 64 tokens of
48 values. Deviation from the FLUX/SD3 interface: 12 latent channels instead of 16 (the pipeline
takes the count and the factor from the codec's `params`, as from the autoencoder's).

Its folder holds only `config.json`: `{"_class_name": "PixelCodec", "downscale": 2, "in_channels": 3}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CLASS_NAME = "PixelCodec"


@dataclass(frozen=True)
class PixelCodecParams:
    downscale: int = 2
    in_channels: int = 3

    @property
    def z_channels(self) -> int:
        return self.in_channels * self.downscale**2

    @property
    def out_ch(self) -> int:
        return self.in_channels


class PixelCodec(nn.Module):
    """`encode(images in [-1, 1]) -> latents`, `decode(latents) -> images`, exact inverses of each other."""

    def __init__(self, params: PixelCodecParams = PixelCodecParams()):
        super().__init__()
        self.params = params
        self.register_buffer("anchor", torch.zeros(()), persistent=False)  # carries the device and dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def encode(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C f^2, H/f, W/f)."""
        f = self.params.downscale
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {list(images.shape[-2:])}")
        return F.pixel_unshuffle(images.to(self.dtype), f)

    def decode(self, z: Tensor, tile: int | None = None) -> Tensor:
        """(B, C f^2, h, w) -> (B, C, h f, w f); `tile` is accepted for the autoencoder's interface (exact anyway)."""
        return F.pixel_shuffle(z.to(self.dtype), self.params.downscale)

    def config(self) -> dict:
        return {"_class_name": CLASS_NAME, "downscale": self.params.downscale, "in_channels": self.params.in_channels}


def is_pixel_codec(folder: Path) -> bool:
    config = folder / "config.json"
    return folder.is_dir() and config.is_file() and json.loads(config.read_text()).get("_class_name") == CLASS_NAME


def load_pixel_codec(folder: Path, device="cpu", dtype: torch.dtype | None = None) -> PixelCodec:
    """The codec a `config.json` describes (no weights)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    unknown = set(config) - {"_class_name", "downscale", "in_channels"}
    if unknown:
        raise ValueError(f"{folder}/config.json: unknown PixelCodec setting(s) {sorted(unknown)}")
    params = PixelCodecParams(config.get("downscale", 2), config.get("in_channels", 3))
    return PixelCodec(params).to(device, dtype or torch.float32)
