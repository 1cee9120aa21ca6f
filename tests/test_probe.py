"""The attention probe: its text mass equals explicit softmax weights, TACA raises it, and it changes nothing it watches."""

from __future__ import annotations

import csv
import math
from dataclasses import replace

import pytest
import torch
from builders import TINY_FLUX, randomize_, rel_err
from PIL import Image
from pipeline_builders import built

from mmdit.attention import JointAttention, as_temperature_matrix, attention
from mmdit.flux import Flux
from mmdit.probe import AttentionProbe, probe_attention, text_attention_mass
from mmdit.sd3 import PRESETS as SD3_PRESETS
from mmdit.sd3 import SD3
from sampling import TacaSchedule, load_pipeline
from sampling.cli import main
from sampling.loading import DEFAULT_MODEL
from sampling.probe import CELL, LEFT, RATIO_RANGE, color, grid_top

# SD3.5-Medium's tiny layout: qk-norm and an image-only attn2 in layer 0 (which the probe must skip)
TINY_SD3 = replace(SD3_PRESETS["sd3.5-medium"].tiny(), pos_embed_max_size=16, adm_in_channels=32, context_in_dim=64)
GENERAL = torch.tensor([[0.9, 1.1], [1.3, 0.8]])  # a full temperature matrix [query][key]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(family: str):
    """(model, inputs): a random tiny model, 2 samples, 5 text tokens, 4x6 latent."""
    g = torch.Generator().manual_seed(1)
    if family == "flux":
        model, pooled = Flux(TINY_FLUX), torch.randn(2, TINY_FLUX.vec_in_dim, generator=g)
        context = torch.randn(2, 5, TINY_FLUX.context_in_dim, generator=g)
    else:
        model, pooled = SD3(TINY_SD3), torch.randn(2, TINY_SD3.adm_in_channels, generator=g)
        context = torch.randn(2, 5, TINY_SD3.context_in_dim, generator=g)
    randomize_(model, seed=2).eval()
    x = torch.randn(2, 16, 4, 6, generator=g)
    return model, dict(x=x, t=torch.tensor([0.9, 0.4]), context=context, pooled=pooled, guidance=torch.full((2,), 3.5))


def explicit_text_mass(q, k, n_txt, temperature):
    """softmax(T * q k^T / sqrt(d)) written out, summed over text keys, mean over image queries: (B, H)."""
    L, D = q.shape[2], q.shape[3]
    logits = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(D)  # (B, H, L, L)
    if temperature is not None:
        T = as_temperature_matrix(temperature).double()  # (B|1, H|1, 2, 2)
        logits[:, :, :n_txt, :n_txt] *= T[:, :, 0, 0, None, None]
        logits[:, :, :n_txt, n_txt:] *= T[:, :, 0, 1, None, None]
        logits[:, :, n_txt:, :n_txt] *= T[:, :, 1, 0, None, None]
        logits[:, :, n_txt:, n_txt:] *= T[:, :, 1, 1, None, None]
    return logits.softmax(-1)[:, :, n_txt:, :n_txt].sum(-1).mean(-1)


@pytest.mark.parametrize("family", ["flux", "sd3"])
@pytest.mark.parametrize("temperature", [None, 1.5, GENERAL], ids=["plain", "taca1.5", "matrix"])
def test_probe_equals_explicit_softmax(family, temperature):
    model, inputs = tiny(family)
    joint = []  # (q, k, n_txt, temperature) of every joint attention, captured by the test's own hooks
    capture = [m.register_forward_pre_hook(lambda _, args: joint.append((args[0].clone(), args[1].clone(), *args[3:])))
               for m in model.modules() if isinstance(m, JointAttention)]
    with torch.no_grad(), probe_attention(model) as probe:
        model(**inputs, temperature=temperature)
        model(**inputs, temperature=temperature)
    for h in capture:
        h.remove()
    if family == "sd3":  # attn2 in layer 0 (image-only) is not a joint attention: not recorded
        assert probe.layers() == ["joint_blocks.0", "joint_blocks.1"]
    else:
        assert probe.layers() == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    per_call = len(joint) // 2
    assert [r.step for r in probe.records] == [0] * per_call + [1] * per_call and len(probe.records) == len(joint)
    for r, (q, k, n_txt, T) in zip(probe.records, joint):
        assert (r.n_txt, r.n_img, r.t) == (5, 6, pytest.approx(0.9))  # 4x6 latent: 2x3 patches
        assert r.text_mass.shape == (2, 2)
        assert rel_err(r.text_mass, explicit_text_mass(q, k, n_txt, T)) <= 1e-5


