"""The autoencoder against Diffusers' `AutoencoderKL` (test-only oracle) on a tiny random config.

Same weights, saved in the LDM layout (BFL `ae.safetensors` style, converted here by the test's own rules and
checked against Diffusers' own LDM converter, `loaders/single_file_utils.py` `convert_ldm_vae_checkpoint`), as `first_stage_model.*` in a single file, and as a
Diffusers folder (`save_pretrained`); encode (posterior mean, scaled) and decode match within 1e-4.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from builders import randomize_, rel_err

from convert import CheckpointError, load_autoencoder, save_safetensors_atomic
from mmdit.autoencoder import AE_PRESETS, AutoEncoder, AutoEncoderParams, tiled

# three levels with three different widths, so a wrong level order cannot load
BLOCK_OUT = (32, 64, 96)
TINY = dict(ch=32, ch_mult=(1, 2, 3), num_res_blocks=2, z_channels=16)


def diffusers_vae(family: str, seed: int = 0):
    from diffusers import AutoencoderKL

    p = AE_PRESETS[family]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=BLOCK_OUT, layers_per_block=2,
        latent_channels=16, norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=p.scale_factor, shift_factor=p.shift_factor,
    )
    return randomize_(vae, seed).eval()


def ldm_from_diffusers(sd: dict[str, torch.Tensor], n_levels: int) -> dict[str, torch.Tensor]:
    """Diffusers -> LDM (`ae.safetensors`): the test's own conversion (docs/formats.md, "Autoencoder")."""
    def up(m):  # the decoder's levels are numbered the other way round
        return n_levels - 1 - int(m[1])

    out = {}
    for k, v in sd.items():
        k = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
        k = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{up(m)}.block.", k)
        k = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up(m)}.upsample.", k)
        k = k.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.", "mid.block_2.")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            k = re.sub(r"to_(q|k|v)\.", r"\1.", k).replace("to_out.0.", "proj_out.")
            if v.dim() == 2:
                v = v[:, :, None, None]  # linear -> 1x1 conv
        out[k] = v
    return out


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, 32, 48, generator=g) * 2 - 1  # in [-1, 1]


def test_test_conversion_is_diffusers_inverse():
    """Our LDM layout, converted back by Diffusers' single-file converter, is the Diffusers state dict again."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    ref = diffusers_vae("flux")
    sd = ref.state_dict()
    ldm = ldm_from_diffusers(sd, 3)
    ours = AutoEncoder(AutoEncoderParams(**TINY))
    assert set(ldm) == set(ours.state_dict())  # our attribute names are the LDM keys
    back = convert_ldm_vae_checkpoint(ldm, {"down_block_types": [0] * 3, "up_block_types": [0] * 3})
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def _save(layout: str, ref, tmp_path):
    """The reference's weights in one of the layouts the loader reads; returns the path to pass."""
    ldm = ldm_from_diffusers(ref.state_dict(), 3)
    if layout == "ldm":  # BFL ae.safetensors
        save_safetensors_atomic(ldm, tmp_path / "ae.safetensors")
        return tmp_path / "ae.safetensors"
    if layout == "single":  # SAI single file: the VAE beside other parts
        extra = {"model.diffusion_model.x_embedder.proj.weight": torch.randn(4, 16, 2, 2)}
        vae = {f"first_stage_model.{k}": v for k, v in ldm.items()}
        save_safetensors_atomic({**extra, **vae}, tmp_path / "sd3.safetensors")
        return tmp_path / "sd3.safetensors"
    ref.save_pretrained(tmp_path / "repo" / "vae")  # Diffusers: config.json + diffusion_pytorch_model.safetensors
    return tmp_path / "repo" if layout == "diffusers-repo" else tmp_path / "repo" / "vae"


@pytest.mark.parametrize(
    "layout,family", [("ldm", "flux"), ("single", "sd3"), ("diffusers", "flux"), ("diffusers-repo", "sd3")]
)
def test_matches_diffusers(layout, family, images, tmp_path):
    ref = diffusers_vae(family, seed=2)
    ae = load_autoencoder(_save(layout, ref, tmp_path), family=family)
    p = AE_PRESETS[family]
    assert ae.params == AutoEncoderParams(**TINY, scale_factor=p.scale_factor, shift_factor=p.shift_factor)
    assert ae.dtype == torch.float32 and ae.device.type == "cpu"
    with torch.no_grad():
        z = ae.encode(images)
        z_ref = p.scale_factor * (ref.encode(images).latent_dist.mean - p.shift_factor)
        assert z.shape == (2, 16, 8, 12)
        assert rel_err(z, z_ref) <= 1e-4
        x = ae.decode(z_ref)
        x_ref = ref.decode(z_ref / p.scale_factor + p.shift_factor).sample
        assert x.shape == images.shape
        assert rel_err(x, x_ref) <= 1e-4


