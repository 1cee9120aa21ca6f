"""Whole FLUX.2 pipelines against Diffusers' `Flux2KleinPipeline` and `Flux2Pipeline` on tiny random repos
(tests/flux2_builders.py), from the same noise: prompt embeddings, final latents and decoded images, with and
without CFG, with one and two reference images, TACA, the schedule, user sigmas; loading from a Diffusers
folder, BFL single files (bare, `model.diffusion_model.`, fp8, ComfyUI scaled fp8) with their companions, and
hub ids; `mmdit sample`. float32, rel. error <= 1e-4.

Diffusers takes our noise as `latents=_patchify_latents(noise)` (the Contract of issue 18).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import diffusers.models.transformers.transformer_flux2 as diffusers_flux2
import numpy as np
import pytest
import torch
from builders import rel_err
from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as P
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from einops import rearrange
from flux2_builders import PROMPTS, SCHEDULER, dev_pipeline, klein_pipeline, noise, random_image
from PIL import Image
from safetensors.torch import load_file, save_file
from test_hub import Hub, repo_files

from convert import CheckpointError, detect_transformer, load_transformer
from convert.__main__ import main as convert_main
from convert.autoencoder_flux2 import load_autoencoder_flux2
from mmdit.attention import attention_reference
from mmdit.autoencoder_flux2 import unpatchify
from mmdit.probe import probe_attention
from sampling import load_pipeline
from sampling.cli import main as cli_main
from sampling.flux2 import DEFAULTS, empirical_mu, flux2_sigmas, image_to_tensor, is_distilled, reference_image
from sampling.pipeline import FluxPipeline
from sampling.sampler import Guidance
from sampling.schedules import given_sigmas

TOL = 1e-4
N_TXT = 512


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """(Diffusers base pipeline, its folder, the transformer's BFL state dict)."""
    pipe, folder, bfl = klein_pipeline(tmp_path_factory.mktemp("repos"))
    pipe.set_progress_bar_config(disable=True)
    return pipe, folder, bfl


@pytest.fixture(scope="module")
def single(klein, tmp_path_factory):
    """BFL's layout: `flux-2-klein-4b.safetensors` (the distilled model's name) with `ae.safetensors`,
    `text_encoder/` and `tokenizer/` beside it."""
    _, folder, bfl = klein
    d = tmp_path_factory.mktemp("bfl")
    save_file(bfl, d / "flux-2-klein-4b.safetensors")
    save_file(load_autoencoder_flux2(folder).state_dict(), d / "ae.safetensors")
    for sub in ("text_encoder", "tokenizer"):
        shutil.copytree(folder / sub, d / sub)
    return d


def distilled(pipe: Flux2KleinPipeline) -> Flux2KleinPipeline:
    ref = Flux2KleinPipeline(**pipe.components, is_distilled=True)
    ref.set_progress_bar_config(disable=True)
    return ref


def explicit_taca_in_diffusers(monkeypatch, gamma: float):
    """Every attention of Diffusers' FLUX.2 by explicit logits, image queries x text keys times gamma."""

    def explicit(query, key, value, attn_mask=None, **_):  # (B, L, H, D), text first
        q, k, v = (a.transpose(1, 2) for a in (query, key, value))
        return attention_reference(q, k, v, N_TXT, gamma).unflatten(-1, (q.shape[1], q.shape[3]))

    monkeypatch.setattr(diffusers_flux2, "dispatch_attention_fn", explicit)


def test_klein_base_with_cfg_matches_diffusers(one_thread, klein):
    """Diffusers folder, base [klein]: CFG 4.0 with the empty negative prompt, then with a negative prompt."""
    ref, folder, _ = klein
    pipe = load_pipeline(folder)
    assert (pipe.family, pipe.variant, pipe.transformer.variant) == (
        "flux2", "flux2-klein-base-like (custom size)", "flux2-klein-like (custom size)")
    with torch.no_grad():
        context, pooled = pipe.encode_prompt(PROMPTS)
        expected, _ = ref.encode_prompt(PROMPTS, device="cpu")
    assert pooled is None and context.shape == (2, N_TXT, 96) and rel_err(context, expected) <= TOL

    x = noise(2, 64, 48)
    run = dict(height=64, width=48, num_inference_steps=2, guidance_scale=4.0, latents=P._patchify_latents(x))
    latents = pipe.generate(PROMPTS, height=64, width=48, steps=2, guidance=4.0, noise=x, output="latent")
    assert latents.shape == (2, 32, 8, 6)
    assert rel_err(latents, ref(prompt=PROMPTS, output_type="latent", **run).images) <= TOL
    images = pipe.generate(PROMPTS, height=64, width=48, steps=2, guidance=4.0, noise=x, output="tensor",
                           negative_prompt="blurry")
    with torch.no_grad():
        negative, _ = ref.encode_prompt(["blurry"] * 2, device="cpu")
    expected = ref(prompt=PROMPTS, output_type="pt", negative_prompt_embeds=negative, **run).images
    assert images.shape == (2, 3, 64, 48) and rel_err(images, expected) <= TOL
    assert images.min() >= 0 and images.max() <= 1


def test_klein_distilled_single_file_with_references(one_thread, klein, single, monkeypatch):
    """BFL single file named as the distilled model: no CFG (a scale is ignored with a warning); two references
    of other sizes (the output takes the first's), one reference with the user's sigmas, TACA with a reference."""
    ref = distilled(klein[0])
    pipe = load_pipeline(single / "flux-2-klein-4b.safetensors")
    assert pipe.distilled and pipe.variant == "flux2-klein-like (custom size)"
    assert pipe.defaults == DEFAULTS["flux2-klein"]
    assert set(pipe.inert(4.0, "blurry", 1.0)) == {"guidance", "negative_prompt"}  # step-distilled: no CFG
    first, second = random_image(96, 80, seed=1), random_image(72, 100, seed=2)  # 96x80 and, cropped, 64x96
    x = noise(2, 80, 96, seed=5)
    with pytest.warns(UserWarning, match="guidance does nothing here: this FLUX.2 .klein. is step-distilled"):
        latents = pipe.generate(PROMPTS, steps=2, guidance=4.0, noise=x, output="latent", images=[first, second])
    expected = ref(prompt=PROMPTS, image=[first, second], num_inference_steps=2, guidance_scale=4.0,
                   latents=P._patchify_latents(x), output_type="latent").images
    assert latents.shape == (2, 32, 10, 12) and rel_err(latents, expected) <= TOL

    x = noise(2, 64, 48, seed=6)
    run = dict(height=64, width=48, latents=P._patchify_latents(x), image=[second], output_type="pt")
    images = pipe.generate(PROMPTS, height=64, width=48, noise=x, output="tensor", images=[second],
                           sigmas=[1.0, 0.6], steps=2)
    expected = ref(prompt=PROMPTS, sigmas=[1.0, 0.6], num_inference_steps=2, **run).images
    assert rel_err(images, expected) <= TOL

    assert pipe.guidance_for(PROMPTS, 4.0, "blurry", 1.0) == Guidance()  # no CFG, no negative branch
    with probe_attention(pipe.transformer) as probe:
        taca = pipe.generate(PROMPTS, height=64, width=48, noise=x, output="tensor", images=[second], steps=2,
                             temperature=1.25)
    assert {(r.n_txt, r.n_img) for r in probe.records} == {(N_TXT, 4 * 3 + 4 * 6)}  # image and reference tokens
    assert rel_err(taca, images) > 1e-3  # TACA changed the result
    explicit_taca_in_diffusers(monkeypatch, 1.25)
    assert rel_err(taca, ref(prompt=PROMPTS, num_inference_steps=2, **run).images) <= TOL


def test_dev_pipeline_matches_diffusers(one_thread, tmp_path):
    """[dev]-like: Mistral3 text encoder (left padding), distilled guidance 4.0 as an input, no CFG."""
    ref, folder = dev_pipeline(tmp_path)
    ref.set_progress_bar_config(disable=True)
    pipe = load_pipeline(folder)
    assert pipe.variant == "flux2-dev-like (custom size)" and pipe.defaults == DEFAULTS["flux2-dev"]
    with torch.no_grad():
        context, _ = pipe.encode_prompt(PROMPTS)
        expected, _ = ref.encode_prompt(PROMPTS, device="cpu")
    assert rel_err(context, expected) <= TOL
    x = noise(2, 48, 64, seed=7)
    run = dict(height=48, width=64, num_inference_steps=2, guidance_scale=4.0, latents=P._patchify_latents(x))
    latents = pipe.generate(PROMPTS, height=48, width=64, steps=2, guidance=4.0, noise=x, output="latent")
    packed = ref(prompt=PROMPTS, output_type="latent", **run).images  # Diffusers [dev]: packed, normalized tokens
    std = torch.sqrt(ref.vae.bn.running_var + ref.vae.config.batch_norm_eps)
    denormalized = rearrange(packed * std + ref.vae.bn.running_mean, "B (h w) C -> B C h w", h=3)
    assert rel_err(latents, unpatchify(denormalized)) <= TOL
    images = pipe.generate(PROMPTS, height=48, width=64, steps=2, guidance=4.0, noise=x, output="tensor")
    assert rel_err(images, ref(prompt=PROMPTS, output_type="pt", **run).images) <= TOL
    other = pipe.generate(PROMPTS, height=48, width=64, steps=2, guidance=1.5, noise=x, output="latent")
    assert rel_err(other, latents) > 1e-3  # the guidance scale is used
    with pytest.raises(ValueError, match=r"\[dev\] is guidance-distilled and takes no negative prompt"):
        pipe.generate(PROMPTS, height=48, width=64, steps=1, noise=x, negative_prompt="blurry")


def test_schedule_matches_diffusers():
    """`linspace(1, 1/N, N)` or the user's sigmas, shifted by exp(mu(image tokens, steps)), then 0."""
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    for steps, seq in [(1, 16), (4, 256), (28, 1024), (50, 4096), (50, 6000)]:
        assert empirical_mu(seq, steps) == compute_empirical_mu(seq, steps)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(seq, steps))
        ours = flux2_sigmas(steps, seq)
        assert ours.shape == (steps + 1,) and ours[-1] == 0 and rel_err(ours, sched.sigmas) <= 1e-6
    given = [1.0, 0.7, 0.3]
    sched.set_timesteps(sigmas=given, mu=compute_empirical_mu(1024, 8))
    shift = math.exp(empirical_mu(1024, 8))  # what generate(sigmas=, steps=8) applies (Flux2Pipeline.shift)
    assert rel_err(given_sigmas(given, shift), sched.sigmas) <= 1e-6
    assert rel_err(given_sigmas(given + [0.0], shift), sched.sigmas) <= 1e-6
    with pytest.raises(ValueError, match="decrease strictly"):
        given_sigmas([0.5, 0.7], shift)


