"""Ordinary input on the shipped tiny model: prompts typed as people type them give the tokens (and pixels) of
the caption they mean, unknown words are named in one warning, and a size it was not trained at warns."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from convert import load_tokenizer
from convert.files import CheckpointError
from mmdit.caption_tokenizer import CaptionTokenizer, normalize_caption
from mmdit.tokenizer import T5Tokenizer
from sampling import load_pipeline
from sampling.cli import main
from sampling.loading import DEFAULT_MODEL
from sampling.pipeline import DEFAULTS
from scripts.train_tiny import SAMPLING_DEFAULTS, all_captions

PROMPT = "a red circle to the left of a blue square"
TOKENIZER = DEFAULT_MODEL / "tokenizer_2"
TYPED = [  # (as typed, the caption meant)
    ("A red circle to the left of a blue square.", PROMPT),
    ("A RED CIRCLE TO THE LEFT OF A BLUE SQUARE!", PROMPT),
    ("a red circle left of a blue square", PROMPT),
    ("red circle left of blue square", PROMPT),
    ("The red circle, on the left of the blue square...", PROMPT),
    ("  a red circle to the left side of a blue square ", PROMPT),
    ("a green triangle right of the yellow square", "a green triangle to the right of a yellow square"),
    ("An purple square above the red triangle?", "a purple square above a red triangle"),
    ("Blue circle below a green square", "a blue circle below a green square"),
    ("The Yellow Triangle.", "a yellow triangle"),
]


def recorded(f):
    """f()'s result and the messages of the warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = f()
    return out, [str(w.message) for w in caught]


def test_the_training_captions_are_unchanged_and_tokenized_as_in_training():
    """Every caption of the grammar is already normal, and gets the ids the model was trained on (T5's)."""
    tok, t5 = load_tokenizer(TOKENIZER), T5Tokenizer.from_file(TOKENIZER / "spiece.model", 12)
    assert isinstance(tok, CaptionTokenizer) and tok.max_length == 12
    captions = all_captions()
    assert len(captions) > 500 and all(normalize_caption(c) == c for c in captions)
    ids, messages = recorded(lambda: tok(captions))
    assert torch.equal(ids, t5(captions)) and messages == []


@pytest.mark.parametrize("typed, meant", TYPED)
def test_typed_prompts_give_the_tokens_of_the_caption_they_mean(typed, meant):
    tok = load_tokenizer(TOKENIZER)
    assert normalize_caption(typed) == meant
    ids, messages = recorded(lambda: tok(typed))
    assert torch.equal(ids, T5Tokenizer.from_file(TOKENIZER / "spiece.model", 12)(meant)) and messages == []


def test_typed_prompt_draws_the_pixels_of_the_caption():
    pipe = load_pipeline(DEFAULT_MODEL, dtype=torch.float32)
    kw = dict(steps=3, seed=1, output="tensor")
    typed = pipe.generate("The RED circle, left of the blue square.", **kw)
    assert torch.equal(typed, pipe.generate(PROMPT, **kw))
    pipe.tokenizers["t5"] = T5Tokenizer.from_file(TOKENIZER / "spiece.model", 12)  # the tokenizer without normalizing
    assert not torch.equal(typed, pipe.generate("The RED circle, left of the blue square.", **kw))


def test_unknown_words_are_named_in_one_warning():
    tok = load_tokenizer(TOKENIZER)
    prompts = ["a big red circle next to a blue square", "a tiny green square next to a big red circle"]
    ids, messages = recorded(lambda: tok(prompts))
    assert len(messages) == 1
    (message,) = messages
    assert "3 prompt word(s) the model never saw, read as <unk>: 'big', 'next', 'tiny';" in message
    assert message.endswith("it knows 16: a above below blue circle green left of purple red right square the to "
                            "triangle yellow")
    plain = T5Tokenizer.from_file(TOKENIZER / "spiece.model", 12)
    assert torch.equal(ids, plain([normalize_caption(p) for p in prompts]))
    unk = plain("big")[0, 0].item()
    assert unk == 2 and ids[0, 1] == unk and ids[0, 4] == unk  # "a <unk> red circle <unk> to a blue square"


def test_the_tokenizer_config_says_which_tokenizer(tmp_path):
    """Without "normalize_prompts" the same vocabulary is read by the plain T5 tokenizer (the real models' path:
    nothing rewritten, nothing warned); an unknown normalizer is an error naming the file and the field."""
    folder = tmp_path / "tokenizer_2"
    shutil.copytree(TOKENIZER, folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 12}))
    plain = load_tokenizer(folder)
    assert type(plain) is T5Tokenizer
    ids, messages = recorded(lambda: plain("A red circle."))
    assert messages == [] and not torch.equal(ids, load_tokenizer(TOKENIZER)("a red circle"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 12, "normalize_prompts": "lower"}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: field 'normalize_prompts' is 'lower', expected "
                                              r"one of 'captions'"):
        load_tokenizer(folder)


def test_a_size_it_was_not_trained_at_warns_naming_the_sizes_it_was():
    pipe = load_pipeline(DEFAULT_MODEL, dtype=torch.float32)
    trained = SAMPLING_DEFAULTS["trained_sizes"]  # "32x32", "64x64", "64x32", "32x64"
    assert pipe.defaults.trained_sizes == tuple(tuple(map(int, s.split("x"))) for s in trained)
    assert DEFAULTS["flux-dev"].trained_sizes == ()
    for width, height in pipe.defaults.trained_sizes:
        _, messages = recorded(lambda: pipe.generate(PROMPT, height=height, width=width, steps=1, output="latent"))
        assert messages == []
    latents, messages = recorded(lambda: pipe.generate(PROMPT, height=48, width=64, steps=1, output="latent"))
    assert latents.shape == (1, 12, 24, 32)  # drawn, at the size asked for
    assert messages == [f"{DEFAULT_MODEL} was trained at {', '.join(trained)} only (WIDTHxHEIGHT; "
                        "sampling_defaults.trained_sizes in its model_index.json): at 64x48 it draws poorly, often an "
                        "almost blank canvas"]


def test_mmdit_sample_at_another_size_warns(tmp_path):
    with pytest.warns(UserWarning, match=r"trained at 32x32, 64x64, 64x32, 32x64 only .* at 48x48 it draws poorly"):
        assert main(["sample", PROMPT, "--size", "48x48", "--steps", "1", "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()


@pytest.mark.parametrize("sizes", [["32"], ["0x32"], [32], "32x32x1"])
def test_bad_trained_sizes_name_the_file(tmp_path, sizes):
    model = tmp_path / "tiny"
    shutil.copytree(DEFAULT_MODEL, model, ignore=shutil.ignore_patterns("*.safetensors"))
    for f in ("transformer/tiny-flux.safetensors", "text_encoder_2/model.safetensors"):
        (model / f).symlink_to(DEFAULT_MODEL / f)
    index = json.loads((model / "model_index.json").read_text())
    index["sampling_defaults"]["trained_sizes"] = sizes
    (model / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{model / 'model_index.json'}: sampling_defaults: trained_sizes holds"):
        load_pipeline(model)