def test_dtype_and_attention_shape(tmp_path):
    """bf16 on request; LDM files with linear-shaped attention weights load too (same math)."""
    ldm = ldm_from_diffusers(diffusers_vae("flux").state_dict(), 3)
    ldm = {k: v[:, :, 0, 0] if ".attn_1." in k and v.dim() == 4 else v for k, v in ldm.items()}
    save_safetensors_atomic(ldm, tmp_path / "ae.safetensors")
    ae = load_autoencoder(tmp_path / "ae.safetensors", dtype=torch.bfloat16)
    assert ae.dtype == torch.bfloat16
    w = ae.encoder.mid.attn_1.q.weight
    assert w.shape == (96, 96, 1, 1) and torch.equal(w[:, :, 0, 0], ldm["encoder.mid.attn_1.q.weight"].bfloat16())
    z = torch.randn(1, 16, 6, 6)
    assert ae.decode(z, tile=4, overlap=1).dtype == ae.decode(z).dtype == torch.bfloat16


def test_decode_slices_and_tiles(images):
    torch.manual_seed(0)
    ae = randomize_(AutoEncoder(AutoEncoderParams(**TINY)), seed=3)
    z = torch.randn(2, 16, 12, 16)
    with torch.no_grad():
        full = ae.decode(z)
        assert rel_err(ae.decode(z, batch=1), full) <= 1e-5  # slicing over the batch is exact
        assert torch.equal(ae.decode(z, tile=16), full)  # one tile covering all is the plain decode
        # a tile sees only itself (GroupNorm statistics, attention): close to, not equal to, the plain decode;
        # with these random weights 2x2 tiles of 8 overlapping by 3 differ by 0.2 of the output's range
        err = rel_err(ae.decode(z, tile=8, overlap=3), full)
        assert 0 < err < 0.3, err


def test_tiling_blends_exactly():
    """For a map acting on each latent pixel alone, tiled application equals the whole one: the blend
    weights sum to one and every tile lands where it belongs (uneven sizes, last tiles flush with the edge)."""
    def pointwise(t):
        return F.interpolate(t[:, :3].tanh() * 2 + t[:, 3:6], scale_factor=4, mode="nearest")

    z = torch.randn(2, 16, 23, 37)
    for tile, overlap in [(8, 2), (10, 5), (16, 0), (7, 6)]:
        assert rel_err(tiled(pointwise, z, tile, overlap, 4, 3), pointwise(z)) <= 1e-6
    with pytest.raises(ValueError, match="overlap"):
        tiled(pointwise, z, 8, 8, 4, 3)


def test_errors_name_the_problem(tmp_path):
    ldm = ldm_from_diffusers(diffusers_vae("flux").state_dict(), 3)
    bad = dict(ldm)
    del bad["decoder.up.1.block.2.conv2.bias"]
    save_safetensors_atomic(bad, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing 1 key.*decoder\.up\.1\.block\.2\.conv2\.bias"):
        load_autoencoder(tmp_path / "missing.safetensors")

    bad = {**ldm, "decoder.up.0.block.0.conv1.weight": torch.zeros(32, 64, 1, 1)}
    save_safetensors_atomic(bad, tmp_path / "shape.safetensors")
    shape_error = r"decoder\.up\.0\.block\.0\.conv1\.weight.*\[32, 64, 1, 1\].*\[32, 64, 3, 3\]"
    with pytest.raises(CheckpointError, match=shape_error):
        load_autoencoder(tmp_path / "shape.safetensors")

    save_safetensors_atomic({**ldm, "quant_conv.weight": torch.zeros(32, 32, 1, 1)}, tmp_path / "sdxl.safetensors")
    with pytest.raises(CheckpointError, match="quant_conv"):
        load_autoencoder(tmp_path / "sdxl.safetensors")

    save_safetensors_atomic({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, tmp_path / "flux.safetensors")
    with pytest.raises(CheckpointError, match="no autoencoder weights"):
        load_autoencoder(tmp_path / "flux.safetensors")

    diffusers_vae("sd3").save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match=r"scaling_factor=1\.5305.*family='flux'"):
        load_autoencoder(tmp_path / "vae", family="flux")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert config["latent_channels"] == 16
