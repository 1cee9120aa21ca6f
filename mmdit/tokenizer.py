"""The prompt tokenizers: CLIP's byte-level BPE and T5's sentencepiece unigram, padded as the pipelines pad.

CLIP (OpenAI's BPE, `vocab.json` + `merges.txt`) runs on the `tokenizers` library, set up as the
original: NFC, runs of whitespace -> one space, lowercase; split by CLIP's regex (contractions,
letter runs, single digits, runs of other symbols); GPT-2's byte-to-unicode alphabet; BPE words end
with `</w>`. Deviation from OpenAI's `simple_tokenizer`: no `ftfy` / HTML-unescape clean-up, the same
as the `tokenizers`-based CLIP tokenizer that Diffusers' pipelines use. Output: `BOS ... EOS` then
padding (CLIP-L pads with EOS, SD3's bigG tokenizer with "!", id 0), 77 tokens. A "!" typed in a prompt
stays text (`!</w>`, as in SAI's reference); transformers' tokenizer with `pad_token="!"` (Diffusers' SD3
`tokenizer_2`) would turn it into id 0 as well.

T5 reads `spiece.model` with sentencepiece or `tokenizer.json` with `tokenizers`: `ids </s>` then
`<pad>` (id 0) up to `max_length` (FLUX dev 512, schnell 256, SD3 256). The two agree (tested on awkward text),
except that `tokenizer.json` knows T5's sentinels (`<extra_id_N>` typed in a prompt is one token there,
plain text for sentencepiece).

Prompts too long are truncated, keeping the final EOS, with a warning naming how many tokens were dropped.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import sentencepiece
import torch
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from torch import Tensor

# CLIP's pre-tokenization regex (OpenAI's `simple_tokenizer.pat`)
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_EOS, T5_PAD = "</s>", "<pad>"


def frame(
    tokens: list[list[int]], max_length: int, eos: int, pad: int, bos: int | None = None, what: str = "prompt"
) -> Tensor:
    """`[bos] ids [eos] pad...` per prompt, as a (B, max_length) LongTensor; long prompts are truncated, EOS kept."""
    room = max_length - 1 - (bos is not None)
    rows = []
    for ids in tokens:
        if len(ids) > room:
            warnings.warn(
                f"{what} truncated to {max_length} tokens: {len(ids) - room} token(s) dropped", stacklevel=3
            )
            ids = ids[:room]
        row = ([bos] if bos is not None else []) + ids + [eos]
        rows.append(row + [pad] * (max_length - len(row)))
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_length)


def _prompts(prompts: str | list[str]) -> list[str]:
    return [prompts] if isinstance(prompts, str) else list(prompts)


class CLIPTokenizer:
    """CLIP BPE: `tok(prompts) -> (B, max_length)` ids, `BOS ... EOS` then the pad id."""

    def __init__(
        self, vocab: dict[str, int], merges: list[tuple[str, str]], pad: str | int = "eos", max_length: int = 77
    ):
        for special in (CLIP_BOS, CLIP_EOS):
            if special not in vocab:
                raise ValueError(f"CLIP vocabulary lacks the special token {special!r}")
        self.bos, self.eos = vocab[CLIP_BOS], vocab[CLIP_EOS]
        if pad == "eos":
            self.pad = self.eos
        elif isinstance(pad, int):
            self.pad = pad
        elif pad in vocab:
            self.pad = vocab[pad]
        else:
            raise ValueError(f"CLIP pad token {pad!r} is not in the vocabulary")
        self.max_length = max_length
        self.tok = Tokenizer(
            BPE(vocab=vocab, merges=merges, unk_token=CLIP_EOS, continuing_subword_prefix="", end_of_word_suffix="</w>")
        )
        self.tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        self.tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),  # keep the matches only
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # bytes -> GPT-2's unicode alphabet
        ])
        # BOS/EOS typed in a prompt are the special tokens, not text
        self.tok.add_special_tokens([CLIP_BOS, CLIP_EOS])

    @classmethod
    def from_files(
        cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike, pad: str | int = "eos", max_length: int = 77
    ) -> "CLIPTokenizer":
        vocab = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        lines = Path(merges_txt).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"{merges_txt}: merge lines must hold two symbols, got {' '.join(bad[0])!r}")
        return cls(vocab, merges, pad=pad, max_length=max_length)

    def __call__(self, prompts: str | list[str]) -> Tensor:
        enc = self.tok.encode_batch(_prompts(prompts), add_special_tokens=False)
        return frame([e.ids for e in enc], self.max_length, self.eos, self.pad, self.bos, "CLIP prompt")


class T5Tokenizer:
    """T5 sentencepiece: `tok(prompts) -> (B, max_length)` ids, `ids </s>` then `<pad>` (0)."""

    def __init__(self, encode, eos: int, pad: int, max_length: int):
        self.encode, self.eos, self.pad, self.max_length = encode, eos, pad, max_length

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int = 512) -> "T5Tokenizer":
        """`spiece.model` (read with sentencepiece) or `tokenizer.json` (read with tokenizers)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        if path.suffix == ".json":
            tok = Tokenizer.from_file(str(path))
            tok.no_padding()  # a saved tokenizer.json may carry padding / truncation settings: we frame ids ourselves
            tok.no_truncation()
            ids = {t: tok.token_to_id(t) for t in (T5_EOS, T5_PAD)}

            def encode(prompts):
                return [e.ids for e in tok.encode_batch(prompts, add_special_tokens=False)]
        else:
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            ids = {t: sp.piece_to_id(t) if sp.id_to_piece(sp.piece_to_id(t)) == t else None for t in (T5_EOS, T5_PAD)}

            def encode(prompts):
                return sp.encode(prompts)
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path}: T5 vocabulary lacks {', '.join(missing)}")
        return cls(encode, ids[T5_EOS], ids[T5_PAD], max_length)

    def __call__(self, prompts: str | list[str]) -> Tensor:
        return frame(self.encode(_prompts(prompts)), self.max_length, self.eos, self.pad, None, "T5 prompt")