def test_reference_images_are_prepared_as_diffusers():
    """Cap at 1 MP with LANCZOS, floor to multiples of 16 by a center crop, RGB, [-1, 1]; Diffusers' steps."""
    proc = Flux2ImageProcessor(vae_scale_factor=16)
    for image in (random_image(1100, 1000, seed=3), random_image(70, 100, seed=4).convert("L")):
        expected = image
        if image.width * image.height > 1024 * 1024:
            expected = proc._resize_to_target_area(image, 1024 * 1024)
        w, h = expected.width // 16 * 16, expected.height // 16 * 16
        expected = proc.preprocess(expected, height=h, width=w, resize_mode="crop")
        assert torch.equal(image_to_tensor(reference_image(image)), expected)
    assert reference_image(random_image(1100, 1000, seed=3)).size == (1072, 976)
    with pytest.raises(ValueError, match="too small"):
        reference_image(random_image(50, 80, seed=0))
    with pytest.raises(ValueError, match="too elongated"):
        reference_image(random_image(64, 600, seed=0))
    with pytest.raises(ValueError, match="are for FLUX.2 models; this is a flux model"):
        FluxPipeline.references(SimpleNamespace(family="flux"), [image])


def test_distilled_or_base(tmp_path):
    """model_index.json `is_distilled` wins (absent: Diffusers' False); a single file goes by its name."""
    for flag, expected in ((True, True), (False, False), (None, False)):
        (tmp_path / "repo").mkdir(exist_ok=True)
        index = {"_class_name": "Flux2KleinPipeline"} | ({} if flag is None else {"is_distilled": flag})
        (tmp_path / "repo" / "model_index.json").write_text(json.dumps(index))
        assert is_distilled(tmp_path / "repo") is expected
    assert is_distilled(Path("flux-2-klein-4b.safetensors")) and is_distilled(Path("flux-2-klein-9b-fp8.safetensors"))
    assert not is_distilled(Path("flux-2-klein-base-4b.safetensors"))


