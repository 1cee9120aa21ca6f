"""FLUX and SD3.5 pipelines against Diffusers' FluxPipeline and StableDiffusion3Pipeline, on tiny random repos.

Same weights (ours load the folder Diffusers saved), same prompts, same initial noise: the prompt
embeddings, the final latents and the decoded images agree within float32 tolerance. The official
single-file layouts (BFL file + ae.safetensors; SAI file with bundled encoders and VAE, or with a
`text_encoders/` folder beside it) are written from the same weights and must give the same images.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace

import pytest
import torch
from builders import randomize_, rel_err
from pipeline_builders import PROMPTS, T5_LEN, built, flux_noise, pack, random_lora, unpack

from convert.files import CheckpointError, save_safetensors_atomic
from mmdit.flux import Flux
from sampling import TacaSchedule, load_pipeline
from sampling.parts import Part, find_parts
from sampling.pipeline import DEFAULTS, FluxPipeline, SD3Pipeline, defaults_for, to_pil, variant_of
from sampling.schedules import given_sigmas

H, W = 64, 48
TOL = 1e-4


@pytest.fixture(scope="module")
def flux():
    ref, folder = built("flux")
    return ref, folder, load_pipeline(folder, max_sequence_length=T5_LEN)


@pytest.fixture(scope="module")
def sd3():
    ref, folder = built("sd3")
    return ref, folder, load_pipeline(folder, max_sequence_length=T5_LEN)


def flux_reference(ref, noise, steps, output_type, **kw):
    out = ref(PROMPTS, height=H, width=W, num_inference_steps=steps, latents=pack(noise),
              max_sequence_length=T5_LEN, output_type=output_type, **kw).images
    return unpack(out, H // 8, W // 8) if output_type == "latent" else out


def sd3_reference(ref, noise, steps, output_type, **kw):
    return ref(PROMPTS, height=H, width=W, num_inference_steps=steps, latents=noise,
               max_sequence_length=T5_LEN, output_type=output_type, **kw).images


# ---- FLUX ----


def test_flux_loads_as_flux(flux):
    _, _, pipe = flux
    assert isinstance(pipe, FluxPipeline) and pipe.variant == "flux-dev-like (custom size)"
    assert (pipe.defaults.steps, pipe.defaults.guidance) == (28, 3.5)


def test_flux_prompt_embeddings(flux):
    ref, _, pipe = flux
    context_ref, pooled_ref, _ = ref.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_LEN)
    context, pooled = pipe.encode_prompt(PROMPTS)
    assert context.shape == context_ref.shape == (2, T5_LEN, 64) and pooled.shape == pooled_ref.shape == (2, 32)
    assert rel_err(context, context_ref) < TOL and rel_err(pooled, pooled_ref) < TOL
    assert rel_err(context[0], context[1]) > 1e-2  # the prompts matter
    offloading = load_pipeline(flux[1], max_sequence_length=T5_LEN, offload_encoders=True)
    assert all(torch.equal(a, b) for a, b in zip(offloading.encode_prompt(PROMPTS), (context, pooled)))
    assert {p.device.type for e in offloading.encoders.values() for p in e.parameters()} == {"cpu"}
    # every part stays on the CPU and runs on the device (meta here: shapes only) block by block
    streaming = load_pipeline(flux[1], device="meta", max_sequence_length=T5_LEN, offload="stream")
    parts = [streaming.transformer, streaming.autoencoder, *streaming.encoders.values()]
    assert {p.device.type for m in parts for p in m.parameters()} == {"cpu"}
    images = streaming.generate(PROMPTS, height=32, width=48, steps=1, output="tensor")
    assert images.device.type == "meta" and images.shape == (2, 3, 32, 48)


def test_flux_images(flux):
    ref, _, pipe = flux
    noise = flux_noise(2, H, W)
    images = pipe.generate(PROMPTS, height=H, width=W, steps=2, guidance=3.5, noise=noise, output="tensor")
    assert images.shape == (2, 3, H, W)
    assert rel_err(images, flux_reference(ref, noise, 2, "pt", guidance_scale=3.5)) < TOL


def test_flux_guidance_and_true_cfg(flux):
    ref, _, pipe = flux
    noise = flux_noise(2, H, W, seed=1)
    ours = pipe.generate(PROMPTS, height=H, width=W, steps=2, guidance=5.0, noise=noise, output="latent",
                         negative_prompt="blurry", true_cfg=3.0)
    theirs = flux_reference(ref, noise, 2, "latent", guidance_scale=5.0, negative_prompt="blurry", true_cfg_scale=3.0)
    assert rel_err(ours, theirs) < TOL
    plain = pipe.generate(PROMPTS, height=H, width=W, steps=2, guidance=5.0, noise=noise, output="latent")
    assert rel_err(plain, ours) > 1e-3


def test_flux_seed_draws_diffusers_noise(flux):
    ref, _, pipe = flux
    ours = pipe.generate(PROMPTS, height=H, width=W, steps=2, guidance=3.5, seed=7, output="latent")
    again = pipe.generate(PROMPTS, height=H, width=W, steps=2, guidance=3.5, seed=7, output="latent")
    theirs = unpack(ref(PROMPTS, height=H, width=W, num_inference_steps=2, guidance_scale=3.5, output_type="latent",
                        max_sequence_length=T5_LEN, generator=torch.Generator().manual_seed(7)).images, H // 8, W // 8)
    assert torch.equal(ours, again) and rel_err(ours, theirs) < TOL


def test_pil_output_is_the_rounded_tensor(flux):
    _, _, pipe = flux
    noise = flux_noise(2, H, W, seed=2)
    images = pipe.generate(PROMPTS, height=H, width=W, steps=1, noise=noise)
    tensor = pipe.generate(PROMPTS, height=H, width=W, steps=1, noise=noise, output="tensor")
    assert [im.size for im in images] == [(W, H)] * 2
    assert all(torch.equal(torch.tensor(list(a.getdata())), torch.tensor(list(b.getdata())))
               for a, b in zip(images, to_pil(tensor)))
    expected = (tensor[0, :, 5, 7] * 255).round().to(torch.uint8).tolist()
    assert list(images[0].getpixel((7, 5))) == expected


def test_taca_changes_the_image_and_gamma_one_is_plain(flux):
    _, _, pipe = flux
    noise = flux_noise(2, H, W, seed=3)
    kw = dict(height=H, width=W, steps=2, guidance=3.5, noise=noise, output="latent")
    plain = pipe.generate(PROMPTS, **kw)
    assert torch.equal(pipe.generate(PROMPTS, temperature=1.0, **kw), plain)
    assert torch.equal(pipe.generate(PROMPTS, temperature=TacaSchedule(1.0), **kw), plain)
    taca = pipe.generate(PROMPTS, temperature=TacaSchedule(1.5, until=0.0), **kw)
    assert rel_err(taca, plain) > 1e-4


def test_flux_schnell_matches_diffusers():
    ref, folder = built("flux-schnell")
    pipe = load_pipeline(folder, max_sequence_length=T5_LEN)
    assert pipe.variant == "flux-schnell-like (custom size)" and pipe.defaults.steps == 4
    noise = flux_noise(2, H, W, seed=4)
    ours = pipe.generate(PROMPTS, height=H, width=W, steps=2, noise=noise, output="latent")
    assert rel_err(ours, flux_reference(ref, noise, 2, "latent", guidance_scale=0.0)) < TOL


def test_flux_single_file_with_ae_and_encoder_folders(flux, tmp_path):
    """BFL's repo layout: flux1-dev.safetensors and ae.safetensors at the top, encoders in Diffusers folders."""
    ref, folder, pipe = flux
    save_safetensors_atomic(pipe.transformer.state_dict(), tmp_path / "flux1-dev.safetensors")
    save_safetensors_atomic(pipe.autoencoder.state_dict(), tmp_path / "ae.safetensors")
    for d in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(folder / d, tmp_path / d)
    single = load_pipeline(tmp_path / "flux1-dev.safetensors", max_sequence_length=T5_LEN)
    noise = flux_noise(2, H, W, seed=5)
    ours = single.generate(PROMPTS, height=H, width=W, steps=2, noise=noise, output="tensor")
    assert rel_err(ours, flux_reference(ref, noise, 2, "pt", guidance_scale=3.5)) < TOL


