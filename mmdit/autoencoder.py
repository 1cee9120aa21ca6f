"""The 16-channel KL autoencoder of FLUX.1 and SD3/SD3.5, in the LDM layout (BFL's `ae.safetensors` keys).

Encoder: conv_in, then per level `num_res_blocks` ResnetBlocks and a stride-2 downsample (not after
the last level), a mid block (ResnetBlock, single-head self-attention over the spatial positions,
ResnetBlock), GroupNorm + swish + conv_out to `2 * z_channels` (mean and log-variance). The decoder
mirrors it with `num_res_blocks + 1` blocks per level and nearest x2 upsampling + conv. GroupNorm has
32 groups and eps 1e-6. There is no `quant_conv` / `post_quant_conv` (BFL flux `src/flux/modules/autoencoder.py`;
docs/formats.md, autoencoder).

`encode` returns the scaled posterior mean `scale * (mean - shift)` (BFL's default; SAI samples instead),
`decode` inverts the scaling. Both families use the same weights layout; only the factors differ.

Tiled decoding (`decode(z, tile=...)`) decodes overlapping latent tiles one at a time and blends them
with linear ramps over the overlap. Memory: the decoder's activations scale with the decoded area
(at full resolution: up to 256 channels x H x W per tensor, e.g. 2 GiB in bf16 for a 2048^2 image,
several alive at once), and the mid-block attention with the square of the latent area where SDPA
has no memory-efficient kernel (CPU: an (H/8 W/8)^2 matrix, 16 GiB in fp32 for 2048^2). Tiles of
`tile` latent pixels bound both by the tile's area: with tile=64 a 2048^2 decode needs the memory of
a 512^2 one (16x less activation memory). Each tile normalizes (GroupNorm) and attends over itself
only, so the result is close to, not equal to, the whole-image decode; the overlap hides the seams.
`decode(z, batch=n)` slices over the batch instead: exact, and it bounds memory by n images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .layers import WeightsModule


@dataclass(frozen=True)
class AutoEncoderParams:
    ch: int = 128  # channels of the first level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # per level; 2^(len - 1) is the spatial factor (8)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    def __post_init__(self):
        check_levels(self.ch, self.ch_mult, self.num_res_blocks)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


def check_levels(ch: int, ch_mult: tuple[int, ...], num_res_blocks: int) -> None:
    """Raises ValueError unless every level's channel count suits GroupNorm(32) and there is at least one
    level with at least one ResnetBlock."""
    bad = [ch * m for m in ch_mult if (ch * m) % 32]
    if bad:
        raise ValueError(f"GroupNorm(32) needs channel counts divisible by 32, got {bad}")
    if num_res_blocks < 1 or not ch_mult:
        raise ValueError("the autoencoder needs at least one level and one ResnetBlock per level")


AE_PRESETS = {
    "flux": AutoEncoderParams(scale_factor=0.3611, shift_factor=0.1159),
    "sd3": AutoEncoderParams(scale_factor=1.5305, shift_factor=0.0609),
}


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # a 1x1 conv where the channel count changes (LDM's key); no weights otherwise
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v, proj_out are 1x1 convs (LDM keys)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(rearrange(h, "b 1 (h w) c -> b c h w", h=H, w=W))


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only (LDM's asymmetric padding)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: `block.{i}` ResnetBlocks, then `downsample` (encoder) or `upsample` (decoder), if any."""

    def __init__(self, in_channels: int, out_channels: int, n_blocks: int, down: bool = False, up: bool = False):
        super().__init__()
        self.block = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(n_blocks)
        )
        self.downsample = Downsample(out_channels) if down else None
        self.upsample = Upsample(out_channels) if up else None

    def forward(self, x: Tensor) -> Tensor:
        for block in self.block:
            x = block(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, H/2, W/2)
        if self.upsample is not None:
            x = self.upsample(x)  # (B, C, 2H, 2W)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        chans = [p.ch * m for m in p.ch_mult]
        n = len(chans)
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(([p.ch] + chans)[i], chans[i], p.num_res_blocks, down=i < n - 1) for i in range(n)
        )
        self.mid = MidBlock(chans[-1])
        self.norm_out = group_norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * p.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)
        h = self.mid(h)  # (B, ch * ch_mult[-1], H/f, W/f)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 2 z, H/f, W/f): mean, log-variance


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        chans = [p.ch * m for m in p.ch_mult]
        self.conv_in = nn.Conv2d(p.z_channels, chans[-1], 3, padding=1)
        self.mid = MidBlock(chans[-1])
        # up.{i} works at the resolution of down.{i}; it runs from the last level back to up.0
        self.up = nn.ModuleList(
            Level((chans + [chans[-1]])[i + 1], chans[i], p.num_res_blocks + 1, up=i > 0)
            for i in range(len(chans))
        )
        self.norm_out = group_norm(chans[0])
        self.conv_out = nn.Conv2d(chans[0], p.out_ch, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid(self.conv_in(z))  # (B, ch * ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, 3, h f, w f)


def _ramp(n: int, overlap: int, first: bool, last: bool, device) -> Tensor:
    """Blend weights along one axis of a tile: rising over the leading overlap, falling over the trailing one."""
    w = torch.ones(n, device=device)
    ramp = (torch.arange(overlap, device=device) + 0.5) / overlap
    if overlap and not first:
        w[:overlap] = ramp
    if overlap and not last:
        w[n - overlap :] = ramp.flip(0)
    return w


def _starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, size): every `stride`, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def tiled(fn: Callable[[Tensor], Tensor], z: Tensor, tile: int, overlap: int, factor: int, out_channels: int) -> Tensor:
    """Apply `fn` (latent (B, C, h, w) -> image (B, out, h f, w f)) on overlapping latent tiles and blend them.

    The output is accumulated in fp32 and returned in the dtype of `fn`'s output.
    """
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    B, _, h, w = z.shape
    out = torch.zeros(B, out_channels, h * factor, w * factor, device=z.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, h * factor, w * factor, device=z.device, dtype=torch.float32)
    ys, xs = _starts(h, tile, tile - overlap), _starts(w, tile, tile - overlap)
    for y in ys:
        for x in xs:
            part = fn(z[:, :, y : y + tile, x : x + tile])  # (B, out, th f, tw f)
            th, tw = part.shape[-2:]
            oy = overlap * factor if len(ys) > 1 else 0  # blend over the overlap's pixels
            ox = overlap * factor if len(xs) > 1 else 0
            # neighbours may overlap by more than `overlap` (the last tile is flush with the edge): ramps over
            # the nominal overlap, then the weights are normalized, so the blend stays a convex combination
            wy = _ramp(th, min(oy, th), y == ys[0], y == ys[-1], z.device)
            wx = _ramp(tw, min(ox, tw), x == xs[0], x == xs[-1], z.device)
            wt = wy[:, None] * wx[None, :]
            Y, X = y * factor, x * factor
            out[:, :, Y : Y + th, X : X + tw] += part.float() * wt
            weight[:, :, Y : Y + th, X : X + tw] += wt
    return (out / weight).to(part.dtype)


