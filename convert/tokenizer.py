"""Loading a prompt tokenizer from a Diffusers-format `tokenizer*/` folder (docs/formats.md, "Text encoders").

CLIP folders hold `vocab.json` + `merges.txt`; their pad token comes from `tokenizer_config.json` or
`special_tokens_map.json` (`<|endoftext|>` for CLIP-L and FLUX, `!` for SD3's `tokenizer_2`).
T5 folders hold `spiece.model` (read with sentencepiece, preferred) and/or `tokenizer.json`.
The length is `max_length`, else the folder's `model_max_length`.
"""

from __future__ import annotations

from pathlib import Path

from mmdit.tokenizer import CLIP_EOS, CLIPTokenizer, T5Tokenizer

from .files import read_config


def _config(folder: Path) -> dict:
    """tokenizer_config.json over special_tokens_map.json (either may be absent)."""
    return (read_config(folder / "special_tokens_map.json") or {}) | (read_config(folder / "tokenizer_config.json") or {})


def _content(token) -> str | None:
    """A special token as written in the configs: a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _max_length(max_length: int | None, config: dict, folder: Path) -> int:
    if max_length is not None:
        return max_length
    n = config.get("model_max_length")
    if not isinstance(n, int) or n > 100_000:  # transformers writes a huge sentinel when unset
        raise ValueError(f"{folder}: no model_max_length in its config: pass max_length")
    return n


def load_tokenizer(path, max_length: int | None = None) -> CLIPTokenizer | T5Tokenizer:
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
        pad = _content(config.get("pad_token")) or CLIP_EOS
        return CLIPTokenizer.from_files(
            path / "vocab.json", path / "merges.txt", pad="eos" if pad == CLIP_EOS else pad,
            max_length=_max_length(max_length, config, folder),
        )
    for f in files:
        if f.is_file() and (f.suffix == ".model" or _is_unigram(f)):
            return T5Tokenizer.from_file(f, _max_length(max_length, config, folder))
    raise ValueError(
        f"{path}: not a tokenizer this project reads: expected vocab.json + merges.txt (CLIP) "
        "or spiece.model / a unigram tokenizer.json (T5)"
    )


def _is_unigram(f: Path) -> bool:
    """A `tokenizer.json` of a unigram model (T5's)."""
    return f.suffix == ".json" and read_config(f).get("model", {}).get("type") == "Unigram"
