"""A model folder's `sampling_defaults` can turn FLUX.1's true CFG on (`true_cfg`, `negative`): `generate`,
`mmdit sample` and `mmdit probe` then guide against the model's negative prompt unless told otherwise, and
record what they applied. Built on copies of the shipped tiny model (assets/tiny-flux, weights linked)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from convert.files import CheckpointError
from sampling import load_pipeline
from sampling.cli import main
from sampling.loading import DEFAULT_MODEL, folder_defaults
from sampling.pipeline import DEFAULTS, Defaults

PROMPT = "a red circle to the left of a blue square"
NEGATIVE = "a green triangle"  # a caption the tiny model knows (no unknown-word warning)
WEIGHTS = ("transformer/tiny-flux.safetensors", "text_encoder_2/model.safetensors")


def tiny_copy(folder: Path, **settings) -> Path:
    """The tiny model at `folder`, its weights linked, `settings` added to its sampling_defaults."""
    shutil.copytree(DEFAULT_MODEL, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    for f in WEIGHTS:
        (folder / f).symlink_to(DEFAULT_MODEL / f)
    index = json.loads((folder / "model_index.json").read_text())
    index["sampling_defaults"] |= settings
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{"plain": the tiny model without true CFG (a copy; as shipped it has true CFG 4.5), "cfg": with "true_cfg": 3.0,
    "cfg-negative": and a negative}."""
    work = tmp_path_factory.mktemp("model-defaults")
    return {"plain": tiny_copy(work / "plain", true_cfg=1.0, negative=""), "cfg": tiny_copy(work / "cfg", true_cfg=3.0),
            "cfg-negative": tiny_copy(work / "cfg-negative", true_cfg=3.0, negative=NEGATIVE)}


@pytest.fixture(scope="module")
def pipes(folders):
    return {name: load_pipeline(folder, dtype=torch.float32) for name, folder in folders.items()}


