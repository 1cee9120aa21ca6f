"""The CPU benchmarks around the tiny model: benchmarks/taca_toy.py (intervals and paired differences per
setting, a LoRA trained at the chosen size) and benchmarks/probe_sizes.py (the text mass per layer and size)."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from PIL import Image
from pipeline_builders import PROMPTS, built
from safetensors.torch import load_file

import benchmarks.results
from benchmarks import probe_sizes, taca_toy
from benchmarks.compbench import CATEGORIES, load, score_items
from benchmarks.stats import category_intervals, paired_differences
from mmdit.attention import JointAttention, as_temperature_matrix
from sampling import TacaSchedule, default_model
from scripts.scenes import heldout_prompts, write_dataset
from training.data import target_size

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def results_file(tmp_path, monkeypatch):
    """benchmarks/RESULTS.md redirected to a temporary file holding one other section."""
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    monkeypatch.setattr(benchmarks.results, "RESULTS", path)
    return path


def test_taca_toy_rows_are_intervals_and_paired_differences(monkeypatch, results_file, capsys):
    prompts = heldout_prompts()[::12]  # 6 prompts
    monkeypatch.setattr(taca_toy, "heldout_prompts", lambda: prompts)
    rows = taca_toy.run(None, None, seeds=2, steps=2, size=(32, 32), gammas=[1.5], untils=[0.5, 0.0])
    assert [(r["gamma"], r["until"], r["lora"]) for r in rows] == [(1.0, None, False), (1.5, 0.5, False), (1.5, 0.0, False)]
    # the same items scored again, by hand: each row's means and its paired difference to the plain row
    pipe = load()
    plain = score_items(pipe, prompts, range(2), 2, None, (32, 32))
    hot = score_items(pipe, prompts, range(2), 2, TacaSchedule(1.5, 0.0), (32, 32))
    assert rows[0]["means"] == category_intervals(plain, CATEGORIES) and rows[0]["diffs"] is None
    assert rows[2]["means"] == category_intervals(hot, CATEGORIES) and rows[2]["n"] == 12
    assert rows[2]["diffs"] == paired_differences(plain, hot, CATEGORIES)
    # the table and the section: "mean [low, high]" cells, signed differences, the other section kept
    taca_toy.main(["--seeds", "2", "--steps", "2", "--gammas", "1.5", "--untils", "0.5", "0", "--lora-steps", "0"])
    text = results_file.read_text()
    assert text.startswith("# Benchmark results\n\n## Other\n\nkept\n\n## TACA in miniature (CPU)\n")
    assert taca_toy.section((32, 32), (32, 32)) == taca_toy.SECTION
    assert taca_toy.section((64, 32), (32, 32)) == "## TACA in miniature (CPU, 64x32)"
    assert "No TACA LoRA" in text and "at 32x32 on the 6 held-out prompts" in text
    last = next(line for line in text.splitlines() if line.startswith("| 1.5 | 0 | no |"))
    cells = [c.strip() for c in last.strip("|").split("|")]
    assert cells[3:7] == [str(rows[2]["means"][c]) for c in CATEGORIES]
    assert cells[7:] == [taca_toy.format_diff(rows[2]["diffs"][c]) for c in CATEGORIES]
    assert all(("*" in cell) == rows[2]["diffs"][c].excludes_zero() for cell, c in zip(cells[7:], CATEGORIES))


@pytest.mark.parametrize("width, height", [(32, 32), (64, 64), (64, 32), (32, 64), (96, 64)])
def test_lora_training_shape_is_the_size(width, height):
    resolution, buckets = taca_toy.training_shape(width, height)
    assert target_size(width, height, resolution, buckets) == (height, width)
    assert buckets == (width != height) and resolution % 16 == 0


def test_taca_lora_is_trained_on_scenes_of_the_size(tmp_path, monkeypatch):
    # a few scenes (45 single objects) instead of the benchmark's thousands: the size is what is checked
    monkeypatch.setattr(taca_toy, "write_dataset", lambda out, per_layout, per_object, seed, width, height:
                        write_dataset(out, 0, 3, seed, width, height))
    lora = taca_toy.train_lora(str(default_model()), tmp_path, 1, 0, (64, 32))
    assert lora.is_file() and lora.parent == tmp_path / "64x32" / "lora-1-0"
    pngs = sorted((tmp_path / "64x32" / "scenes-0" / "train").glob("*.png"))
    assert len(pngs) == 45 and {Image.open(p).size for p in pngs} == {(64, 32)}
    cached = [load_file(f)["latent"].shape for f in (lora.parent / "cache").glob("*.safetensors")]
    assert len(cached) == 45 and set(cached) == {(12, 16, 32)}  # (z, H/2, W/2): trained at 64x32 as drawn


def explicit_text_mass(q, k, n_txt, temperature=None):
    """softmax(T * q k^T / sqrt(d)) written out, summed over text keys, mean over image queries: (B, H)."""
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, L, L)
    if temperature is not None:
        T = as_temperature_matrix(temperature).double()  # (B|1, H|1, 2, 2) [query][key]: image queries, text keys
        logits[:, :, n_txt:, :n_txt] *= T[:, :, 1, 0, None, None]
        logits[:, :, :n_txt, :n_txt] *= T[:, :, 0, 0, None, None]
        logits[:, :, :n_txt, n_txt:] *= T[:, :, 0, 1, None, None]
        logits[:, :, n_txt:, n_txt:] *= T[:, :, 1, 1, None, None]
    return logits.softmax(-1)[:, :, n_txt:, :n_txt].sum(-1).mean(-1)


@pytest.mark.parametrize("gamma", [None, 1.3])
def test_probe_sizes_mass_equals_explicit_softmax(gamma):
    _, folder = built("flux")
    pipe = load(str(folder))
    blocks = [(name.rpartition(".")[0], m) for name, m in pipe.transformer.named_modules() if isinstance(m, JointAttention)]
    for width, height in ((32, 32), (64, 32)):
        seen = []  # (layer, q, k, n_txt, temperature) of every joint attention, by the test's own hooks

        def capture(layer):
            return lambda _, args: seen.append((layer, args[0].clone(), args[1].clone(), *args[3:]))

        handles = [m.register_forward_pre_hook(capture(layer)) for layer, m in blocks]
        try:
            got = probe_sizes.layer_mass(pipe, PROMPTS, [0, 1], (width, height), gamma, steps=2)
        finally:
            for h in handles:
                h.remove()
        explicit = {}
        for layer, q, k, n_txt, *temperature in seen:
            explicit.setdefault(layer, []).append(explicit_text_mass(q, k, n_txt, *temperature))  # (B, H) per step
        assert got.layers == list(explicit) == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
        want = [torch.stack(explicit[layer]).mean().item() for layer in got.layers]  # steps x prompts x seeds x heads
        assert got.mass == pytest.approx(want, rel=1e-5, abs=0)
        # the uniform share: text tokens of the encoder, image tokens of the latent's 2x2 patches
        context, *_ = pipe.encode_prompt(PROMPTS)
        f = pipe.autoencoder.params.downscale
        n_txt, n_img = context.shape[1], (height // f // 2) * (width // f // 2)
        assert (got.n_txt, got.n_img) == (n_txt, n_img) and got.uniform == n_txt / (n_txt + n_img)


@pytest.mark.filterwarnings("ignore:.*was trained at 32x32 only")
def test_probe_sizes_writes_table_csv_figure_and_section(tmp_path, monkeypatch, results_file):
    out = tmp_path / "probe"
    probe_sizes.main(["--sizes", "32x32", "64x32", "--prompts", "2", "--seeds", "1", "--steps", "2", "--out", str(out)])
    with open(out / "probe_sizes.csv") as f:
        rows = list(csv.DictReader(f))
    sizes = [(int(r["width"]), int(r["height"])) for r in rows]
    assert sizes[0] == (32, 32) and sizes[-1] == (64, 32) and len(rows) == 2 * len(set(r["layer"] for r in rows))
    for r in rows:  # the tiny model: 2x2 latent pixels per patch, 2 pixels per latent pixel
        assert int(r["n_img"]) == int(r["width"]) * int(r["height"]) // 16
        assert float(r["uniform"]) == pytest.approx(int(r["n_txt"]) / (int(r["n_txt"]) + int(r["n_img"])), rel=1e-5)
        assert float(r["taca"]) > float(r["plain"]) * 0.99 and r["gamma"] == "1.2"
    # the figure: two panels of one height on one value scale, each with its uniform share dashed at its height
    figure = Image.open(out / "probe_sizes.png").convert("RGB")
    panel_h = figure.height // 2
    ymax = 1.1 * max(max(float(r["plain"]), float(r["taca"]), float(r["uniform"])) for r in rows)
    for i, size in enumerate([(32, 32), (64, 32)]):
        uniform = float(next(r["uniform"] for r, s in zip(rows, sizes) if s == size))
        y = i * panel_h + round(probe_sizes.TOP + probe_sizes.PANEL_H * (1 - uniform / ymax))
        assert figure.getpixel((probe_sizes.LEFT + 2, y)) == probe_sizes.UNIFORM
        colors = set(figure.crop((0, i * panel_h, figure.width, (i + 1) * panel_h)).getdata())
        assert {probe_sizes.PLAIN, probe_sizes.TACA} <= colors
    text = results_file.read_text()
    assert text.startswith("# Benchmark results\n\n## Other\n\nkept\n\n" + probe_sizes.SECTION + "\n")
    first = rows[0]
    assert (f"| {first['layer']} | {float(first['plain']):.4f} | {float(first['taca']):.4f} | "
            f"{float(first['uniform']):.4f} |") in text
