"""The FLUX.2 autoencoder against Diffusers' `AutoencoderKLFlux2` (test-only oracle) on a tiny random config.

The same weights load from a Diffusers `vae/` folder (`save_pretrained`) and from a file in BFL's
`ae.safetensors` layout (our own state dict, whose LDM part Diffusers' FLUX.1 converter maps back onto
the Diffusers model); encode (the posterior mode), decode, patchify and the batch-norm normalization
match Diffusers' FLUX.2 pipelines within 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import randomize_, rel_err

from convert import CheckpointError, save_safetensors_atomic
from convert.autoencoder_flux2 import is_flux2_autoencoder, load_autoencoder_flux2
from mmdit.autoencoder_flux2 import AE_FLUX2_PRESETS, AutoEncoderFlux2, patchify, unpatchify

TINY = AE_FLUX2_PRESETS["flux2"].tiny()  # levels of 32, 64, 96 channels, 32 latent channels


def diffusers_vae(seed: int = 0):
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 96), layers_per_block=2, latent_channels=32,
    )
    randomize_(vae, seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    vae.bn.running_mean.copy_(torch.randn(128, generator=g))
    vae.bn.running_var.copy_(torch.rand(128, generator=g) * 3 + 0.1)
    return vae


@pytest.fixture(scope="module")
def ref():
    return diffusers_vae(seed=2)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 48, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1  # in [-1, 1]


@pytest.fixture(scope="module")
def bfl_file(ref, tmp_path_factory):
    """BFL's layout: our state dict (loaded from the Diffusers folder), plus the BatchNorm's step count."""
    d = tmp_path_factory.mktemp("bfl")
    ref.save_pretrained(d / "vae")
    sd = load_autoencoder_flux2(d / "vae").state_dict() | {"bn.num_batches_tracked": torch.tensor(12345)}
    save_safetensors_atomic(sd, d / "ae.safetensors")
    return d / "ae.safetensors"


def test_bfl_names_are_diffusers_inverse(bfl_file, ref):
    """Our (BFL) names: the FLUX.2 extras where BFL's autoencoder.py has them; the LDM part back through
    Diffusers' own FLUX.1 converter is the Diffusers state dict again."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    sd = load_file(bfl_file)
    assert set(sd) == set(AutoEncoderFlux2(TINY).state_dict()) | {"bn.num_batches_tracked"}
    extras = {"encoder.quant_conv.weight", "decoder.post_quant_conv.weight", "bn.running_mean", "bn.running_var"}
    assert extras <= set(sd)
    ldm = {k.replace("encoder.quant_conv", "quant_conv").replace("decoder.post_quant_conv", "post_quant_conv"): v
           for k, v in sd.items() if not k.startswith("bn.")}
    back = convert_ldm_vae_checkpoint(ldm, {"down_block_types": [0] * 3, "up_block_types": [0] * 3})
    theirs = {k: v for k, v in ref.state_dict().items() if not k.startswith("bn.")}
    assert set(back) == set(theirs)
    assert all(torch.equal(back[k].reshape(theirs[k].shape), theirs[k]) for k in theirs)


@pytest.mark.parametrize("layout", ["bfl", "diffusers", "diffusers-repo", "prefixed"])
def test_matches_diffusers(layout, ref, images, bfl_file, tmp_path):
    if layout == "bfl":
        path = bfl_file
    elif layout == "prefixed":  # inside an all-in-one file
        from safetensors.torch import load_file

        save_safetensors_atomic({"vae." + k: v for k, v in load_file(bfl_file).items()}, tmp_path / "all.safetensors")
        path = tmp_path / "all.safetensors"
    else:
        ref.save_pretrained(tmp_path / "repo" / "vae")
        path = tmp_path / "repo" if layout == "diffusers-repo" else tmp_path / "repo" / "vae"
    ae = load_autoencoder_flux2(path)
    assert ae.params == TINY and ae.dtype == torch.float32
    with torch.no_grad():
        z = ae.encode(images)
        z_ref = ref.encode(images).latent_dist.mode()
        assert z.shape == (2, 32, 12, 8) and rel_err(z, z_ref) <= 1e-4
        x = ae.decode(z_ref)
        assert x.shape == images.shape and rel_err(x, ref.decode(z_ref).sample) <= 1e-4


def test_normalization_matches_the_pipelines(ref, images, bfl_file):
    """Reference images: `_encode_vae_image` (mode, patchify, normalize); the end of a run: de-normalize, unpatchify."""
    from diffusers import Flux2KleinPipeline

    ae = load_autoencoder_flux2(bfl_file)
    pipe = Flux2KleinPipeline(scheduler=None, vae=ref, text_encoder=None, tokenizer=None, transformer=None)
    with torch.no_grad():
        x = ae.normalize(patchify(ae.encode(images)))
        x_ref = pipe._encode_vae_image(images, generator=None)
    assert x.shape == (2, 128, 6, 4) and rel_err(x, x_ref) <= 1e-4

    latents = torch.randn(2, 128, 6, 4, generator=torch.Generator().manual_seed(4))
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)  # Flux2Pipeline.__call__
    expected = pipe._unpatchify_latents(latents * std + ref.bn.running_mean.view(1, -1, 1, 1))
    assert rel_err(unpatchify(ae.denormalize(latents)), expected) <= 1e-6
    assert torch.equal(patchify(expected), pipe._patchify_latents(expected))
    assert rel_err(ae.normalize(ae.denormalize(latents)), latents) <= 1e-6
    with pytest.raises(ValueError, match="expected patchified latents with 128 channels, got 32"):
        ae.normalize(expected)


def test_tiled_and_batched_decode(bfl_file):
    ae = load_autoencoder_flux2(bfl_file)
    z = torch.randn(3, 32, 12, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        whole = ae.decode(z)
        assert rel_err(ae.decode(z, batch=2), whole) <= 1e-5  # exact up to float order
        tiled = ae.decode(z, tile=8, overlap=2)
        assert tiled.shape == whole.shape
        assert 0 < rel_err(tiled, whole) < 0.5  # approximate: each tile normalizes and attends alone
        assert rel_err(ae.decode(z, tile=16), whole) <= 1e-5  # one tile covering everything: exact


def test_dtype_and_errors(bfl_file, ref, tmp_path):
    from safetensors.torch import load_file

    assert load_autoencoder_flux2(bfl_file, dtype=torch.bfloat16).dtype == torch.bfloat16
    sd = load_file(bfl_file)
    assert is_flux2_autoencoder(sd)
    assert not is_flux2_autoencoder({k: v for k, v in sd.items() if k != "bn.running_mean"})

    def attempt(tensors, match):
        f = tmp_path / f"{len(list(tmp_path.iterdir()))}.safetensors"
        save_safetensors_atomic(tensors, f)
        with pytest.raises(CheckpointError, match=match):
            load_autoencoder_flux2(f)

    attempt({k: v for k, v in sd.items() if k != "decoder.post_quant_conv.bias"},
            r"missing 1 key.*decoder\.post_quant_conv\.bias")
    attempt(sd | {"bn.running_var": torch.ones(96)}, r"bn\.running_var.*\[96\].*\[128\]")
    attempt({k: v for k, v in sd.items() if not k.startswith("bn.")}, "not a FLUX.2 autoencoder")
    ref.save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config | {"patch_size": [1, 1]}))
    with pytest.raises(CheckpointError, match="patch_size"):
        load_autoencoder_flux2(tmp_path / "vae")
    with pytest.raises(ValueError, match="multiples of 2"):
        patchify(torch.zeros(1, 32, 5, 4))
