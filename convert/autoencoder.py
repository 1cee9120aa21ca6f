"""Loading the 16-channel autoencoder: BFL `ae.safetensors`, Diffusers `vae/` folders, SAI single files.

LDM keys (BFL's `ae.safetensors`, SAI's `first_stage_model.*`, ComfyUI's `vae.*`) are ours (BFL flux
`src/flux/modules/autoencoder.py`). Diffusers renames them (Diffusers `loaders/single_file_utils.py`
`convert_ldm_vae_checkpoint`; docs/formats.md, "Autoencoder"): `down.{l}.block` -> `down_blocks.{l}.resnets`, `nin_shortcut` ->
`conv_shortcut`, `mid.block_{1,2}` -> `mid_block.resnets.{0,1}`, `mid.attn_1.{norm,q,k,v,proj_out}` ->
`mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` (stored as linear [C, C] where LDM has
1x1 convs [C, C, 1, 1]), `norm_out` -> `conv_norm_out`, and the decoder's `up.{b}` -> `up_blocks.{n-1-b}`
(reversed). The config (ch, ch_mult, num_res_blocks, z_channels) is read from the shapes; the latent
scale and shift come from `family`, checked against a Diffusers `config.json` when there is one.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from mmdit.autoencoder import AutoEncoder, AutoEncoderParams, preset

from .files import (
    AUTOENCODER_PREFIXES,
    Checkpoint,
    CheckpointError,
    Config,
    Shapes,
    load_state_dict_strict,
    read_config,
)
from .mapping import KeyMap

_W = r"(weight|bias)"
_RES = rf"(norm1|conv1|norm2|conv2)\.{_W}"
_MID = r"(encoder|decoder)\.mid_block"
_SHORTCUT = rf"conv_shortcut\.{_W}"
_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", r"to_out\.0": "proj_out"}


def diffusers_to_ldm(n_levels: int) -> KeyMap:
    """Diffusers `AutoencoderKL` keys -> LDM keys, for a model with `n_levels` resolution levels."""
    renames = [
        (rf"(encoder|decoder)\.conv_in\.{_W}", r"\1.conv_in.\2"),
        (rf"(encoder|decoder)\.conv_out\.{_W}", r"\1.conv_out.\2"),
        (rf"(encoder|decoder)\.conv_norm_out\.{_W}", r"\1.norm_out.\2"),
        (rf"{_MID}\.resnets\.0\.{_RES}", r"\1.mid.block_1.\2.\3"),
        (rf"{_MID}\.resnets\.1\.{_RES}", r"\1.mid.block_2.\2.\3"),
        *[(rf"{_MID}\.attentions\.0\.{d}\.{_W}", rf"\1.mid.attn_1.{ldm}.\2") for d, ldm in _ATTN.items()],
        (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{_RES}", r"encoder.down.\1.block.\2.\3.\4"),
        (rf"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.{_SHORTCUT}", r"encoder.down.\1.block.\2.nin_shortcut.\3"),
        (rf"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.{_W}", r"encoder.down.\1.downsample.conv.\2"),
    ]
    for i in range(n_levels):  # the decoder's level order is reversed
        b = n_levels - 1 - i
        renames += [
            (rf"decoder\.up_blocks\.{i}\.resnets\.(\d+)\.{_RES}", rf"decoder.up.{b}.block.\1.\2.\3"),
            (rf"decoder\.up_blocks\.{i}\.resnets\.(\d+)\.{_SHORTCUT}", rf"decoder.up.{b}.block.\1.nin_shortcut.\2"),
            (rf"decoder\.up_blocks\.{i}\.upsamplers\.0\.conv\.{_W}", rf"decoder.up.{b}.upsample.conv.\1"),
        ]
    return KeyMap(renames)


def params_from_shapes(shape: Shapes, family: str) -> AutoEncoderParams:
    """The config implied by the shapes of the LDM keys, with the family's latent factors."""
    ch, in_channels = shape["encoder.conv_in.weight"][:2]
    n_levels = shape.count_blocks(r"encoder\.down\.(\d+)\.")
    return preset(
        family, ch=ch, in_channels=in_channels,
        ch_mult=tuple(shape[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(n_levels)),
        num_res_blocks=shape.count_blocks(r"encoder\.down\.0\.block\.(\d+)\."),
        z_channels=shape["decoder.conv_in.weight"][1], out_ch=shape["decoder.conv_out.weight"][0],
    )


def open_autoencoder_file(path: Path) -> tuple[Path, Checkpoint, dict | None]:
    """The file that holds an autoencoder (`path` itself, or the weights of a Diffusers `vae/` folder or of
    its repo), that file opened, and the folder's config.json (None beside a single file).
    Raises CheckpointError when `path` does not exist or the file cannot be read."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if (path / "vae").is_dir():  # a Diffusers repo folder
        path = path / "vae"
    config = read_config(path / "config.json")
    if (path / "diffusion_pytorch_model.safetensors").is_file():  # not the .fp16 variant beside it
        path = path / "diffusion_pytorch_model.safetensors"
    return path, Checkpoint.open(path), config


def _open(path: Path) -> tuple[Checkpoint, dict | None]:
    """The autoencoder's tensors (prefix removed) and the Diffusers config.json when it is a folder."""
    path, ckpt, config = open_autoencoder_file(path)
    ckpt = autoencoder_part(ckpt)
    if ckpt is None:
        raise CheckpointError(
            f"{path}: holds no autoencoder weights (no encoder.*/decoder.* keys, bare or under "
            f"{', '.join(AUTOENCODER_PREFIXES)})"
        )
    quant = [k for k in ckpt if k.startswith(("quant_conv.", "post_quant_conv."))]
    if quant:
        raise CheckpointError(
            f"{path}: unsupported autoencoder: it has {quant[0]!r} (an SD1/SDXL-style VAE?); "
            "only the FLUX/SD3 layout without quant_conv/post_quant_conv is supported"
        )
    return ckpt, config


def autoencoder_part(ckpt: Checkpoint) -> Checkpoint | None:
    """The autoencoder's keys (prefix removed) of an open file, or None if it holds no `encoder.*`/`decoder.*` keys."""
    ckpt = ckpt.part(AUTOENCODER_PREFIXES) or ckpt
    return ckpt if any(k.startswith(("encoder.", "decoder.")) for k in ckpt) else None


def autoencoder_shapes(ckpt: Checkpoint, what: str) -> tuple[Shapes, KeyMap | None]:
    """{LDM key: shape} of an autoencoder's keys (Diffusers names mapped), and the key map (None: LDM keys)."""
    if any(k.startswith("encoder.down_blocks.") for k in ckpt):  # Diffusers names
        keymap = diffusers_to_ldm(ckpt.shapes(what).count_blocks(r"encoder\.down_blocks\.(\d+)\."))
        return Shapes({ours: ckpt.shape(srcs[0]) for ours, srcs in keymap.plan(ckpt).items()}, what), keymap
    return ckpt.shapes(what), None


def _check_config(config: dict, params: AutoEncoderParams, family: str, source: str) -> None:
    """A Diffusers config.json's latent factors must be the family's (the weights cannot tell FLUX from SD3)."""
    config = Config.of(config, f"{source}/config.json")
    for theirs, ours in (("scaling_factor", params.scale_factor), ("shift_factor", params.shift_factor)):
        value = config.get_float(theirs)
        if value is not None and not math.isclose(value, ours):
            raise CheckpointError(
                f"{config.source}: has {theirs}={value}, but family={family!r} uses "
                f"{ours}: pass the right family ('flux' or 'sd3')"
            )


def _as_conv(load):
    """Attention projections stored as linear [C, C] load into the 1x1 convs [C, C, 1, 1]."""
    def conv():
        t = load()
        return t[:, :, None, None] if t.dim() == 2 else t
    return conv


def load_autoencoder(path, family: str = "flux", device="cpu", dtype: torch.dtype | None = None) -> AutoEncoder:
    """Load the autoencoder from `ae.safetensors`, a Diffusers `vae/` folder (or its repo), or a single file
    holding `first_stage_model.*` / `vae.*`. family: "flux" or "sd3" (the latent scale and shift).
    dtype: defaults to the file's own."""
    path = Path(path)
    preset(family)  # an unknown family is the caller's error, before the file's
    ckpt, config = _open(path)
    source, what = str(path), f"{path}: the autoencoder"
    dtype = dtype or ckpt.load_dtype()
    shape, keymap = autoencoder_shapes(ckpt, what)
    tensors = ckpt.loaders(dtype, device) if keymap is None else keymap.tensors(ckpt, dtype, device)
    try:
        params = params_from_shapes(shape, family)
    except CheckpointError:
        raise
    except ValueError as e:  # the params' own checks
        raise CheckpointError(f"{source}: its shapes give an invalid autoencoder: {e}") from None
    if config is not None:
        _check_config(config, params, family, source)
    attn = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")
    tensors = {k: _as_conv(f) if attn.fullmatch(k) else f for k, f in tensors.items()}
    with torch.device("meta"):
        model = AutoEncoder(params)
    load_state_dict_strict(model, tensors, f"autoencoder ({family})", source)
    return model.eval().requires_grad_(False)
