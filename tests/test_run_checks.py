"""Bad values of `mmdit sample` / `mmdit probe` and `generate`: refused before any work, naming the flag;
flags that would do nothing: warned of, neither applied nor recorded; NaN or Inf: an error naming where."""

from __future__ import annotations

import argparse
import math
import shutil

import pytest
import torch
from PIL import Image
from pipeline_builders import built
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from convert.files import CheckpointError, save_safetensors_atomic
from sampling import load_pipeline, load_pipeline_lora
from sampling.cli import add_probe, add_sample, main
from sampling.limits import SizeError
from sampling.loading import DEFAULT_MODEL
from sampling.sampler import Conditioning, NonFiniteError, denoise
from sampling.schedules import sd3_sigmas
from sampling.taca import TacaSchedule

PROMPT = "a red circle"


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").getdata()))


@pytest.fixture
def never_loads(monkeypatch):
    """Loading a model is an error: the checks under test must come before it."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr("sampling.cli.load_pipeline", refuse)


BAD_FLAGS = [
    (["--taca", "0"], "--taca: must be above 0"), (["--taca", "-1"], "--taca: must be above 0"),
    (["--taca", "inf"], "--taca: must be a finite number"), (["--taca", "nan"], "--taca: must be a finite number"),
    (["--taca", "1.2", "--taca-until", "nan"], "--taca-until: must be a finite number"),
    (["--taca", "1.2", "--taca-until", "1.5"], "--taca-until: must be at most 1"),
    (["--guidance", "nan"], "--guidance: must be a finite number"), (["--guidance", "inf"], "--guidance: must be a finite"),
    (["--guidance", "-2"], "--guidance: must be at least 0"),
    (["--lora-scale", "nan"], "--lora-scale: must be a finite number"),
    (["--true-cfg", "nan"], "--true-cfg: must be a finite number"), (["--true-cfg", "0.5"], "--true-cfg: must be at least 1"),
    (["--slg-scale", "nan"], "--slg-scale: must be a finite number"), (["--slg-start", "inf"], "--slg-start: must be a finite"),
    (["--slg-stop", "2"], "--slg-stop: must be at most 1"), (["--slg", "-1"], "--slg: must be at least 0"),
    (["--seed", "-5"], "--seed: must be at least 0"),
    (["--seed", "18446744073709551616"], "--seed: must be at most 18446744073709551615"),
    (["--steps", "-1"], "--steps: must be at least 1"), (["--steps", "1000000000"], "--steps: must be at most 10000"),
    (["--steps", "2.5"], "--steps: not an integer"),
    (["--size", "100000x100000"], "--size: width and height are at most 16384"),
    (["--upscale", "0"], "--upscale: must be at least 1"),
    (["--device", "nonsense"], "--device: not a device"), (["--device", "meta"], "--device: 'meta': not a device to sample on"),
]


@pytest.mark.parametrize("flags,message", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_values_are_refused_at_parse_time(flags, message, never_loads, tmp_path, capsys):
    for command in ("sample", "probe"):
        if command == "probe" and flags[0] == "--upscale":
            continue
        with pytest.raises(SystemExit) as exit:
            main([command, PROMPT, *flags, "-o", str(tmp_path / "x")])
        assert exit.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {message}" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is there")
def test_device_cuda_without_cuda(never_loads, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", PROMPT, "--device", "cuda", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert "argument --device: 'cuda' is not available" in err and "use --device cpu" in err
    assert "Traceback" not in err and "AssertionError" not in err


@pytest.mark.parametrize("flags,message", [
    (["--slg", "0", "--slg-start", "0.5", "--slg-stop", "0.2"], "--slg-start 0.5 must be below --slg-stop 0.2"),
    (["--size", "4096x4096", "--upscale", "3"], "--upscale 3: a 12288x12288 PNG, over 89478485 pixels"),
    (["--upscale", "100000"], "--upscale 100000: even a 16x16 image would be a 1600000x1600000 PNG"),
])
def test_contradicting_flags_are_refused_before_loading(flags, message, never_loads, tmp_path, capsys):
    assert main(["sample", PROMPT, *flags, "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmdit sample: error: {message}") and len(err.strip().splitlines()) == 1


def test_generate_refuses_bad_numbers():
    pipe = load_pipeline(DEFAULT_MODEL)
    for kwargs, message in [
        (dict(seed=-5), "seed must lie in 0..2\\*\\*64 - 1"), (dict(seed=2**64), "seed must lie"),
        (dict(true_cfg=math.nan), "true_cfg must be a finite number"),
        (dict(guidance=math.inf), "guidance must be a finite number"),
        (dict(steps=10**9), "steps must be at most 10000"),
        (dict(sigmas=[1.0, math.nan]), "sigmas must decrease strictly"),
        (dict(height=100000, width=64), "width and height are at most 16384"),
    ]:
        with pytest.raises(ValueError, match=message):
            pipe.generate(PROMPT, output="latent", **kwargs)
    for gamma, until in [(math.inf, 0.97), (0.0, 0.97), (-1.0, 0.97), (1.2, math.nan)]:
        with pytest.raises(ValueError, match="TACA's"):
            TacaSchedule(gamma, until)


# ---- sizes against the model and the memory ----


def test_sd3_position_table_bounds_the_size_before_the_weights(monkeypatch, tmp_path, capsys):
    """The tiny SD3's table covers 16x16 patches of 2 latent pixels, x8 by the autoencoder: 256 px at most.
    A larger --size is refused naming the flag, before the transformer or an encoder is loaded."""
    _, folder = built("sd3")
    capsys.readouterr()
    loaded = []
    for name in ("load_transformer", "load_text_encoder"):
        monkeypatch.setattr(f"sampling.loading.{name}", lambda *a, name=name, **k: loaded.append(name))
    with pytest.raises(SizeError, match=r"size 512x256 \(WxH\): this SD3 model's position table covers 16x16 patches"
                                        r".*images up to 256x256"):
        load_pipeline(folder, image_size=(256, 512))
    assert main(["sample", PROMPT, "--model", str(folder), "--size", "512x256", "-o", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.startswith("mmdit sample: error: --size 512x256 (WxH): this SD3 model's position")
    assert loaded == [] and not (tmp_path / "x.png").exists()
    monkeypatch.undo()
    pipe = load_pipeline(folder, image_size=(256, 256))  # the largest it covers
    with pytest.raises(SizeError, match="position table"):
        pipe.generate(PROMPT, height=272, width=64, output="latent")


def test_memory_bounds_the_size_before_encoding(monkeypatch):
    pipe = load_pipeline(built("flux")[1])
    monkeypatch.setattr(type(pipe), "encode_prompt", lambda *a: (_ for _ in ()).throw(AssertionError("encoded")))
    monkeypatch.setattr("sampling.limits.free_memory", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(SizeError, match=r"size 1024x1024 \(WxH\): one activation of this run alone needs .* GiB, cpu has 0.0 GiB"):
        pipe.generate(PROMPT, height=1024, width=1024, steps=1)  # the decoder's 2 x (1, 128, 1024, 1024) float32


# ---- flags that would do nothing: warned of, not applied, not recorded ----


def test_guidance_on_a_model_without_guidance_is_not_recorded(tmp_path, capsys):
    """The tiny model is FLUX-schnell-like: no distilled guidance, and --guidance is not its CFG scale."""
    plain, guided = tmp_path / "plain.png", tmp_path / "guided.png"
    run = ["sample", PROMPT, "--steps", "2", "--seed", "1"]
    assert main([*run, "-o", str(plain)]) == 0 and main([*run, "--guidance", "5", "-o", str(guided)]) == 0
    err = capsys.readouterr().err
    assert "warning: --guidance 5.0 does nothing on flux-schnell-like" in err and "not applied, not recorded" in err
    assert "guidance" not in Image.open(guided).text and Image.open(guided).text == Image.open(plain).text
    assert torch.equal(pixels(Image.open(guided)), pixels(Image.open(plain)))


@pytest.mark.parametrize("kind,base,flags,warning", [
    ("flux", [], ["--negative", "blurry"], "--negative 'blurry' does nothing on flux-dev-like"),
    ("flux", [], ["--true-cfg", "3"], "--true-cfg 3.0 does nothing on flux-dev-like"),
    ("sd3", [], ["--true-cfg", "3"], "--true-cfg 3.0 does nothing on sd3.5-medium-like"),
    ("sd3", ["--guidance", "1"], ["--negative", "blurry"], "--negative 'blurry' does nothing on sd3.5-medium-like"),
    ("sd3", [], ["--slg", "0"], "--slg does nothing in 2 steps"),
])
def test_guidance_flags_that_do_nothing_are_not_recorded(kind, base, flags, warning, tmp_path, capsys):
    """The image is the one without the flag, and its text chunks are too; the warning names the flag."""
    _, folder = built(kind)
    out, plain = tmp_path / "x.png", tmp_path / "plain.png"
    run = ["sample", PROMPT, "--model", str(folder), "--steps", "2", "--size", "32x32", "--seed", "2", *base]
    assert main([*run, *flags, "-o", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"mmdit sample: warning: {warning}" in err and "not applied, not recorded" in err
    assert main([*run, "-o", str(plain)]) == 0
    assert Image.open(out).text == Image.open(plain).text
    assert torch.equal(pixels(Image.open(out)), pixels(Image.open(plain)))


@pytest.mark.parametrize("flags,needs", [
    (["--taca-until", "0.5"], "without --taca"), (["--lora-scale", "0.5"], "without --lora"),
    (["--slg-scale", "3"], "without --slg"), (["--offload", "model"], "does nothing on the CPU"),
])
def test_flags_that_need_another_are_warned_of(flags, needs, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["sample", PROMPT, "--steps", "1", "--device", "cpu", *flags, "-o", str(out)]) == 0
    assert needs in capsys.readouterr().err
    assert Image.open(out).text["taca"] == "off" and "lora" not in Image.open(out).text


def test_generate_warns_of_arguments_that_do_nothing():
    pipe = load_pipeline(DEFAULT_MODEL)
    with pytest.warns(UserWarning, match="guidance does nothing here: this FLUX model takes no distilled guidance"):
        pipe.generate(PROMPT, steps=1, guidance=5.0, output="latent")
    with pytest.warns(UserWarning, match="negative_prompt does nothing here"):  # true CFG turned off
        pipe.generate(PROMPT, steps=1, negative_prompt="blurry", true_cfg=1.0, output="latent")


# ---- NaN and Inf: an error naming where, never a black image ----


class Field(torch.nn.Module):
    """A stand-in velocity: finite while t > 0.6, NaN in the step at t = 0.5."""

    def forward(self, x, t, context, pooled, guidance=None, temperature=None):
        return x * (math.nan if float(t[0]) < 0.6 else 0.5)


class ScalarReads(TorchDispatchMode):
    """Counts the values read back from tensors other than the (host) sigmas: `.item()`, `int()`, `bool()`."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].dtype in (torch.int64, torch.bool):
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_denoise_names_the_first_non_finite_step_reading_one_flag():
    x, cond = torch.randn(1, 4, 2, 2), Conditioning(torch.zeros(1, 1, 1), torch.zeros(1, 1))
    sigmas = torch.tensor([1.0, 0.8, 0.5, 0.3, 0.0])
    with ScalarReads() as mode, pytest.raises(NonFiniteError, match=r"became NaN or Inf in step 3 of 4 \(t = 0.5\)"):
        denoise(Field(), x, sigmas, cond)
    assert mode.reads == 1  # one read after the loop, none per step
    with ScalarReads() as mode:
        denoise(lambda x, *a, **k: -x, x, sd3_sigmas(6), cond)
    assert mode.reads == 1