def latents(pipe, **kwargs):
    """The latents `generate` draws for PROMPT, and the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe.generate(PROMPT, steps=3, seed=7, output="latent", **kwargs)
    return out, [str(w.message) for w in caught]


def pixels(path: Path) -> torch.Tensor:
    return torch.tensor(list(Image.open(path).convert("RGB").getdata()))


def test_defaults_read_from_the_folder(pipes):
    assert pipes["cfg"].defaults.true_cfg == 3.0 and pipes["cfg"].defaults.negative == ""
    assert pipes["cfg-negative"].defaults.negative == NEGATIVE
    assert (pipes["plain"].defaults.true_cfg, pipes["plain"].defaults.negative) == (1.0, "")
    assert all((d.true_cfg, d.negative) == (1.0, "") for d in DEFAULTS.values())  # the real models: off


def test_generate_uses_the_models_true_cfg_against_the_empty_prompt(pipes):
    cfg, plain = pipes["cfg"], pipes["plain"]
    default, messages = latents(cfg)
    assert messages == []  # the model supplies the negative prompt: nothing to warn of
    explicit, _ = latents(cfg, true_cfg=3.0, negative_prompt="")
    assert torch.equal(default, explicit)
    off, messages = latents(cfg, true_cfg=1.0)
    assert messages == []
    assert (default - off).abs().max() > 1e-2  # CFG changed the image
    assert torch.equal(off, latents(plain)[0])  # true_cfg=1.0: the model without the default
    # another scale: the model's negative prompt at that scale
    assert torch.equal(latents(cfg, true_cfg=2.0)[0], latents(cfg, true_cfg=2.0, negative_prompt="")[0])
    # a negative prompt given: used at the model's scale
    negative, messages = latents(cfg, negative_prompt=NEGATIVE)
    assert messages == [] and torch.equal(negative, latents(plain, true_cfg=3.0, negative_prompt=NEGATIVE)[0])
    assert not torch.equal(negative, default)


def test_generate_uses_the_models_own_negative_prompt(pipes):
    cfg = pipes["cfg-negative"]
    default, messages = latents(cfg)
    assert messages == [] and torch.equal(default, latents(pipes["plain"], true_cfg=3.0, negative_prompt=NEGATIVE)[0])
    assert torch.equal(latents(cfg, negative_prompt="")[0], latents(pipes["cfg"])[0])  # "" given: used


def test_explicit_true_cfg_1_turns_it_off_and_a_negative_then_warns(pipes):
    off, messages = latents(pipes["cfg"], true_cfg=1.0, negative_prompt=NEGATIVE)
    assert messages == ["negative_prompt does nothing here: FLUX uses a negative prompt only with true CFG "
                        "(a true CFG scale above 1)"]
    assert torch.equal(off, latents(pipes["plain"])[0])


def test_a_model_without_the_default_is_unchanged(pipes):
    """Without the entry: no CFG unless asked for, and true CFG without a negative prompt still warns."""
    plain = pipes["plain"]
    assert torch.equal(latents(plain)[0], latents(plain, true_cfg=1.0)[0])
    out, messages = latents(plain, true_cfg=3.0)
    assert messages == ["true_cfg does nothing here: true CFG needs a negative prompt"]
    assert torch.equal(out, latents(plain)[0])


def sample(folder: Path, out: Path, *flags: str) -> Path:
    assert main(["sample", PROMPT, "--model", str(folder), "--steps", "3", "--seed", "5", *flags, "-o", str(out)]) == 0
    return out


def test_mmdit_sample_uses_and_records_the_models_true_cfg(folders, tmp_path, capsys):
    default = sample(folders["cfg"], tmp_path / "default.png")
    explicit = sample(folders["cfg"], tmp_path / "explicit.png", "--true-cfg", "3", "--negative", "")
    assert "warning" not in capsys.readouterr().err
    assert default.read_bytes() == explicit.read_bytes()  # the same pixels and the same text chunks
    text = Image.open(default).text
    assert (text["true_cfg"], text["negative"]) == ("3.0", "")
    off = sample(folders["cfg"], tmp_path / "off.png", "--true-cfg", "1")
    plain = sample(folders["plain"], tmp_path / "plain.png")
    assert torch.equal(pixels(off), pixels(plain)) and not torch.equal(pixels(off), pixels(default))
    without_model = {k: v for k, v in Image.open(off).text.items() if k != "model"}
    assert without_model == {k: v for k, v in Image.open(plain).text.items() if k != "model"}
    assert "true_cfg" not in without_model and "negative" not in without_model
    given = sample(folders["cfg"], tmp_path / "given.png", "--negative", NEGATIVE)  # at the model's scale
    assert (Image.open(given).text["true_cfg"], Image.open(given).text["negative"]) == ("3.0", NEGATIVE)
    assert torch.equal(pixels(given), pixels(sample(folders["plain"], tmp_path / "p.png", "--true-cfg", "3",
                                                    "--negative", NEGATIVE)))


def test_mmdit_sample_true_cfg_1_with_negative_warns_and_records_neither(folders, tmp_path, capsys):
    out = sample(folders["cfg"], tmp_path / "x.png", "--true-cfg", "1", "--negative", NEGATIVE)
    assert f"warning: --negative '{NEGATIVE}' does nothing on" in capsys.readouterr().err
    assert torch.equal(pixels(out), pixels(sample(folders["plain"], tmp_path / "plain.png")))
    assert "negative" not in Image.open(out).text and "true_cfg" not in Image.open(out).text


def test_mmdit_probe_records_the_models_true_cfg(folders, tmp_path):
    csv = tmp_path / "probe.csv"
    assert main(["probe", PROMPT, "--model", str(folders["cfg"]), "--steps", "2", "--seed", "5", "-o", str(csv)]) == 0
    text = Image.open(tmp_path / "probe-image.png").text
    assert (text["true_cfg"], text["negative"]) == ("3.0", "")


def test_prompt_file_lines_keep_their_negative_under_the_models_true_cfg(folders, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": PROMPT}, {"prompt": PROMPT, "negative": NEGATIVE}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    outdir = tmp_path / "out"
    assert main(["sample", "--prompts", str(prompts), "--outdir", str(outdir), "--seeds", "5",
                 "--model", str(folders["cfg"]), "--steps", "3"]) == 0
    manifest = [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]
    assert [(m["true_cfg"], m["negative"]) for m in manifest] == [("3.0", ""), ("3.0", NEGATIVE)]
    own = sample(folders["cfg"], tmp_path / "own.png")
    given = sample(folders["cfg"], tmp_path / "given.png", "--negative", NEGATIVE)
    files = [outdir / m["file"] for m in manifest]
    assert torch.equal(pixels(files[0]), pixels(own)) and torch.equal(pixels(files[1]), pixels(given))


@pytest.mark.parametrize("settings,message", [
    ({"true_cfg": 0.5}, "true_cfg is 0.5, expected a finite number >= 1"),
    ({"true_cfg": "nan"}, "true_cfg is 'nan', expected a finite number >= 1"),
    ({"true_cfg": float("nan")}, "true_cfg is nan, expected a finite number >= 1"),  # JSON NaN, as Python writes it
    ({"true_cfg": True}, "true_cfg is True, expected a finite number >= 1"),
    ({"true_cfg": 3.0, "negative": 3}, "negative is 3, expected a string"),
    ({"true_cfg": 3.0, "negative": None}, "negative is None, expected a string"),
    ({"true_cfg": 1.0, "negative": NEGATIVE}, f"negative is '{NEGATIVE}' but true_cfg is 1: the negative prompt is used only with true"),
])
def test_bad_true_cfg_settings_name_the_file_and_the_setting(tmp_path, settings, message):
    model = tiny_copy(tmp_path / "tiny", **settings)
    with pytest.raises(CheckpointError) as e:
        load_pipeline(model)
    assert str(e.value).startswith(f"{model / 'model_index.json'}: sampling_defaults: {message}")


@pytest.mark.parametrize("family", ["sd3", "flux2"])
def test_true_cfg_in_another_familys_folder_is_refused(tmp_path, family):
    index = tmp_path / "model_index.json"
    assert folder_defaults({"steps": 2, "guidance": 4.0}, family, index) == Defaults(2, 4.0)
    with pytest.raises(CheckpointError, match=rf"{index}: sampling_defaults: true_cfg and negative are FLUX.1's true "
                                              rf"CFG; this is a {family} model, whose CFG scale is guidance"):
        folder_defaults({"steps": 2, "guidance": 4.0, "true_cfg": 3.0}, family, index)
    assert folder_defaults({"steps": 2, "guidance": 4.0, "true_cfg": 3}, "flux", index).true_cfg == 3.0


def test_sample_help_says_the_default_is_the_models(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "FLUX: true CFG scale, with --negative or the model's own negative prompt (default: the model's, 1 = off)" \
        in help_text