class AutoEncoder(WeightsModule):
    """`encode(images in [-1, 1]) -> scaled latents`, `decode(latents) -> images`; keys `encoder.*`, `decoder.*`."""

    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)

    def encode(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, z, H/f, W/f) = scale * (posterior mean - shift); f = 8 for the real model."""
        f = self.params.downscale
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {list(images.shape[-2:])}")
        mean = self.encoder(images.to(self.dtype)).chunk(2, dim=1)[0]
        return self.params.scale_factor * (mean - self.params.shift_factor)

    def _decode(self, z: Tensor) -> Tensor:
        return self.decoder(z.to(self.dtype) / self.params.scale_factor + self.params.shift_factor)

    def decode(
        self, z: Tensor, tile: int | None = None, overlap: int | None = None, batch: int | None = None
    ) -> Tensor:
        """(B, z, h, w) -> (B, 3, h f, w f) in about [-1, 1].

        tile: decode `tile` x `tile` latent tiles overlapping by `overlap` (default tile // 4) latent pixels,
        blended linearly (approximate, see the module docstring). batch: decode `batch` samples at a time (exact).
        """
        if batch is not None and z.shape[0] > batch:
            return torch.cat([self.decode(part, tile, overlap) for part in z.split(batch)])
        if tile is None:
            return self._decode(z)
        overlap = tile // 4 if overlap is None else overlap
        return tiled(self._decode, z, tile, overlap, self.params.downscale, self.params.out_ch)

    def forward(self, images: Tensor) -> Tensor:
        return self.decode(self.encode(images))


def preset(family: str, **fields) -> AutoEncoderParams:
    """The family's params (`AE_PRESETS`), with some fields replaced (e.g. a tiny test config)."""
    if family not in AE_PRESETS:
        raise ValueError(f"unknown autoencoder family {family!r}; known: {', '.join(AE_PRESETS)}")
    return replace(AE_PRESETS[family], **fields)