def test_parts_by_keyword(klein, single, tmp_path):
    """A single file alone: an error saying what to pass; the parts by keyword (an LLM's own folder holds its
    tokenizer: `llm=` is enough). The file's name makes it the base model."""
    _, folder, _ = klein
    file = tmp_path / "flux-2-klein-base-4b.safetensors"
    shutil.copy(single / "flux-2-klein-4b.safetensors", file)
    with pytest.raises(CheckpointError, match="did not find the LLM text encoder: pass llm=FOLDER"):
        load_pipeline(file, vae=folder / "vae")
    own = shutil.copytree(folder / "text_encoder", tmp_path / "Qwen3-tiny")
    for f in (folder / "tokenizer").iterdir():
        shutil.copy(f, own)
    pipe = load_pipeline(file, vae=single / "ae.safetensors", llm=own)
    assert pipe.variant == "flux2-klein-base-like (custom size)" and pipe.defaults == DEFAULTS["flux2-klein-base"]
    with torch.no_grad():
        assert torch.equal(pipe.encode_prompt(PROMPTS)[0], load_pipeline(folder).encode_prompt(PROMPTS)[0])


def test_mmdit_sample_writes_the_png_with_its_settings(one_thread, klein, single, tmp_path):
    _, folder, _ = klein
    out = tmp_path / "cat.png"
    args = ["sample", PROMPTS[0], "--model", str(folder), "--seed", "3", "-o", str(out), "--device", "cpu"]
    assert cli_main(args) == 0
    image = Image.open(out)
    assert image.size == (64, 64)  # the folder's sampling defaults
    assert {k: image.text[k] for k in ("variant", "steps", "guidance", "seed", "size")} == {
        "variant": "flux2-klein-base-like (custom size)", "steps": "2", "guidance": "4.0", "seed": "3", "size": "64x64"}
    (expected,) = load_pipeline(folder).generate(PROMPTS[0], seed=3)
    assert list(image.convert("RGB").getdata()) == list(expected.getdata())

    random_image(80, 64, seed=9).save(tmp_path / "ref.png")
    out = tmp_path / "edit.png"
    args = ["sample", PROMPTS[1], "--model", str(single / "flux-2-klein-4b.safetensors"), "--image",
            str(tmp_path / "ref.png"), "--steps", "1", "--taca", "1.2", "-o", str(out), "--device", "cpu"]
    assert cli_main(args) == 0
    image = Image.open(out)
    assert image.size == (80, 64) and image.text["images"] == "ref.png" and image.text["size"] == "80x64"
    assert "guidance" not in image.text and image.text["taca"] == "gamma=1.2 until t=0.97"  # distilled: none applies