def test_missing_part_is_named(flux, tmp_path):
    _, _, pipe = flux
    save_safetensors_atomic(pipe.transformer.state_dict(), tmp_path / "flux1-dev.safetensors")
    with pytest.raises(ValueError, match="did not find the autoencoder: pass vae=PATH"):
        load_pipeline(tmp_path / "flux1-dev.safetensors")
    with pytest.raises(TypeError, match="unknown part"):
        load_pipeline(tmp_path / "flux1-dev.safetensors", text_encoder="x")


# ---- SD3 ----


def test_sd3_prompt_embeddings(sd3):
    ref, _, pipe = sd3
    assert isinstance(pipe, SD3Pipeline) and pipe.variant == "sd3.5-medium-like (custom size)"
    context_ref, _, pooled_ref, _ = ref.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                      max_sequence_length=T5_LEN)
    context, pooled = pipe.encode_prompt(PROMPTS)
    assert context.shape == context_ref.shape == (2, 77 + T5_LEN, 128) and pooled.shape == (2, 80)
    assert rel_err(context, context_ref) < TOL and rel_err(pooled, pooled_ref) < TOL


def test_sd3_cfg_latents_and_images(sd3):
    ref, _, pipe = sd3
    noise = flux_noise(2, H, W, seed=6)
    kw = dict(height=H, width=W, steps=2, guidance=4.5, noise=noise)
    ours = pipe.generate(PROMPTS, negative_prompt="blurry", output="latent", **kw)
    assert rel_err(ours, sd3_reference(ref, noise, 2, "latent", guidance_scale=4.5, negative_prompt="blurry")) < TOL
    assert rel_err(ours, noise) > 0.1
    images = pipe.generate(PROMPTS, output="tensor", **kw)  # default negative prompt ""
    assert rel_err(images, sd3_reference(ref, noise, 2, "pt", guidance_scale=4.5)) < TOL
    no_cfg = pipe.generate(PROMPTS, height=H, width=W, steps=1, guidance=1.0, noise=noise, output="latent")
    assert rel_err(no_cfg, sd3_reference(ref, noise, 1, "latent", guidance_scale=1.0)) < TOL


