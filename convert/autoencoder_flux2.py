"""Loading the FLUX.2 autoencoder: BFL's `ae.safetensors` (the FLUX.2 repos) and Diffusers `vae/` folders.

BFL's keys are ours (BFL flux2 `src/flux2/autoencoder.py`): the LDM encoder/decoder of FLUX.1 with
`encoder.quant_conv` and `decoder.post_quant_conv` inside them, and `bn.running_mean`, `bn.running_var`,
`bn.num_batches_tracked` (a BatchNorm2d's buffers; the count is training bookkeeping, read by nothing,
and dropped). Diffusers' `AutoencoderKLFlux2` renames the LDM part as for FLUX.1 (convert/autoencoder.py:
`down_blocks`, `resnets`, `mid_block.attentions.0.to_q` stored as linear [C, C], ...), keeps the quant convs
at the top (`quant_conv`, `post_quant_conv`) and `bn.*` as is. Diffusers has no single-file converter
for this autoencoder, so BFL's names come from BFL's code. The config is read from the shapes; a
Diffusers config.json, when there, gives `batch_norm_eps` and must agree on the patch size.
A file is a FLUX.2 autoencoder when it has `bn.running_mean` and a quant conv (`is_flux2_autoencoder`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch

from mmdit.autoencoder_flux2 import AutoEncoderFlux2, AutoEncoderFlux2Params

from .autoencoder import _as_conv, diffusers_to_ldm, open_autoencoder_file
from .files import AUTOENCODER_PREFIXES, Checkpoint, CheckpointError, Shapes, load_state_dict_strict
from .mapping import KeyMap

IGNORED = ("bn.num_batches_tracked",)
_ATTN = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def is_flux2_autoencoder(keys: Iterable[str]) -> bool:
    """Batch-norm statistics and a quant conv, bare (BFL and Diffusers layouts): FLUX.2's autoencoder."""
    keys = set(keys)
    return "bn.running_mean" in keys and bool({"encoder.quant_conv.weight", "quant_conv.weight"} & keys)


def diffusers_to_bfl(n_levels: int) -> KeyMap:
    """Diffusers `AutoencoderKLFlux2` keys -> BFL's, for a model with `n_levels` resolution levels."""
    return KeyMap(diffusers_to_ldm(n_levels).renames + [
        (r"quant_conv\.(weight|bias)", r"encoder.quant_conv.\1"),
        (r"post_quant_conv\.(weight|bias)", r"decoder.post_quant_conv.\1"),
        (r"bn\.(running_mean|running_var|num_batches_tracked)", r"bn.\1"),
    ])


def params_from_shapes(shape: Shapes, bn_eps: float = 1e-4) -> AutoEncoderFlux2Params:
    """The config implied by the shapes of BFL's keys."""
    ch, in_channels = shape["encoder.conv_in.weight"][:2]
    n_levels = shape.count_blocks(r"encoder\.down\.(\d+)\.")
    z = shape["decoder.conv_in.weight"][1]
    stats = shape["bn.running_mean"][0]
    patch = round((stats / z) ** 0.5)
    if patch * patch * z != stats:
        raise CheckpointError(f"bn.running_mean has {stats} channels: not {z} latent channels x patch^2")
    return AutoEncoderFlux2Params(
        ch=ch, in_channels=in_channels, z_channels=z, out_ch=shape["decoder.conv_out.weight"][0], patch=patch,
        ch_mult=tuple(shape[f"encoder.down.{i}.block.0.conv1.weight"][0] // ch for i in range(n_levels)),
        num_res_blocks=shape.count_blocks(r"encoder\.down\.0\.block\.(\d+)\."), bn_eps=bn_eps,
    )


def _open(path: Path) -> tuple[Checkpoint, dict | None, str]:
    """The autoencoder's tensors (prefix removed), the Diffusers config.json when it is a folder, the source."""
    path, ckpt, config = open_autoencoder_file(path)
    ckpt = ckpt.part(AUTOENCODER_PREFIXES) or ckpt
    if not is_flux2_autoencoder(ckpt):
        raise CheckpointError(
            f"{path}: not a FLUX.2 autoencoder (no bn.running_mean and quant_conv, bare or under "
            f"{', '.join(AUTOENCODER_PREFIXES)}); a FLUX.1 / SD3 one loads with convert.load_autoencoder"
        )
    return ckpt, config, str(path)


def load_autoencoder_flux2(path, device="cpu", dtype: torch.dtype | None = None) -> AutoEncoderFlux2:
    """The FLUX.2 autoencoder from BFL's `ae.safetensors`, a Diffusers `vae/` folder (or its repo), or a file
    holding it under `vae.` / `first_stage_model.`. dtype: defaults to the file's own."""
    ckpt, config, source = _open(Path(path))
    what = f"{source}: the FLUX.2 autoencoder"
    dtype = dtype or ckpt.load_dtype()
    if any(k.startswith("encoder.down_blocks.") for k in ckpt):  # Diffusers names
        keymap = diffusers_to_bfl(ckpt.shapes(what).count_blocks(r"encoder\.down_blocks\.(\d+)\."))
        shape = Shapes({ours: ckpt.shape(srcs[0]) for ours, srcs in keymap.plan(ckpt).items()}, what)
        tensors = keymap.tensors(ckpt, dtype, device)
    else:
        shape, tensors = ckpt.shapes(what), ckpt.loaders(dtype, device)
    tensors = {k: _as_conv(f) if _ATTN.fullmatch(k) else f for k, f in tensors.items() if k not in IGNORED}
    params = params_from_shapes(shape, bn_eps=(config or {}).get("batch_norm_eps", 1e-4))
    if config is not None and tuple(config.get("patch_size", (params.patch,) * 2)) != (params.patch,) * 2:
        raise CheckpointError(
            f"{source}: config.json patch_size {config['patch_size']} does not match the statistics' "
            f"{params.latent_channels} channels for {params.z_channels} latent channels"
        )
    with torch.device("meta"):
        model = AutoEncoderFlux2(params)
    load_state_dict_strict(model, tensors, "FLUX.2 autoencoder", source)
    return model.eval().requires_grad_(False)
