"""`mmdit sample` on the tiny repos: the PNG is the pipeline's image, and its text chunks hold the settings."""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from pipeline_builders import built, random_lora

from convert import load_lora, save_lora
from mmdit.probe import probe_attention
from sampling import TacaSchedule, load_pipeline, load_pipeline_lora
from sampling.cli import add_probe, add_sample, main, version

PROMPT = "a photo of a cat"
ROOT = Path(__file__).parent.parent


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


def test_without_model_and_without_the_shipped_one_says_to_pass_one(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("sampling.loading.DEFAULT_MODEL", tmp_path / "missing")
    assert main(["sample", PROMPT, "-o", str(tmp_path / "x.png")]) == 2
    assert "pass --model SOURCE" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_bad_size(capsys):
    with pytest.raises(SystemExit):
        main(["sample", PROMPT, "--size", "100x64", "--model", "x"])
    assert "multiples of 16" in capsys.readouterr().err


def test_python_m_sampling_is_the_cli():
    run = subprocess.run([sys.executable, "-m", "sampling", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and "sample" in run.stdout and "usage: mmdit" in run.stdout


def test_sample_with_a_taca_lora(tmp_path):
    """--lora with --taca: the file is applied, and gated to the TACA steps, as in `generate`."""
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
    with pytest.raises(SystemExit) as exit:  # 0 is not "the default"; refused at parse time, before loading
        main(["sample", "a red circle", "--steps", "0", "-o", str(out)])
    assert exit.value.code == 2 and "argument --steps: must be at least 1, got 0" in capsys.readouterr().err
    assert not out.exists()


def test_sample_and_probe_take_the_same_run_flags():
    """One set of flags for a run: every flag of `mmdit sample` but -o, --upscale and the prompt file's
    (--prompts, --outdir, --seeds, --batch-size, --layout) means the same to `mmdit probe`."""
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_sample(sub)
    add_probe(sub)
    run = [PROMPT, "--model", "m", "--steps", "3", "--guidance", "2.5", "--negative", "blurry", "--true-cfg", "2",
           "--slg", "7", "8", "--slg-scale", "2", "--slg-start", "0.1", "--slg-stop", "0.5", "--seed", "4",
           "--taca", "1.2", "--taca-until", "0.9", "--lora", "a.safetensors", "--lora-scale", "0.7", "--size", "64x32",
           "--device", "cpu", "--dtype", "fp32", "--offload", "stream", "--offload-encoders"]
    sample, probe = (vars(parser.parse_args([c, *run])) for c in ("sample", "probe"))
    for own in ("command", "func", "output", "upscale", "prompts", "outdir", "seeds", "batch_size", "layout"):
        sample.pop(own), probe.pop(own, None)
    assert sample == probe and sample["slg"] == [7, 8] and sample["size"] == (64, 32)
    defaults = {c: vars(parser.parse_args([c, PROMPT])) for c in ("sample", "probe")}
    assert defaults["sample"]["seed"] is None and defaults["probe"]["seed"] is None  # random for both, recorded
    assert defaults["sample"]["output"] == Path("out.png") and defaults["probe"]["output"] == Path("probe.csv")


def test_probe_with_negative_true_cfg_lora_and_offload(tmp_path):
    """The probe runs what `mmdit sample` would: here FLUX with true CFG, a gated TACA LoRA and every part offloaded."""
    _, folder = built("flux")
    pipe = load_pipeline(folder)
    random_lora(pipe.transformer, std=0.2)
    save_lora(pipe.transformer, tmp_path / "taca.safetensors", "taca")
    out = tmp_path / "probe.csv"
    assert main(["probe", PROMPT, "--model", str(folder), "--steps", "2", "--size", "32x48", "--negative", "blurry",
                 "--true-cfg", "2", "--taca", "1.3", "--taca-until", "0.5", "--lora", str(tmp_path / "taca.safetensors"),
                 "--lora-scale", "0.5", "--offload", "model", "--seed", "0", "-o", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    fresh = load_pipeline(folder)
    load_pipeline_lora(fresh, tmp_path / "taca.safetensors", scale=0.5)
    with probe_attention(fresh.transformer) as probe:
        fresh.generate(PROMPT, height=48, width=32, steps=2, guidance=3.5, seed=0, negative_prompt="blurry",
                       true_cfg=2.0, temperature=TacaSchedule(1.3, 0.5), output="latent")
    assert len(rows) == len(probe.records) == 2 * 4  # 2 steps x 4 blocks, one model call per step
    for r, rec in zip(rows, probe.records):
        assert rec.text_mass.shape[0] == 2  # the CFG batch [negative | positive]
        assert float(r["text_mass"]) == pytest.approx(rec.text_mass[-1].mean().item(), rel=1e-5)
    text = Image.open(out.with_suffix(".png")).text
    assert (text["negative"], text["true_cfg"], text["lora"]) == ("blurry", "2.0", "taca.safetensors x0.5")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_mmdit_command_has_train_and_sample_imports_nothing_from_training(tmp_path):
    """The `mmdit` command (cli.py) adds `train`; `mmdit sample` imports no training module (the layers:
    sampling never imports training, only the command above both does)."""
    out = tmp_path / "x.png"
    code = ("import sys, cli; rc = cli.main(['sample', 'a red circle', '--steps', '1', '--seed', '0', '-o', %r]); "
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'training'))" % str(out))
    run = run_python(code)
    assert run.stdout.splitlines()[-1] == "0 []", run.stderr
    assert Image.open(out).text["seed"] == "0"
    run = run_python("import cli; cli.main(['--help'])")
    assert "usage: mmdit" in run.stdout and all(c in run.stdout for c in ("sample", "probe", "train"))
    run = run_python("import cli; cli.main(['train', '--help'])")
    assert "--taca-gamma" in run.stdout