def test_taca_raises_the_text_mass():
    model, inputs = tiny("flux")
    masses = {}
    for gamma in (None, 1.5):
        with torch.no_grad(), probe_attention(model) as probe:
            model(**inputs, temperature=gamma)
        masses[gamma] = torch.stack([r.text_mass for r in probe.records])  # (layers, B, H)
    plain, taca = masses[None], masses[1.5]
    assert (taca[0] > plain[0]).all()  # first layer: same q and k, only gamma differs
    assert taca.mean() > 1.05 * plain.mean()


def test_mass_is_the_attention_weight_on_text():
    """For one query, the text mass is the weight the attention output gives to the text values."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(2))
    v = torch.zeros(1, 2, 9, 8)
    v[:, :, :3] = 1  # the same indicator as values: the attention output is the mass
    for T in (None, 1.3, torch.tensor([[1.0, 1.0], [0.7, 1.0]])):
        out = attention(q, k, v, 3, T).unflatten(-1, (2, 8))[:, 3:, :, 0].transpose(1, 2)  # (B, H, L_img)
        assert rel_err(text_attention_mass(q, k, 3, T), out) <= 1e-6


def test_calls_without_text_or_image_tokens_are_skipped():
    probe, g = AttentionProbe(), torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 6, 8, generator=g)
    probe.observe("joint_blocks.0", q, q, 0)  # image only (MMDiT-X's attn2)
    probe.observe("joint_blocks.0", q, q, 6, 1.2)  # text only
    assert probe.records == []


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_probe_changes_nothing_and_leaves_no_hooks(family):
    model, inputs = tiny(family)
    keys = model.state_dict().keys()

    def hooks():
        return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())

    with torch.no_grad():
        before = model(**inputs, temperature=1.2)
        with probe_attention(model):
            assert hooks() == 1 + len([m for m in model.modules() if isinstance(m, JointAttention)])
            during = model(**inputs, temperature=1.2)
        after = model(**inputs, temperature=1.2)
    assert torch.equal(before, during) and torch.equal(before, after)
    assert hooks() == 0 and not any("attention" in k.split(".") for k in keys)  # the hook points hold no weights
    with pytest.raises(RuntimeError), probe_attention(model):
        raise RuntimeError("an error inside the probe")
    assert hooks() == 0  # removed on errors too


def test_attention_compiles_without_a_graph_break():
    q = torch.randn(1, 2, 7, 8)
    compiled = torch.compile(attention, backend="eager", fullgraph=True)  # fullgraph: a break is an error
    assert torch.equal(compiled(q, q, q, 3, 1.2), attention(q, q, q, 3, 1.2))


def test_cli_writes_csv_and_png(tmp_path):
    _, folder = built("flux")
    out = tmp_path / "probe.csv"
    assert main(["probe", "a photo of a cat", "--model", str(folder), "--steps", "2", "--size", "32x48",
                 "--taca", "1.4", "--taca-until", "0.5", "--seed", "0", "-o", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    layers = ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    assert [(int(r["step"]), r["layer"]) for r in rows] == [(s, name) for s in range(2) for name in layers]
    assert list(rows[0])[:7] == ["step", "t", "layer", "n_txt", "n_img", "uniform", "text_mass"]
    # the same run through the Python API gives the same numbers (and TACA was on while t >= 0.5)
    pipe = load_pipeline(folder)
    with probe_attention(pipe.transformer) as probe:
        pipe.generate("a photo of a cat", height=48, width=32, steps=2, guidance=3.5, seed=0,
                      temperature=TacaSchedule(1.4, 0.5), output="latent")
    schedule = pipe.sigmas(2, 6, 4)
    for r, rec in zip(rows, probe.records):
        assert float(r["t"]) == pytest.approx(schedule[rec.step].item(), rel=1e-5)
        assert float(r["text_mass"]) == pytest.approx(rec.text_mass[-1].mean().item(), rel=1e-5)
        assert [float(r["head_0"]), float(r["head_1"])] == pytest.approx(rec.text_mass[-1].tolist(), rel=1e-5)
        assert int(r["n_img"]) == 6 and float(r["uniform"]) == pytest.approx(int(r["n_txt"]) / (int(r["n_txt"]) + 6))
    image = Image.open(out.with_suffix(".png"))
    assert image.text["taca"] == "gamma=1.4 until t=0.5" and image.text["steps"] == "2"
    # the heat map: steps x layers cells, the colour of a cell is its mass against the uniform share
    head, uniform = grid_top(layers), float(rows[0]["uniform"])
    for s, j in ((0, 0), (1, 3)):
        cell = image.convert("RGB").getpixel((LEFT + j * CELL + CELL // 2, head + s * CELL + CELL // 2))
        assert cell == color(float(rows[4 * s + j]["text_mass"]), uniform)
    # the image drawn beside them: what `mmdit sample` draws with the same flags and seed
    drawn = Image.open(tmp_path / "probe-image.png")
    (expected,) = pipe.generate("a photo of a cat", height=48, width=32, steps=2, guidance=3.5, seed=0,
                                temperature=TacaSchedule(1.4, 0.5))
    assert drawn.size == (32, 48) and drawn.text["seed"] == "0"
    assert drawn.convert("RGB").tobytes() == expected.tobytes()


def test_heat_map_colors_read_against_the_uniform_share():
    """One fixed scale for every map: white at the uniform share, full blue at 1/8 of it and below, full red at 8x."""
    uniform = 12 / 76
    assert color(uniform, uniform) == (255, 255, 255)
    assert color(uniform / RATIO_RANGE, uniform) == color(uniform / 100, uniform) == (33, 102, 172)
    assert color(uniform * RATIO_RANGE, uniform) == color(uniform * 100, uniform) == (178, 24, 43)
    half = color(uniform / RATIO_RANGE**0.5, uniform)  # half-way on the log scale
    assert half == tuple(round(255 + (b - 255) * 0.5) for b in (33, 102, 172))
    assert color(0.05, 0.1) == color(0.2, 0.4)  # a ratio to the uniform share, whatever the share


def test_plain_and_taca_maps_share_one_scale(tmp_path):
    """`mmdit probe` without and with --taca on the shipped model (default seed: random, as `mmdit sample`): the
    two heat maps' color bars are the same pixels, each cell is `color(its mass, uniform)`, and each run's image
    is what `generate` draws at the seed it recorded."""
    maps = {}
    for name, flags in (("plain", []), ("taca", ["--taca", "1.5", "--taca-until", "0"])):
        out = tmp_path / f"{name}.csv"
        assert main(["probe", "a red circle to the left of a blue square", "--steps", "2", *flags, "-o", str(out)]) == 0
        with open(out) as f:
            rows = list(csv.DictReader(f))
        heat, drawn = Image.open(out.with_suffix(".png")), Image.open(tmp_path / f"{name}-image.png")
        layers = list(dict.fromkeys(r["layer"] for r in rows))
        head, uniform = grid_top(layers), float(rows[0]["uniform"])
        assert uniform == pytest.approx(12 / (12 + 64), rel=1e-5)  # 12 text tokens, 16x16 latent in 2x2 patches
        for i, r in enumerate(rows):
            s, j = divmod(i, len(layers))
            cell = heat.convert("RGB").getpixel((LEFT + j * CELL + CELL // 2, head + s * CELL + CELL // 2))
            assert cell == color(float(r["text_mass"]), uniform)
        bar = LEFT + len(layers) * CELL + 14
        maps[name] = (heat.convert("RGB").crop((bar, head, bar + 13, head + 121)).tobytes(), rows)
        seed = int(drawn.text["seed"])
        assert heat.text["seed"] == drawn.text["seed"] and drawn.text["upscale"] == "x8 nearest"
        pipe = load_pipeline(DEFAULT_MODEL, dtype=torch.float32)  # what the CLI loads on a CPU
        (expected,) = pipe.generate("a red circle to the left of a blue square", steps=2, seed=seed,
                                    temperature=TacaSchedule(1.5, 0.0) if flags else None)
        assert drawn.size == (256, 256) and drawn.resize((32, 32), Image.Resampling.NEAREST).tobytes() == expected.tobytes()
    assert maps["plain"][0] == maps["taca"][0]  # the same scale: vmin, vmax and every shade between
    assert sum(float(r["text_mass"]) for r in maps["taca"][1]) > sum(float(r["text_mass"]) for r in maps["plain"][1])


def test_cli_sd3_with_cfg(tmp_path):
    _, folder = built("sd3")
    out = tmp_path / "sd3.csv"
    assert main(["probe", "a red dog", "--model", str(folder), "--steps", "2", "--size", "32x32", "-o", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["layer"]) for r in rows] == [(s, f"joint_blocks.{i}") for s in "01" for i in range(2)]
    assert all(0 < float(r["text_mass"]) < 1 for r in rows) and out.with_suffix(".png").exists()