def test_sd3_without_t5_uses_zeros():
    ref, folder = built("sd3-no-t5")
    pipe = load_pipeline(folder, max_sequence_length=T5_LEN)
    assert pipe.encoders["t5"] is None
    context, _ = pipe.encode_prompt(PROMPTS)
    context_ref, *_ = ref.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False, max_sequence_length=T5_LEN)
    assert rel_err(context, context_ref) < TOL and not context[:, 77:].any()
    noise = flux_noise(2, H, W, seed=8)
    ours = pipe.generate(PROMPTS, height=H, width=W, steps=2, guidance=3.0, noise=noise, output="latent")
    assert rel_err(ours, sd3_reference(ref, noise, 2, "latent", guidance_scale=3.0)) < TOL


def _sai_parts(pipe):
    """SAI key prefixes of the transformer, the VAE and the three encoders of a loaded pipeline."""
    return {
        "model.diffusion_model.": pipe.transformer, "first_stage_model.": pipe.autoencoder,
        "text_encoders.clip_l.transformer.": pipe.encoders["clip_l"],
        "text_encoders.clip_g.transformer.": pipe.encoders["clip_g"],
        "text_encoders.t5xxl.transformer.": pipe.encoders["t5"],
    }


def test_sai_parts_are_found_bundled_or_beside(sd3, tmp_path):
    _, folder, pipe = sd3
    file = tmp_path / "sd3.5_large.safetensors"
    save_safetensors_atomic({p + k: v for p, m in _sai_parts(pipe).items() for k, v in m.state_dict().items()}, file)
    parts = find_parts(file, "sd3", {"clip_l_tokenizer": folder / "tokenizer"})
    assert parts["vae"] == Part(file, "first_stage_model.")
    assert [parts[r] for r in ("clip_l", "clip_g", "t5")] == [
        Part(file, f"text_encoders.{n}.transformer.") for n in ("clip_l", "clip_g", "t5xxl")]
    assert parts["clip_l_tokenizer"] == Part(folder / "tokenizer")
    assert parts["clip_g_tokenizer"] == Part(folder / "tokenizer", pad="!")
    assert parts["t5_tokenizer"] is None
    alone = tmp_path / "alone"
    save_safetensors_atomic(pipe.transformer.state_dict(), alone / "sd3.5_large.safetensors")
    for name in ("clip_l", "clip_g", "t5xxl_fp16"):
        save_safetensors_atomic({"x": torch.zeros(1)}, alone / "text_encoders" / f"{name}.safetensors")
    parts = find_parts(alone / "sd3.5_large.safetensors", "sd3", {"vae": folder / "vae"})
    assert parts["vae"] == Part(folder / "vae")
    assert parts["clip_g"] == Part(alone / "text_encoders" / "clip_g.safetensors")
    assert parts["t5"] == Part(alone / "text_encoders" / "t5xxl_fp16.safetensors")


