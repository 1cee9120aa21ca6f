"""The compositional evaluator: ground-truth renders score 1.0 in every category and size, wrong pictures score
low in exactly the category they get wrong; bootstrap intervals against known answers."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from benchmarks.compbench import (CATEGORIES, MIN_AREA, find, generate, labels, largest_region, load, main,
                                  relation_holds, score, summarize)
from benchmarks.stats import bootstrap_mean, category_intervals, paired_differences
from sampling import default_model, load_pipeline
from scripts.scenes import COLORS, Obj, Scene, heldout_prompts, render, to_tensor, training_scenes


def image(scene: Scene) -> torch.Tensor:
    return to_tensor(render(scene))


def test_ground_truth_scores_one():
    scenes = training_scenes(per_layout=1, per_object=2, seed=7)
    scores = [score(image(s), s.caption) for s in scenes]
    assert summarize(scores) == {"color": 1.0, "shape": 1.0, "spatial": 1.0, "all": 1.0}
    assert len(scenes) > 600


def swap(scene: Scene, **changes) -> Scene:
    a, b = scene.objects
    return Scene((dataclasses.replace(a, **changes.get("a", {})), dataclasses.replace(b, **changes.get("b", {}))),
                 scene.relation)


def test_wrong_pictures_score_low_in_their_category():
    pairs = [s for s in training_scenes(per_layout=1, per_object=0, seed=3) if s.objects[0].shape != s.objects[1].shape][::9]
    assert len(pairs) > 20
    cases = {"colors swapped": [], "positions swapped": [], "wrong shape": [], "one missing": [], "blank": []}
    for s in pairs:
        a, b = s.objects
        cases["colors swapped"].append((swap(s, a={"color": b.color}, b={"color": a.color}), s.caption))
        cases["positions swapped"].append((swap(s, a={"cx": b.cx, "cy": b.cy}, b={"cx": a.cx, "cy": a.cy}), s.caption))
        other = next(x for x in ("circle", "square", "triangle") if x != a.shape)
        cases["wrong shape"].append((swap(s, a={"shape": other}), s.caption))
        cases["one missing"].append((Scene((a,)), s.caption))
        cases["blank"].append((Scene(()), s.caption))
    got = {k: summarize([score(image(scene), cap) for scene, cap in v]) for k, v in cases.items()}
    # colors swapped: both colors are there, but bound to the wrong shapes and places
    assert got["colors swapped"]["color"] == 1.0 and got["colors swapped"]["shape"] == 0.0
    assert got["colors swapped"]["spatial"] == 0.0 and got["colors swapped"]["all"] == 0.0
    assert got["positions swapped"] == {"color": 1.0, "shape": 1.0, "spatial": 0.0, "all": 0.0}
    assert got["wrong shape"] == {"color": 1.0, "shape": 0.5, "spatial": 1.0, "all": 0.0}
    assert got["one missing"] == {"color": 0.5, "shape": 0.5, "spatial": 0.0, "all": 0.0}
    assert got["blank"] == {"color": 0.0, "shape": 0.0, "spatial": 0.0, "all": 0.0}


def test_noise_and_blur_are_not_objects():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 32, 32, generator=g)
    assert summarize([score(noise, p) for p in heldout_prompts()[:10]])["all"] == 0.0
    s = Scene((Obj("red", "square", 16, 16, 12),))
    washed = image(s) * 0.3 + 0.7  # pale pink: too far from red to count
    assert score(washed, s.caption)["color"] == 0.0


def test_regions_shapes_and_relations():
    s = Scene((Obj("blue", "circle", 8.0, 10.0, 11), Obj("green", "triangle", 24.0, 12.0, 12)), "to the left of")
    lm = labels(image(s))
    a, b = find(lm, "blue"), find(lm, "green")
    assert (a.shape, b.shape) == ("circle", "triangle")
    assert abs(a.cx - 7.5) <= 1 and abs(a.cy - 9.5) <= 1 and a.width == a.height == 11
    assert relation_holds(a, "to the left of", b) and relation_holds(b, "to the right of", a)
    assert not relation_holds(a, "above", b) and not relation_holds(a, "below", b)
    assert find(lm, "red") is None
    grid = [[True, True, False, True], [False, False, False, True], [True, True, True, True]]
    assert sorted(largest_region(grid)) == [(0, 3), (1, 3), (2, 0), (2, 1), (2, 2), (2, 3)]
    # the same scene drawn 8x larger scores the same (areas scale with the image)
    big = torch.nn.functional.interpolate(image(s)[None], scale_factor=8, mode="nearest")[0]
    assert score(big, s.caption) == score(image(s), s.caption) == {"color": 1.0, "shape": 1.0, "spatial": 1.0, "all": 1.0}


@pytest.mark.parametrize("width, height", [(64, 64), (64, 32), (32, 64), (96, 64)])
def test_ground_truth_scores_one_at_other_sizes(width, height):
    scenes = training_scenes(per_layout=1, per_object=1, seed=5, width=width, height=height)[::5]
    assert len(scenes) > 100 and image(scenes[0]).shape == (3, height, width)
    scores = [score(image(s), s.caption) for s in scenes]
    assert summarize(scores) == {"color": 1.0, "shape": 1.0, "spatial": 1.0, "all": 1.0}


def test_min_area_scales_with_the_shape_scale_not_the_canvas():
    """MIN_AREA * k**2 pixels, k = min(W, H) / 32: a region one pixel short of it is no object, one at it is."""
    red = 1 + list(COLORS).index("red")
    for (height, width), k in (((32, 32), 1), ((32, 64), 1), ((64, 32), 1), ((64, 64), 2), ((64, 96), 2)):
        need = MIN_AREA * k**2
        for area, found in ((need - 1, False), (need, True)):
            label_map = torch.full((height, width), -1)
            label_map.view(-1)[:area] = red  # a run of pixels along the first rows: one 4-connected region
            assert (find(label_map, "red") is not None) == found, (height, width, area)


def test_bootstrap_interval_of_constant_data_has_zero_width():
    iv = bootstrap_mean([0.5] * 40)
    assert (iv.mean, iv.low, iv.high, iv.n) == (0.5, 0.5, 0.5, 40)
    assert iv.excludes_zero() and not bootstrap_mean([0.0] * 5).excludes_zero()
    assert str(iv) == "0.500 [0.50, 0.50]"


def test_bootstrap_interval_of_bernoulli_matches_the_normal_approximation():
    p, n = 0.3, 2000
    g = torch.Generator().manual_seed(11)
    x = (torch.rand(n, generator=g) < p).double().tolist()
    iv = bootstrap_mean(x, seed=3)
    assert iv.low < p < iv.high and iv.low < iv.mean < iv.high
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # the normal approximation's half-width
    assert (iv.high - iv.low) / 2 == pytest.approx(half, rel=0.2)
    assert iv == bootstrap_mean(x, seed=3)  # seeded: the same data gives the same interval
    assert math.isnan(bootstrap_mean([]).mean) and bootstrap_mean([]).n == 0


def test_paired_difference_intervals():
    rng = random.Random(0)
    base = [{"color": rng.random(), "shape": float(rng.random() < 0.5), "spatial": None, "all": 0.0} for _ in range(300)]
    # every item 0.1 higher in color: the paired interval is exactly [0.1, 0.1], though the items spread
    # over [0, 1] (two separate intervals overlap widely)
    other = [dict(b, color=b["color"] + 0.1) for b in base]
    diff = paired_differences(base, other, CATEGORIES)
    assert diff["color"].mean == pytest.approx(0.1) and diff["color"].high - diff["color"].low < 1e-12
    assert diff["color"].excludes_zero() and diff["color"].signed() == "+0.100 [+0.10, +0.10]"
    assert (diff["shape"].low, diff["shape"].high) == (0.0, 0.0) and not diff["shape"].excludes_zero()
    assert diff["spatial"].n == 0 and math.isnan(diff["spatial"].mean)  # no item scores it
    separate = category_intervals(base, CATEGORIES)["color"]
    assert separate.high - separate.low > 0.05
    # independent Bernoulli(0.5) flips of shape: the mean difference's interval is that of the differences
    flipped = [dict(b, shape=float(rng.random() < 0.5)) for b in base]
    d = paired_differences(base, flipped, CATEGORIES)["shape"]
    diffs = [f["shape"] - b["shape"] for b, f in zip(base, flipped)]
    assert d == bootstrap_mean(diffs)
    assert (d.high - d.low) / 2 == pytest.approx(1.96 * math.sqrt(0.5 / 300), rel=0.2)  # var of a difference: 1/2
    with pytest.raises(ValueError, match="same items"):
        paired_differences(base, other[:-1], CATEGORIES)


def test_load_is_float32_on_the_cpu_and_half_precision_is_warned_of():
    assert next(load().transformer.parameters()).dtype == torch.float32
    half = load_pipeline(default_model())  # the file's own dtype
    assert next(half.transformer.parameters()).dtype == torch.float16
    with pytest.warns(UserWarning, match="float16 on the CPU"):
        generate(half, ["a red circle"], [0], steps=1)


@pytest.mark.parametrize("flag", [["--seeds", "0"], ["--steps", "0"]])
def test_main_refuses_no_images(flag, capsys):
    """No seed or no step would score nothing (NaN): an error before any work, exit status 2."""
    with pytest.raises(SystemExit) as stop:
        main(flag)
    assert stop.value.code == 2 and "--seeds and --steps must be at least 1" in capsys.readouterr().err
