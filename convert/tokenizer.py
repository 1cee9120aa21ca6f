"""Loading a prompt tokenizer from a Diffusers-format `tokenizer*/` folder (docs/formats.md, "Text encoders").

CLIP folders hold `vocab.json` + `merges.txt`; their pad token comes from `tokenizer_config.json` or
`special_tokens_map.json` (`<|endoftext|>` for CLIP-L and FLUX, `!` for SD3's `tokenizer_2`).
T5 folders hold `spiece.model` (read with sentencepiece, preferred) and/or `tokenizer.json`.
The length is `max_length`, else the folder's `model_max_length`. A folder whose config says
`"normalize_prompts": "captions"` (a word-level `spiece.model`, such as the tiny model's) gives a
`CaptionTokenizer` (mmdit/caption_tokenizer.py): prompts rewritten as its captions are, unknown words warned.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from mmdit.caption_tokenizer import CaptionTokenizer
from mmdit.tokenizer import CLIP_EOS, CLIPTokenizer, T5Tokenizer

from .files import CheckpointError, Config, read_config


def _config(folder: Path) -> Config:
    """tokenizer_config.json, else special_tokens_map.json for the fields it lacks (either may be absent);
    errors name the file(s) read."""
    found = [c for c in (read_config(folder / "tokenizer_config.json"), read_config(folder / "special_tokens_map.json"))
             if c is not None]
    merged: dict = {}
    for c in reversed(found):
        merged |= c
    return Config(merged, " or ".join(c.source for c in found) or str(folder))


def _pad_token(config: Config) -> str | None:
    """The pad token as written in the configs: a string or an AddedToken object `{"content": ...}`."""
    token = config.get("pad_token")
    if isinstance(token, dict):
        token = Config(token, f"{config.source}, field 'pad_token'").get_str("content")
    elif token is not None and not isinstance(token, str):
        raise CheckpointError(
            f"{config.source}: field 'pad_token' is {token!r}, expected a string or an AddedToken object"
        )
    return token


def _max_length(max_length: int | None, config: Config, folder: Path) -> int:
    if max_length is not None:
        return max_length
    huge = isinstance(config.get("model_max_length"), float) and config["model_max_length"] > 100_000
    n = None if huge else config.get_int("model_max_length")
    if n is None or n > 100_000:  # transformers writes a huge sentinel (1e30) when unset
        raise ValueError(f"{folder}: no model_max_length in its config: pass max_length")
    return n


NORMALIZERS = ("captions",)  # the values of a tokenizer config's "normalize_prompts"


def load_tokenizer(path, max_length: int | None = None) -> CLIPTokenizer | T5Tokenizer | CaptionTokenizer:
    """A CLIP or T5 tokenizer from a `tokenizer*/` folder (or a T5 `spiece.model` / `tokenizer.json` file).

    max_length: CLIP 77; T5 512 (FLUX dev), 256 (FLUX schnell, SD3). Default: the folder's `model_max_length`.
    """
    path = Path(path)
    if path.is_file():
        folder, files = path.parent, [path]
    elif path.is_dir():
        folder, files = path, [path / "spiece.model", path / "tokenizer.json"]
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    config = _config(folder)
    if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        pad = _pad_token(config) or CLIP_EOS
        length = _max_length(max_length, config, folder)
        with _naming(path / "vocab.json", path / "merges.txt"):
            return CLIPTokenizer.from_files(
                path / "vocab.json", path / "merges.txt", pad="eos" if pad == CLIP_EOS else pad, max_length=length
            )
    normalize = config.get("normalize_prompts")
    if normalize is not None and normalize not in NORMALIZERS:
        raise CheckpointError(f"{config.source}: field 'normalize_prompts' is {normalize!r}, expected one of "
                              f"{', '.join(map(repr, NORMALIZERS))}")
    for f in files:
        if f.is_file() and (f.suffix == ".model" or _is_unigram(f)):
            if normalize and f.suffix != ".model":
                raise CheckpointError(f"{config.source}: 'normalize_prompts' needs a word-level spiece.model, not {f}")
            length = _max_length(max_length, config, folder)
            with _naming(f):
                return (CaptionTokenizer if normalize else T5Tokenizer).from_file(f, length)
    raise ValueError(
        f"{path}: not a tokenizer this project reads: expected vocab.json + merges.txt (CLIP) "
        "or spiece.model / a unigram tokenizer.json (T5)"
    )


@contextmanager
def _naming(*files: Path):
    """What the tokenizer libraries raise about a broken vocabulary file (JSON, BPE, sentencepiece), naming it."""
    try:
        yield
    except Exception as e:  # json, tokenizers and sentencepiece errors alike
        raise CheckpointError(f"{' / '.join(map(str, files))}: cannot be read as a tokenizer ({e})") from None


def _is_unigram(f: Path) -> bool:
    """A `tokenizer.json` of a unigram model (T5's)."""
    return f.suffix == ".json" and read_config(f).get_dict("model").get("type") == "Unigram"