@pytest.mark.parametrize("bundled", [True, False])
def test_sd3_sai_single_file(sd3, tmp_path, bundled):
    """An SAI file with its VAE and T5 bundled, or with `text_encoders/t5xxl_fp16.safetensors` beside it; the
    CLIPs by keyword (the tiny CLIP widths need their config.json); one CLIP tokenizer folder for both
    (SAI's code uses one BPE; bigG pads with "!")."""
    ref, folder, pipe = sd3
    parts = {p: m for p, m in _sai_parts(pipe).items() if not p.startswith("text_encoders.clip")}
    if not bundled:
        save_safetensors_atomic(parts.pop("text_encoders.t5xxl.transformer.").state_dict(),
                                tmp_path / "text_encoders" / "t5xxl_fp16.safetensors")
    tensors = {p + k: v for p, m in parts.items() for k, v in m.state_dict().items()}
    save_safetensors_atomic(tensors, tmp_path / "sd3.5_medium.safetensors")
    shutil.copytree(folder / "tokenizer", tmp_path / "tokenizer")
    shutil.copytree(folder / "tokenizer_3", tmp_path / "tokenizer_3")
    single = load_pipeline(tmp_path / "sd3.5_medium.safetensors", max_sequence_length=T5_LEN,
                           clip_l=folder / "text_encoder", clip_g=folder / "text_encoder_2")
    noise = flux_noise(2, H, W, seed=9)
    ours = single.generate(PROMPTS, height=H, width=W, steps=2, guidance=4.5, noise=noise, output="tensor")
    assert rel_err(ours, sd3_reference(ref, noise, 2, "pt", guidance_scale=4.5)) < TOL


def test_turbo_comes_from_the_name(sd3):
    class Large(torch.nn.Module):
        variant = "sd3.5-large"

    assert variant_of(Large(), "stabilityai/stable-diffusion-3.5-large-turbo") == "sd3.5-large-turbo"
    assert variant_of(Large(), "stabilityai/stable-diffusion-3.5-large") == "sd3.5-large"
    assert defaults_for("sd3.5-large-turbo") == DEFAULTS["sd3.5-large-turbo"] and DEFAULTS["sd3.5-large-turbo"].guidance == 0
    assert (defaults_for("sd3.5-medium-like (custom size)").steps, DEFAULTS["sd3.5-medium"].guidance) == (40, 4.5)


def test_bad_arguments(flux):
    _, _, pipe = flux
    with pytest.raises(ValueError, match="multiples of 16"):
        pipe.generate(PROMPTS, height=40, width=48)
    with pytest.raises(ValueError, match=r"noise must have shape \[2, 16, 8, 6\]"):
        pipe.generate(PROMPTS, height=H, width=W, noise=torch.zeros(1, 16, 8, 6))
    with pytest.raises(ValueError, match="output must be"):
        pipe.generate(PROMPTS, height=H, width=W, output="png")


