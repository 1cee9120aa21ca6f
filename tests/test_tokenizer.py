"""The tokenizers against transformers' (test-only oracle), token for token, on tiny vocabularies built here.

CLIP: a byte-level BPE trained with `tokenizers` on a small corpus, written in CLIP's layout (the 256
byte symbols, the same with `</w>`, one symbol per merge, then `<|startoftext|>`, `<|endoftext|>`).
T5: a unigram sentencepiece model trained on a small corpus with T5's special pieces (pad 0, eos 1, unk 2).
Padding and truncation as Diffusers' pipelines call them: `padding="max_length", truncation=True`.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch

from mmdit.tokenizer import CLIPTokenizer, T5Tokenizer

WORDS = (
    "a photo of the cat dog sitting on red blue green chair table under over bright sunny day night city "
    "portrait painting oil style highly detailed cinematic lighting astronaut riding horse mars café naïve "
    "résumé Zürich straße Ελλάδα москва 東京 日本語 🙂 🐱 4k 8k 1024 3.5 "
    "it's don't we're they've I'm you'll he'd"
).split()

AWKWARD = [
    "",
    "a photo of a cat",
    "A PHOTO of a Cat, MiXeD CaSe!!",
    "   leading and   repeated\twhitespace\n\nnewlines   ",
    "Café naïve résumé Zürich straße — “quotes” and ‘single’ «guillemets»",
    "emoji 🙂🐱🚀 and ZWJ 👩‍👩‍👧 and flags 🇫🇷",
    "東京 日本語 москва Ελλάδα عربى हिन्दी",
    "punctuation: a.b,c;d!e?f...(g)[h]{i}<j>/k\\l|m@n#o$p%q^r&s*t+u=v~w`x",
    "numbers 1024x768 3.14159 1,000,000 4k",
    "it's don't WE'RE they've I'M you'll he'd",
    "tokens <|startoftext|> inside <|endoftext|> text",
    "e\u0301 decomposed accents vs \u00e9 composed",
    "non\u00a0breaking\u2003spaces and zero\u200bwidth",
    " ".join(WORDS * 6),  # far longer than 77 tokens
]


def _byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in the order of CLIP's first 256 vocabulary entries."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(others))]


def _corpus(n: int, seed: int) -> list[str]:
    """Sentences of the words above and of made-up words (syllables), for a vocabulary of a few hundred."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]

    def word():
        w = rng.choice(WORDS) if rng.random() < 0.5 else "".join(rng.choices(syllables, k=rng.randint(1, 3)))
        return w.upper() if rng.random() < 0.1 else w.capitalize() if rng.random() < 0.2 else w

    return [" ".join(word() for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    """A tiny CLIP-style vocab.json + merges.txt, in the real files' layout."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE

    from mmdit.tokenizer import CLIP_PATTERN

    alphabet = _byte_alphabet()
    tok = Tokenizer(BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=900, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    tok.train_from_iterator(_corpus(400, 0), trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    symbols = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
    d = tmp_path_factory.mktemp("clip_tok")
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    assert len(merges) > 100 and vocab["!"] == 0
    return d


@pytest.fixture(scope="module")
def spiece_file(tmp_path_factory):
    """A tiny unigram sentencepiece model with T5's special pieces."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("t5_tok")
    (d / "corpus.txt").write_text("\n".join(_corpus(2000, 1)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=300, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=0.98, minloglevel=2,
    )
    return d / "spiece.model"


def _proto_fields(buf: bytes):
    """(field number, value) pairs of one protobuf message (varints, 32-bit floats, length-delimited bytes)."""
    i = 0

    def varint():
        nonlocal i
        v = shift = 0
        while True:
            b = buf[i]
            i += 1
            v |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return v

    while i < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire == 5:
            yield field, struct.unpack("<f", buf[i : i + 4])[0]
            i += 4
        elif wire == 1:
            i += 8
        elif wire == 2:
            n = varint()
            yield field, buf[i : i + n]
            i += n
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")


def _hf_t5(spiece_model):
    """transformers' T5 tokenizer from a spiece.model, built as its sentencepiece converter builds it.

    (`T5Tokenizer.from_pretrained` reads the model with protobuf, not installed here: the pieces, scores
    and normalization table are read off the model's protobuf by hand.)
    """
    import transformers

    proto = dict(_proto_fields(spiece_model.read_bytes()))  # last occurrence of each field
    pieces = [dict(_proto_fields(m)) for f, m in _proto_fields(spiece_model.read_bytes()) if f == 1]
    vocab = [(p[1].decode("utf-8"), p.get(2, 0.0)) for p in pieces]
    charsmap = dict(_proto_fields(proto[3])).get(2)  # normalizer_spec.precompiled_charsmap
    return transformers.T5Tokenizer(vocab=vocab, _spm_precompiled_charsmap=charsmap)


@pytest.mark.parametrize("pad", ["eos", "!"])
def test_clip_matches_transformers(clip_files, pad):
    """pad "!": transformers' own `pad_token="!"` would also turn every "!" typed in a prompt into the pad
    token (id 0), where CLIP's BPE (and SAI's reference) reads "!" as text; so the reference pads with EOS
    and its padding is set to 0."""
    import transformers

    hf = transformers.CLIPTokenizer.from_pretrained(str(clip_files))
    ours = CLIPTokenizer.from_files(clip_files / "vocab.json", clip_files / "merges.txt", pad=pad)
    with pytest.warns(UserWarning, match=r"CLIP prompt truncated to 77 tokens: \d+ token\(s\) dropped"):
        ids = ours(AWKWARD)
    ref = hf(AWKWARD, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    ref = ref.input_ids if pad == "eos" else ref.input_ids.masked_fill(ref.attention_mask == 0, 0)
    assert ids.shape == (len(AWKWARD), 77) and ids.dtype == torch.long
    for i, prompt in enumerate(AWKWARD):
        assert ids[i].tolist() == ref[i].tolist(), prompt
    vocab = json.loads((clip_files / "vocab.json").read_text(encoding="utf-8"))
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    assert ids[0, :3].tolist() == [bos, eos, eos if pad == "eos" else 0]  # the empty prompt
    assert ids[-1, -1].item() == eos  # truncated, EOS kept last
    assert len(set(ids[1].tolist()) - {bos, eos, 0}) >= 3  # real tokens, not all unknown


def test_clip_pad_and_length_options(clip_files):
    vocab, merges = clip_files / "vocab.json", clip_files / "merges.txt"
    eos = json.loads(vocab.read_text(encoding="utf-8"))["<|endoftext|>"]
    short = CLIPTokenizer.from_files(vocab, merges, pad=7, max_length=8)("a cat")
    assert short.shape == (1, 8) and short[0, -1].item() == 7 and eos in short[0].tolist()
    with pytest.raises(ValueError, match="pad token 'zzz' is not in the vocabulary"):
        CLIPTokenizer.from_files(vocab, merges, pad="zzz")


@pytest.mark.parametrize("max_length", [256, 32])
def test_t5_matches_transformers(spiece_file, tmp_path, max_length):
    hf = _hf_t5(spiece_file)
    hf.save_pretrained(tmp_path)  # writes the tokenizer.json that Diffusers-format repos ship
    ref = hf(AWKWARD, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
    for path in (spiece_file, tmp_path / "tokenizer.json"):
        ours = T5Tokenizer.from_file(path, max_length=max_length)
        with pytest.warns(UserWarning, match=rf"T5 prompt truncated to {max_length} tokens: \d+ token\(s\) dropped"):
            ids = ours(AWKWARD)
        assert ids.shape == (len(AWKWARD), max_length) and ids.dtype == torch.long
        for i, prompt in enumerate(AWKWARD):
            assert ids[i].tolist() == ref[i].tolist(), (path.name, prompt)
    assert ids[0, :2].tolist() == [1, 0]  # the empty prompt: EOS, then padding
    assert ids[-1, -1].item() == 1  # truncated, EOS kept last


def test_t5_truncation_count(spiece_file):
    ours = T5Tokenizer.from_file(spiece_file, max_length=8)
    n = len(ours.encode(["a photo of the cat sitting on the red chair"])[0])
    with pytest.warns(UserWarning, match=rf"{n - 7} token\(s\) dropped"):
        ids = ours("a photo of the cat sitting on the red chair")
    assert ids[0].tolist() == ours.encode(["a photo of the cat sitting on the red chair"])[0][:7] + [1]
    with pytest.raises(FileNotFoundError, match="no such file"):
        T5Tokenizer.from_file(spiece_file.parent / "missing.model")


def test_load_tokenizer_folders(clip_files, spiece_file, tmp_path):
    """Diffusers-format folders: `tokenizer/` (pad EOS), SD3's `tokenizer_2/` (pad "!"), T5 (`tokenizer_3/`)."""
    import shutil

    from convert import load_tokenizer

    prompts = ["a photo of a cat!", "Zürich at night"]
    clip = CLIPTokenizer.from_files(clip_files / "vocab.json", clip_files / "merges.txt")
    for name, config, pad in [
        ("tokenizer", {"pad_token": "<|endoftext|>", "model_max_length": 77}, "eos"),
        ("tokenizer_2", {"pad_token": {"content": "!", "special": True}, "model_max_length": 77}, "!"),
    ]:
        d = tmp_path / name
        d.mkdir()
        for f in ("vocab.json", "merges.txt"):
            shutil.copy(clip_files / f, d / f)
        (d / "tokenizer_config.json").write_text(json.dumps(config))
        tok = load_tokenizer(d)
        assert isinstance(tok, CLIPTokenizer) and tok.max_length == 77
        assert torch.equal(tok(prompts), CLIPTokenizer.from_files(d / "vocab.json", d / "merges.txt", pad=pad)(prompts))
        assert tok.pad == (clip.eos if pad == "eos" else 0)

    d = tmp_path / "tokenizer_3"
    d.mkdir()
    shutil.copy(spiece_file, d / "spiece.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    tok = load_tokenizer(d)
    assert isinstance(tok, T5Tokenizer) and tok.max_length == 256
    assert torch.equal(tok(prompts), T5Tokenizer.from_file(spiece_file, 256)(prompts))
    assert load_tokenizer(d, max_length=512)(prompts).shape == (2, 512)

    _hf_t5(spiece_file).save_pretrained(tmp_path / "fast")  # tokenizer.json only (no spiece.model)
    (tmp_path / "fast" / "spiece.model").unlink(missing_ok=True)
    assert torch.equal(load_tokenizer(tmp_path / "fast", max_length=256)(prompts), tok(prompts))

    with pytest.raises(ValueError, match="not a tokenizer this project reads"):
        load_tokenizer(tmp_path / "fast" / "tokenizer_config.json")


def test_t5_tokenizer_json_with_saved_padding_is_framed_by_us(spiece_file, tmp_path):
    """A tokenizer.json may carry padding/truncation settings (saved after a padded call): they are ignored."""
    from tokenizers import Tokenizer

    hf = _hf_t5(spiece_file)
    hf.save_pretrained(tmp_path)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.enable_padding(length=64)
    tok.enable_truncation(max_length=5)
    tok.save(str(tmp_path / "padded.json"))
    ref = hf(AWKWARD[:4], padding="max_length", max_length=32, truncation=True, return_tensors="pt").input_ids
    with pytest.warns(UserWarning, match="truncated to 32 tokens"):  # the saved truncation (5) is not used
        ours = T5Tokenizer.from_file(tmp_path / "padded.json", max_length=32)(AWKWARD[:4])
    assert ours.tolist() == ref.tolist()
