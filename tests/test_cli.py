"""`mmdit sample` on the tiny repos: the PNG is the pipeline's image, and its text chunks hold the settings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from pipeline_builders import built, random_lora

from sampling import TacaSchedule, load_pipeline
from sampling.cli import main, version

PROMPT = "a photo of a cat"


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").getdata()))


def test_sample_flux_png_and_metadata(tmp_path):
    _, folder = built("flux")
    out = tmp_path / "sub" / "cat.png"
    args = ["sample", PROMPT, "--model", str(folder), "--steps", "2", "--size", "48x64", "--seed", "3",
            "--taca", "1.3", "--taca-until", "0.5", "-o", str(out), "--device", "cpu"]
    assert main(args) == 0
    image = Image.open(out)
    assert image.size == (48, 64)
    assert image.text == {
        "prompt": PROMPT, "model": str(folder), "variant": "flux-dev-like (custom size)", "steps": "2",
        "guidance": "3.5", "seed": "3", "taca": "gamma=1.3 until t=0.5", "size": "48x64",
        "version": f"taca-mmdit {version()}",
    }
    (expected,) = load_pipeline(folder).generate(PROMPT, height=64, width=48, steps=2, guidance=3.5, seed=3,
                                                 temperature=TacaSchedule(1.3, 0.5))
    assert torch.equal(pixels(image), pixels(expected))
    assert not list(out.parent.glob(".*.tmp"))  # written atomically


def test_sample_sd3_defaults_and_negative(tmp_path):
    _, folder = built("sd3")
    out = tmp_path / "dog.png"
    assert main(["sample", PROMPT, "--model", str(folder), "--steps", "2", "--size", "64x48", "--seed", "11",
                 "--negative", "blurry", "-o", str(out), "--device", "cpu", "--offload", "stream"]) == 0
    image = Image.open(out)
    assert image.text["guidance"] == "4.5" and image.text["variant"] == "sd3.5-medium-like (custom size)"
    assert image.text["negative"] == "blurry" and image.text["taca"] == "off"
    (expected,) = load_pipeline(folder).generate(PROMPT, height=48, width=64, steps=2, guidance=4.5, seed=11,
                                                 negative_prompt="blurry")
    assert torch.equal(pixels(image), pixels(expected))


def test_without_model_and_without_the_shipped_one_says_to_pass_one(monkeypatch, tmp_path):
    monkeypatch.setattr("sampling.cli.DEFAULT_MODEL", tmp_path / "missing")
    with pytest.raises(SystemExit, match="pass --model SOURCE"):
        main(["sample", PROMPT])


def test_bad_size(capsys):
    with pytest.raises(SystemExit):
        main(["sample", PROMPT, "--size", "100x64", "--model", "x"])
    assert "multiples of 16" in capsys.readouterr().err


def test_python_m_sampling_is_the_cli():
    root = Path(__file__).parent.parent
    run = subprocess.run([sys.executable, "-m", "sampling", "--help"], capture_output=True, text=True, cwd=root)
    assert run.returncode == 0 and "sample" in run.stdout and "usage: mmdit" in run.stdout


def test_sample_with_a_taca_lora(tmp_path):
    """--lora with --taca: the file is applied, and gated to the TACA steps, as in `generate`."""
    from convert import load_lora, save_lora

    _, folder = built("flux")
    pipe = load_pipeline(folder)
    random_lora(pipe.transformer, std=0.2)
    save_lora(pipe.transformer, tmp_path / "taca.safetensors", "taca")
    out = tmp_path / "lora.png"
    assert main(["sample", PROMPT, "--model", str(folder), "--steps", "2", "--size", "48x64", "--seed", "5",
                 "--taca", "1.2", "--taca-until", "0.9", "--lora", str(tmp_path / "taca.safetensors"),
                 "--lora-scale", "0.8", "-o", str(out)]) == 0
    image = Image.open(out)
    assert image.text["lora"] == "taca.safetensors x0.8"
    fresh = load_pipeline(folder)
    load_lora(fresh.transformer, tmp_path / "taca.safetensors", scale=0.8)
    kw = dict(height=64, width=48, steps=2, guidance=3.5, seed=5)
    (expected,) = fresh.generate(PROMPT, temperature=TacaSchedule(1.2, 0.9), **kw)
    assert torch.equal(pixels(image), pixels(expected))
    (always_on,) = fresh.generate(PROMPT, temperature=TacaSchedule(1.2, 0.9), gate_lora=False, **kw)
    assert not torch.equal(pixels(image), pixels(always_on))


def test_bad_input_is_one_clear_line(tmp_path, capsys):
    """A missing model or a zero step count: exit 2 and a message naming it, no traceback, no image."""
    out = tmp_path / "x.png"
    assert main(["sample", "a red circle", "--model", str(tmp_path / "absent"), "-o", str(out)]) == 2
    assert f"{tmp_path / 'absent'}: no such file or folder" in capsys.readouterr().err
    assert main(["sample", "a red circle", "--steps", "0", "-o", str(out)]) == 2  # 0 is not "the default"
    assert "steps must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()