def test_taca_lora_is_gated_in_generate(flux):
    """With a LoRA injected (B random), gated generation where TACA never fires equals the base model's."""
    ref, folder, base = flux
    pipe = load_pipeline(folder, max_sequence_length=T5_LEN)
    random_lora(pipe.transformer, std=0.1)
    noise = flux_noise(2, H, W, seed=10)
    kw = dict(height=H, width=W, steps=2, guidance=3.5, noise=noise, output="latent")
    plain = base.generate(PROMPTS, **kw)
    never = TacaSchedule(1.2, until=1.1)  # t never reaches it: gamma 1 and the LoRA off at every step
    assert torch.equal(pipe.generate(PROMPTS, temperature=never, **kw), plain)
    with_lora = pipe.generate(PROMPTS, temperature=never, gate_lora=False, **kw)
    assert rel_err(with_lora, plain) > 1e-4
    assert torch.equal(pipe.generate(PROMPTS, **kw), with_lora)  # no TACA: a LoRA is simply on


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_sampling_reads_nothing_back_from_the_device(kind):
    """Every per-step decision (TACA's schedule, the LoRA gate, SLG's window) uses host numbers, so a GPU
    never waits between steps. On the meta device reading a value back is an error, so a whole run there
    with all of them on shows it."""
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        float(torch.zeros((), device="meta"))
    pipe = load_pipeline(built(kind)[1], device="meta", max_sequence_length=T5_LEN)
    random_lora(pipe.transformer, std=0.1)
    slg = {"skip_guidance_layers": [0], "skip_layer_guidance_start": 0, "skip_layer_guidance_stop": 1} if kind == "sd3" else {}
    latents = pipe.generate(PROMPTS, height=H, width=W, steps=3, seed=0, temperature=TacaSchedule(1.2, 0.5),
                            output="latent", **slg)
    assert latents.device.type == "meta" and latents.shape == (2, 16, H // 8, W // 8)


# ---- your own noise levels: sigmas= as Diffusers' (shifted), noise_levels= as given ----

LEVELS = [1.0, 0.75, 0.5, 0.25]


def test_flux_sigmas_are_shifted_as_diffusers(flux):
    """`generate(sigmas=)` = Diffusers' `pipe(sigmas=)`: the levels shifted by exp(mu) of the image size."""
    ref, _, pipe = flux
    noise = flux_noise(2, H, W, seed=11)
    ours = pipe.generate(PROMPTS, height=H, width=W, guidance=3.5, noise=noise, output="latent", sigmas=LEVELS)
    theirs = flux_reference(ref, noise, None, "latent", guidance_scale=3.5, sigmas=LEVELS)
    assert ref.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.826, 0.613, 0.345, 0.0], abs=1e-3)  # 12 image tokens
    assert rel_err(ours, theirs) < TOL
    shifted = given_sigmas(LEVELS, pipe.shift(H // 8, W // 8, len(LEVELS)))  # (5,)
    assert rel_err(shifted, ref.scheduler.sigmas) < 1e-6
    as_given = pipe.generate(PROMPTS, height=H, width=W, guidance=3.5, noise=noise, output="latent",
                             noise_levels=shifted[:-1])
    assert torch.equal(as_given, ours)  # noise_levels: the levels as they are
    unshifted = pipe.generate(PROMPTS, height=H, width=W, guidance=3.5, noise=noise, output="latent",
                              noise_levels=LEVELS)
    assert rel_err(unshifted, ours) > 1e-3
    with pytest.raises(ValueError, match="not both"):
        pipe.generate(PROMPTS, height=H, width=W, sigmas=LEVELS, noise_levels=LEVELS)


def test_sd3_sigmas_are_shifted_as_diffusers(sd3):
    ref, _, pipe = sd3
    noise = flux_noise(2, H, W, seed=12)
    ours = pipe.generate(PROMPTS, height=H, width=W, guidance=4.5, noise=noise, output="latent", sigmas=LEVELS)
    theirs = sd3_reference(ref, noise, None, "latent", guidance_scale=4.5, sigmas=LEVELS)
    assert ref.scheduler.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0], abs=1e-6)
    assert rel_err(ours, theirs) < TOL
    as_given = pipe.generate(PROMPTS, height=H, width=W, guidance=4.5, noise=noise, output="latent",
                             noise_levels=[1.0, 0.9, 0.75, 0.5])
    assert rel_err(as_given, ours) < 1e-6


def test_schnell_sigmas_are_not_shifted():
    ref, folder = built("flux-schnell")
    pipe = load_pipeline(folder, max_sequence_length=T5_LEN)
    noise = flux_noise(2, H, W, seed=13)
    ours = pipe.generate(PROMPTS, height=H, width=W, noise=noise, output="latent", sigmas=LEVELS)
    assert rel_err(ours, flux_reference(ref, noise, None, "latent", guidance_scale=0.0, sigmas=LEVELS)) < TOL
    assert torch.equal(ours, pipe.generate(PROMPTS, height=H, width=W, noise=noise, output="latent", noise_levels=LEVELS))


# ---- checkpoints this pipeline cannot run: refused before anything is loaded ----


@pytest.mark.parametrize("in_channels,variant,needs", [
    (384, "flux-fill", "inpainting mask and the masked image"),
    (128, "flux-depth/canny", "control image's latents"),
    (192, "flux-dev-like", "inputs beside the noisy latents"),
])
def test_variants_with_extra_inputs_are_refused_before_loading(flux, tmp_path, monkeypatch, in_channels, variant, needs):
    """A FLUX Fill / Depth / Canny file, with everything else it needs beside it: refused naming the variant
    and its extra inputs, before the transformer, the encoders or the autoencoder are loaded."""
    _, folder, pipe = flux
    params = replace(pipe.transformer.params, in_channels=in_channels)
    file = tmp_path / "flux1-variant-dev.safetensors"
    save_safetensors_atomic({k: v for k, v in randomize_(Flux(params)).state_dict().items()}, file)
    save_safetensors_atomic(pipe.autoencoder.state_dict(), tmp_path / "ae.safetensors")
    for d in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        shutil.copytree(folder / d, tmp_path / d)
    loaded = []
    for name in ("load_transformer", "load_text_encoder", "load_autoencoder", "load_tokenizer"):
        monkeypatch.setattr(f"sampling.loading.{name}", lambda *a, name=name, **k: loaded.append(name))
    with pytest.raises(CheckpointError, match=rf"{file}: a {re.escape(variant)}.*{in_channels} input channels.*{needs}"):
        load_pipeline(file)
    assert loaded == []