def test_detection_from_keys_and_shapes(klein, single, tmp_path, capsys):
    """BFL files (bare, `model.diffusion_model.`, fp8, ComfyUI scaled fp8) and the Diffusers folder are FLUX.2,
    though they also hold FLUX.1's probe key; `python -m convert inspect` and `random` know it."""
    _, folder, bfl = klein
    assert "double_blocks.0.img_attn.qkv.weight" in bfl  # FLUX.1's probe: FLUX.2 is tested first
    save_file({f"model.diffusion_model.{k}": v for k, v in bfl.items()}, tmp_path / "prefixed.safetensors")
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}, tmp_path / "fp8.safetensors")
    scaled, dequantized = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in bfl.items():
        if v.dim() == 2:
            s = v.abs().max() / 448
            scaled[k] = (v / s).to(torch.float8_e4m3fn)
            scaled[k.removesuffix("weight") + "scale_weight"] = s.reshape(())
            dequantized[k] = scaled[k].float() * s
        else:
            scaled[k] = dequantized[k] = v
    save_file(scaled, tmp_path / "scaled.safetensors")
    cases = {single / "flux-2-klein-4b.safetensors": ("bfl", bfl), tmp_path / "prefixed.safetensors": ("bfl", bfl),
             folder: ("diffusers", bfl), tmp_path / "scaled.safetensors": ("bfl", dequantized),
             tmp_path / "fp8.safetensors": ("bfl", {k: v.to(torch.float8_e4m3fn).float() for k, v in bfl.items()})}
    for path, (layout, expected) in cases.items():
        d = detect_transformer(path)
        assert (d.family, d.layout, d.variant) == ("flux2", layout, "flux2-klein-like (custom size)"), path
        state = load_transformer(path, dtype=torch.float32).state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state), path
    assert load_transformer(tmp_path / "fp8.safetensors").dtype == torch.bfloat16

    assert convert_main(["inspect", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert "family:     flux2" in shown and "layout:     diffusers" in shown and "context_in_dim = 96" in shown
    for preset, variant in (("flux2-klein-4b", "flux2-klein-4b-like (custom size)"),
                            ("flux2-dev", "flux2-dev-like (custom size)")):
        assert convert_main(["random", preset, str(tmp_path / f"{preset}.safetensors"), "--tiny"]) == 0
        assert detect_transformer(tmp_path / f"{preset}.safetensors").variant == variant


CHILD = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from sampling import load_pipeline
noise = load_file(sys.argv[1])["noise"]
out = {}
for i, source in enumerate(sys.argv[3:]):
    pipe = load_pipeline(source)
    latents = pipe.generate(%r, height=64, width=48, steps=1, noise=noise, output="latent")
    save_file({"latents": latents}, f"{sys.argv[2]}/{i}.safetensors")
    out[source] = pipe.variant
print(json.dumps(out))
""" % PROMPTS


def test_hub_ids(klein, single, tmp_path):
    """A [klein]-style repo on the local stand-in hub (tests/test_hub.py): its Diffusers folders, and a BFL single
    file at the top with the autoencoder in vae/ only; each source fetches only what it needs."""
    _, folder, _ = klein
    files = repo_files(folder) | {"flux-2-klein-4b.safetensors": (single / "flux-2-klein-4b.safetensors").read_bytes()}
    Hub.repos, Hub.gated = {"tiny/flux2-klein": files}, set()
    Hub.fetched.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    x = noise(2, 64, 48, seed=8)
    save_file({"noise": x}, tmp_path / "noise.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{server.server_address[1]}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", OMP_NUM_THREADS="1")
    sources = ["tiny/flux2-klein/flux-2-klein-4b.safetensors", "tiny/flux2-klein"]  # one cache: the file first
    try:
        command = [sys.executable, "-c", CHILD, str(tmp_path / "noise.safetensors"), str(tmp_path), *sources]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    finally:
        server.shutdown()
        server.server_close()
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == {
        sources[0]: "flux2-klein-like (custom size)", sources[1]: "flux2-klein-base-like (custom size)"}
    for i, pipe in enumerate((load_pipeline(single / "flux-2-klein-4b.safetensors"), load_pipeline(folder))):
        expected = pipe.generate(PROMPTS, height=64, width=48, steps=1, noise=x, output="latent")  # its own guidance
        assert rel_err(load_file(tmp_path / f"{i}.safetensors")["latents"], expected) <= 1e-6
    fetched = [f.removeprefix("tiny/flux2-klein:") for f in Hub.fetched]
    # the file's downloads end with vae/ (its last snapshot); the repo's find vae/ cached
    split = 1 + max(i for i, f in enumerate(fetched) if f.startswith("vae/"))
    for_file, for_repo = set(fetched[:split]), set(fetched[split:])
    assert {"flux-2-klein-4b.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "tokenizer/tokenizer.json", "tokenizer/chat_template.jinja"} <= for_file
    assert not any(f.startswith(("transformer/", "scheduler/")) for f in for_file)
    assert {"transformer/diffusion_pytorch_model.safetensors", "transformer/config.json"} <= for_repo
    assert "flux-2-klein-4b.safetensors" not in for_repo and len(fetched) == len(set(fetched))