def test_nan_weights_are_an_error_not_a_black_image(tmp_path, capsys):
    ref, folder = built("flux")
    pipe = load_pipeline(folder)
    with torch.no_grad():
        pipe.transformer.double_blocks[1].img_mlp[0].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="latents became NaN or Inf in step 1 of 2"):
        pipe.generate(PROMPT, height=32, width=32, steps=2, seed=0)
    pipe = load_pipeline(folder)
    with torch.no_grad():
        pipe.autoencoder.decoder.conv_out.weight[0, 0, 0, 0] = math.inf
    with pytest.raises(NonFiniteError, match="the autoencoder decoded finite latents to NaN or Inf"):
        pipe.generate(PROMPT, height=32, width=32, steps=2, seed=0)
    pipe = load_pipeline(folder)
    with torch.no_grad():
        next(pipe.encoders["t5"].parameters()).fill_(math.nan)
    with pytest.raises(NonFiniteError, match="encoding of the prompts holds NaN or Inf"):
        pipe.generate(PROMPT, height=32, width=32, steps=2, seed=0)


def test_cli_nan_weights_are_exit_1_and_no_png(tmp_path, capsys):
    """The shipped tiny model with one NaN weight: exit 1, one line naming the step, no PNG."""
    model = tmp_path / "tiny-nan"
    shutil.copytree(DEFAULT_MODEL, model)
    weights = next((model / "transformer").glob("*.safetensors"))
    state = load_file(weights)
    state["final_layer.linear.bias"][0] = math.nan
    save_safetensors_atomic(state, weights)
    out = tmp_path / "x.png"
    assert main(["sample", PROMPT, "--model", str(model), "--steps", "2", "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert err == "mmdit sample: error: the latents became NaN or Inf in step 1 of 2 (t = 1): check the weights of " \
                  "the model and of any LoRA, the guidance and TACA values, or compute in float32"
    assert not out.exists()


# ---- LoRA files this pipeline cannot run ----


def test_control_lora_is_refused_naming_the_file(tmp_path):
    """A BFL FLUX.1 Depth/Canny control LoRA widens img_in to take a control image: named, and refused."""
    pipe = load_pipeline(built("flux")[1])
    width = pipe.transformer.params.in_channels
    file = tmp_path / "flux1-depth-dev-lora.safetensors"
    save_safetensors_atomic({
        "img_in.lora_A.weight": torch.zeros(4, 2 * width), "img_in.lora_B.weight": torch.zeros(256, 4),
        "img_in.lora_B.bias": torch.zeros(256), "double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(128),
    }, file)
    with pytest.raises(CheckpointError, match=rf"{file}: a control LoRA .*{2 * width} input channels.*control image"):
        load_pipeline_lora(pipe, file)
    with pytest.raises(ValueError, match="LoRA scale must be a finite number"):
        load_pipeline_lora(pipe, file, scale=math.nan)


# ---- --help states every default ----


def test_help_states_every_default():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    for add in (add_sample, add_probe):
        add(sub)
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in (action.help or ""), f"mmdit {name} {action.option_strings[0]}: no default in --help"
