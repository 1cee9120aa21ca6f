"""The compositional evaluator: ground-truth renders score 1.0 in every category, wrong pictures score
low in exactly the category they get wrong."""

from __future__ import annotations

import dataclasses

import torch

from benchmarks.compbench import find, labels, largest_region, relation_holds, score, summarize
from scripts.scenes import Obj, Scene, heldout_prompts, render, to_tensor, training_scenes


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
