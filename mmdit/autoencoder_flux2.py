"""The FLUX.2 autoencoder: FLUX.1's LDM encoder/decoder at 32 latent channels, quant convs, batch-norm statistics.

What changed from the FLUX.1 autoencoder (mmdit/autoencoder.py), all from BFL flux2 `src/flux2/autoencoder.py`
and Diffusers 0.42.1 `models/autoencoders/autoencoder_kl_flux2.py`:
- 32 latent channels (`z_channels`), same levels (128, 256, 512, 512) and blocks;
- 1x1 convs on the moments (`encoder.quant_conv`, 2z -> 2z, after conv_out) and on the latent
  (`decoder.post_quant_conv`, z -> z, before conv_in): BFL keeps them inside the encoder and decoder,
  Diffusers at the top (`quant_conv`, `post_quant_conv`);
- no scale and shift factors: the transformer's latents are the 32-channel latents patchified 2x2 to
  128 channels (channel order c, ph, pw) and normalized per channel by statistics stored in the file,
  `bn.running_mean` and `bn.running_var` (a BatchNorm2d without affine weights, eps 1e-4):

      normalize(x)   = (x - running_mean) / sqrt(running_var + eps)
      denormalize(x) = x * sqrt(running_var + eps) + running_mean

`encode` returns the posterior mean (Diffusers' `latent_dist.mode()`, which the FLUX.2 pipelines use for
reference images), un-normalized, 32 channels; `decode` takes the same. The pipelines go through
`patchify` + `normalize` after encoding and `denormalize` + `unpatchify` before decoding. Tiled and
batch-sliced decoding work as for the FLUX.1 autoencoder (see mmdit/autoencoder.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from einops import rearrange
from torch import Tensor, nn

from . import autoencoder as ldm
from .layers import WeightsModule


@dataclass(frozen=True)
class AutoEncoderFlux2Params:
    family: ClassVar[str] = "flux2"
    ch: int = 128  # channels of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 32
    in_channels: int = 3
    out_ch: int = 3
    patch: int = 2  # latents are patchified patch x patch before normalization
    bn_eps: float = 1e-4  # BFL's `bn_eps`, Diffusers' `batch_norm_eps`

    def __post_init__(self):
        ldm.check_levels(self.ch, self.ch_mult, self.num_res_blocks)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels of the patchified latent the transformer sees (128)."""
        return self.z_channels * self.patch**2

    def tiny(self) -> "AutoEncoderFlux2Params":
        """Same layout, narrow: three levels of 32, 64, 96 channels (a wrong level order cannot load)."""
        return replace(self, ch=32, ch_mult=(1, 2, 3))


AE_FLUX2_PRESETS = {"flux2": AutoEncoderFlux2Params()}


def patchify(z: Tensor, patch: int = 2) -> Tensor:
    """(B, C, h, w) -> (B, C p p, h/p, w/p), channel order (c, ph, pw): Diffusers' `_patchify_latents`."""
    if z.shape[-2] % patch or z.shape[-1] % patch:
        raise ValueError(f"latent height and width must be multiples of {patch} to patchify, got {list(z.shape[-2:])}")
    return rearrange(z, "b c (h ph) (w pw) -> b (c ph pw) h w", ph=patch, pw=patch)


def unpatchify(x: Tensor, patch: int = 2) -> Tensor:
    """(B, C p p, h, w) -> (B, C, h p, w p): the inverse of `patchify`."""
    return rearrange(x, "b (c ph pw) h w -> b c (h ph) (w pw)", ph=patch, pw=patch)


class Encoder(ldm.Encoder):
    """The LDM encoder, then BFL's `quant_conv` on the moments (mean, log-variance)."""

    def __init__(self, p: AutoEncoderFlux2Params):
        super().__init__(p)
        self.quant_conv = nn.Conv2d(2 * p.z_channels, 2 * p.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.quant_conv(super().forward(x))  # (B, 2 z, H/f, W/f)


class Decoder(ldm.Decoder):
    """BFL's `post_quant_conv` on the latent, then the LDM decoder."""

    def __init__(self, p: AutoEncoderFlux2Params):
        super().__init__(p)
        self.post_quant_conv = nn.Conv2d(p.z_channels, p.z_channels, 1)

    def forward(self, z: Tensor) -> Tensor:
        return super().forward(self.post_quant_conv(z))  # (B, 3, h f, w f)


class LatentStatistics(nn.Module):
    """The per-channel statistics of the patchified latents, under BatchNorm2d's key names (`bn.running_mean`, ...).

    Only read: they are buffers of a plain module, so no train-mode forward can update them.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))


class AutoEncoderFlux2(WeightsModule):
    """`encode(images in [-1, 1]) -> latents (B, 32, H/8, W/8)`, `decode(latents) -> images`, plus the normalization.

    Keys: BFL's `ae.safetensors` (`encoder.*` with `encoder.quant_conv`, `decoder.*` with
    `decoder.post_quant_conv`, `bn.running_mean`, `bn.running_var`).
    """

    def __init__(self, params: AutoEncoderFlux2Params):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.bn = LatentStatistics(params.latent_channels)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, z, H/f, W/f), the posterior mean; f = 8 for the real model."""
        f = self.params.downscale
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {list(images.shape[-2:])}")
        return self.encoder(images.to(self.dtype)).chunk(2, dim=1)[0]

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder(z.to(self.dtype))

    def decode(
        self, z: Tensor, tile: int | None = None, overlap: int | None = None, batch: int | None = None
    ) -> Tensor:
        """(B, z, h, w) -> (B, 3, h f, w f) in about [-1, 1].

        tile: decode `tile` x `tile` latent tiles overlapping by `overlap` (default tile // 4) latent pixels,
        blended linearly (approximate, see mmdit/autoencoder.py). batch: decode `batch` samples at a time (exact).
        """
        if batch is not None and z.shape[0] > batch:
            return torch.cat([self.decode(part, tile, overlap) for part in z.split(batch)])
        if tile is None:
            return self._decode(z)
        overlap = tile // 4 if overlap is None else overlap
        return ldm.tiled(self._decode, z, tile, overlap, self.params.downscale, self.params.out_ch)

    def _statistics(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """running_mean and sqrt(running_var + eps) as (1, C, 1, 1), fp32, on x's device (the weights may be offloaded)."""
        if x.shape[1] != self.params.latent_channels:
            raise ValueError(
                f"expected patchified latents with {self.params.latent_channels} channels, got {x.shape[1]} "
                "(patchify the 32-channel latents first)"
            )
        mean = self.bn.running_mean.to(x.device, torch.float32).view(1, -1, 1, 1)
        std = (self.bn.running_var.to(x.device, torch.float32) + self.params.bn_eps).sqrt().view(1, -1, 1, 1)
        return mean, std

    def normalize(self, x: Tensor) -> Tensor:
        """Patchified latents (B, 128, h, w) -> `(x - running_mean) / sqrt(running_var + eps)`, in x's dtype."""
        mean, std = self._statistics(x)
        return ((x.float() - mean) / std).to(x.dtype)

    def denormalize(self, x: Tensor) -> Tensor:
        """The inverse of `normalize`: `x * sqrt(running_var + eps) + running_mean`, in x's dtype."""
        mean, std = self._statistics(x)
        return (x.float() * std + mean).to(x.dtype)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))
