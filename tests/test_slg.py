"""Skip-layer guidance (SD3 / SD3.5) against Diffusers' StableDiffusion3Pipeline(skip_guidance_layers=...).

Same tiny random repo, weights, prompts and noise as tests/test_pipelines.py: the skipped-block forward
equals Diffusers' transformer with `skip_layers`, and the final latents and images equal Diffusers'
with SLG on in some steps and off in others. With TACA (which Diffusers does not have) the reference
is the rule written out: three branches per step, each with the step's temperature and LoRA state.
"""

from __future__ import annotations

import pytest
import torch
from builders import rel_err
from PIL import Image
from pipeline_builders import PROMPTS, T5_LEN, built, flux_noise, random_lora

from mmdit.lora import lora_enabled
from sampling import TacaSchedule, load_pipeline
from sampling.cli import main
from sampling.loading import DEFAULT_MODEL
from sampling.sampler import slg_window
from sampling.schedules import given_sigmas, sd3_sigmas

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 64, 48
TOL = 1e-4
# 4 steps: 4 * 0.01 < i < 4 * 0.75 = 3 (strict), so SLG is on in steps 1 and 2, off in steps 0 and 3
WINDOW = {"skip_layer_guidance_start": 0.01, "skip_layer_guidance_stop": 0.75}


@pytest.fixture(scope="module")
def sd3():
    ref, folder = built("sd3")
    return ref, folder, load_pipeline(folder, max_sequence_length=T5_LEN)


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").getdata()))


def reference(ref, noise, steps, output_type, **kw):
    return ref(PROMPTS, height=H, width=W, num_inference_steps=steps, latents=noise,
               max_sequence_length=T5_LEN, output_type=output_type, **kw).images


def test_window_is_diffusers_step_test_for_any_schedule():
    s = sd3_sigmas(4)
    assert slg_window(s, 0.01, 0.75) == {float(s[1]), float(s[2])}
    assert slg_window(sd3_sigmas(5)) == frozenset()  # the defaults: no step of 5 (0.05 < i < 1)
    assert slg_window(sd3_sigmas(6)) == {float(sd3_sigmas(6)[1])}
    assert len(slg_window(sd3_sigmas(28))) == 5  # steps 1..5 (0.28 < i < 5.6)
    own = given_sigmas([0.9, 0.7, 0.5, 0.3, 0.1])
    assert slg_window(own, 0.2, 0.8) == {float(own[2]), float(own[3])}  # 1 < i < 4, strict on both sides


def test_skip_layers_forward_matches_diffusers(sd3):
    ref, _, pipe = sd3
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 20, 128, generator=g), torch.randn(2, 80, generator=g)
    t = torch.tensor([0.9, 0.4])
    ours = pipe.transformer
    full = ours(x, t, ctx, pooled)
    for skip in ([0], [1], [0, 1]):
        theirs = ref.transformer(hidden_states=x, timestep=t * 1000, encoder_hidden_states=ctx,
                                 pooled_projections=pooled, skip_layers=skip, return_dict=False)[0]
        v = ours(x, t, ctx, pooled, skip_layers=skip)
        assert rel_err(v, theirs) < TOL and rel_err(v, full) > 1e-3


def test_bad_layer_is_a_clear_error(sd3):
    _, _, pipe = sd3
    x = torch.zeros(1, 16, 8, 6)
    with pytest.raises(ValueError, match=r"no joint block 2; the model has 2 \(0 to 1\)"):
        pipe.transformer(x, torch.ones(1), torch.zeros(1, 4, 128), torch.zeros(1, 80), skip_layers=[0, 2])
    with pytest.raises(ValueError, match="no joint block -1"):
        pipe.generate(PROMPTS, height=H, width=W, steps=2, skip_guidance_layers=[-1])
    with pytest.raises(ValueError, match="on top of classifier-free guidance"):
        pipe.generate(PROMPTS, height=H, width=W, steps=2, guidance=1.0, skip_guidance_layers=[0])


def test_slg_latents_and_images_match_diffusers(sd3):
    ref, _, pipe = sd3
    noise = flux_noise(2, H, W, seed=12)
    kw = {"height": H, "width": W, "steps": 4, "guidance": 4.5, "noise": noise, "negative_prompt": "blurry"}
    ours = pipe.generate(PROMPTS, output="latent", skip_guidance_layers=[0], skip_layer_guidance_scale=2.0, **WINDOW, **kw)
    theirs = reference(ref, noise, 4, "latent", guidance_scale=4.5, negative_prompt="blurry",
                       skip_guidance_layers=[0], skip_layer_guidance_scale=2.0, **WINDOW)
    assert rel_err(ours, theirs) < TOL
    assert rel_err(ours, pipe.generate(PROMPTS, output="latent", **kw)) > 1e-3  # SLG did something
    # the defaults (scale 2.8, steps with 0.01 N < i < 0.2 N: step 1 of 6), images
    kw = {"height": H, "width": W, "steps": 6, "guidance": 4.5, "noise": noise}
    images = pipe.generate(PROMPTS, output="tensor", skip_guidance_layers=[1], **kw)
    assert rel_err(images, reference(ref, noise, 6, "pt", guidance_scale=4.5, skip_guidance_layers=[1])) < TOL


def explicit_slg(pipe, noise, steps, cfg, layers, scale, slg_steps, taca):
    """The rule written out: v = v_neg + cfg (v_pos - v_neg) [+ scale (v_pos - v_skip)], each branch run
    separately with the step's TACA temperature and the LoRA on only where that temperature is set."""
    model, sigmas = pipe.transformer, sd3_sigmas(steps)
    pos, neg = pipe.encode_prompt(PROMPTS), pipe.encode_prompt([""] * len(PROMPTS))
    x = noise.clone()
    for i in range(steps):
        t = sigmas[i]
        temp = taca(float(t))
        ts = t.expand(len(PROMPTS))
        with lora_enabled(model, temp is not None):
            v_pos, v_neg = (model(x, ts, *c, temperature=temp) for c in (pos, neg))
            v = v_neg + cfg * (v_pos - v_neg)
            if i in slg_steps:
                v = v + scale * (v_pos - model(x, ts, *pos, temperature=temp, skip_layers=layers))
        x = x + (sigmas[i + 1] - t) * v
    return x


def test_taca_and_lora_gate_act_on_the_slg_branch(sd3):
    """TACA on in steps 0-1 (t >= 0.7), SLG in steps 1-2: every combination of the two occurs."""
    _, folder, _ = sd3
    pipe = load_pipeline(folder, max_sequence_length=T5_LEN)
    random_lora(pipe.transformer, std=0.1)
    noise = flux_noise(2, H, W, seed=13)
    taca = TacaSchedule(1.5, until=0.7)
    kw = {"height": H, "width": W, "steps": 4, "guidance": 4.5, "noise": noise, "output": "latent",
          "skip_guidance_layers": [0], "skip_layer_guidance_scale": 2.0, **WINDOW}
    with torch.no_grad():
        ours = pipe.generate(PROMPTS, temperature=taca, **kw)
        expected = explicit_slg(pipe, noise, 4, 4.5, [0], 2.0, {1, 2}, taca)
        assert rel_err(ours, expected) < TOL
        ungated = explicit_slg(pipe, noise, 4, 4.5, [0], 2.0, {1, 2}, lambda t: 1.5 if t >= 0.7 else 1.0)
        assert rel_err(ours, ungated) > 1e-4  # the gate matters (1.0: the LoRA stays on)
        assert rel_err(ours, pipe.generate(PROMPTS, **kw)) > 1e-4  # TACA matters


def test_flux_refuses_slg():
    pipe = load_pipeline(DEFAULT_MODEL)
    with pytest.raises(ValueError, match="SD3-only"):
        pipe.generate("a red circle", skip_guidance_layers=[0])


def test_cli_slg_reaches_the_image(tmp_path, capsys):
    _, folder = built("sd3")
    out = tmp_path / "slg.png"
    assert main(["sample", "a photo of a cat", "--model", str(folder), "--steps", "4", "--size", "48x64", "--seed", "4",
                 "--slg", "1", "0", "--slg-scale", "2.0", "--slg-stop", "0.75", "-o", str(out), "--device", "cpu"]) == 0
    image = Image.open(out)
    assert image.text["slg"] == "layers 1 0 scale=2.0 start=0.01 stop=0.75"
    (expected,) = load_pipeline(folder).generate("a photo of a cat", height=64, width=48, steps=4, guidance=4.5, seed=4,
                                                 skip_guidance_layers=[0, 1], skip_layer_guidance_scale=2.0, **WINDOW)
    assert torch.equal(pixels(image), pixels(expected))
    capsys.readouterr()
    assert main(["sample", "a red circle", "--slg", "7", "8", "9", "-o", str(tmp_path / "flux.png")]) == 2
    err = capsys.readouterr().err
    assert "SD3-only" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "flux.png").exists()
