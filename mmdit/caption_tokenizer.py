"""A word-level tokenizer for a model trained on captions of one small grammar (the tiny model in assets/tiny-flux).

Such a model knows a handful of words, always written the same way ("a red circle to the left of a blue
square"), and reads anything else as `<unk>`, a token it never saw in training: "A red circle." would be
two unknown words, and the picture goes wrong without a word said. So the prompt is first rewritten the
way the training captions are written (`normalize_caption`), then tokenized exactly as the T5 tokenizer
does (mmdit/tokenizer.py: the same sentencepiece word model, `ids </s>` then `<pad>`), and the words still
unknown are named in one warning per call.

A tokenizer folder asks for this with `"normalize_prompts": "captions"` in its `tokenizer_config.json`
(convert/tokenizer.py); the real T5, CLIP and LLM tokenizers never normalize.
"""

from __future__ import annotations

import os
import re
import unicodedata
import warnings

import sentencepiece
from torch import Tensor

from .tokenizer import T5Tokenizer

ARTICLE = "a"  # the one article of the captions
ARTICLES = {"a", "an", "the"}
SIDES = {"left", "right"}  # "A to the left of B"
ENDS_RELATION = {"of", "above", "below"}  # the word after which the second object's phrase begins


def normalize_caption(prompt: str) -> str:
    """`prompt` in the captions' own writing; a caption already so written comes back unchanged.

    - case and width: NFKC, lowercase ("A Red Circle" -> "a red circle");
    - punctuation: every character that is not a letter, digit or underscore is a space; runs of spaces are one;
    - relations: "left of", "to left of", "on the left of", "to the left side of" (and right) ->
      "to the left of" ("above" and "below" stay);
    - articles: "an" and "the" -> "a"; an object phrase (at the start, or after a relation) without an
      article gets one ("red circle above blue square" -> "a red circle above a blue square").
    Other words are kept as they are (the tokenizer names those it does not know).
    """
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", prompt).lower())
    out: list[str] = []
    phrase_start = True  # an object phrase begins here
    i = 0
    while i < len(words):
        j = i + (words[i] in ("to", "on"))  # [to|on] [a|an|the] left|right [side] of
        j += j < len(words) and words[j] in ARTICLES
        side = j < len(words) and words[j] in SIDES
        k = j + 1 + (side and j + 1 < len(words) and words[j + 1] == "side")
        if side and k < len(words) and words[k] == "of":
            out += ["to", "the", words[j], "of"]
            i, phrase_start = k + 1, True
            continue
        word = words[i]
        if word in ARTICLES:
            word = ARTICLE
        elif phrase_start:
            out.append(ARTICLE)
        out.append(word)
        phrase_start = word in ENDS_RELATION
        i += 1
    return " ".join(out)


class CaptionTokenizer:
    """`tok(prompts) -> (B, max_length)` ids: `normalize_caption`, then the T5 tokenizer of a word-level vocabulary.

    words: the vocabulary's words (its pieces without sentencepiece's word-start mark, specials left out).
    """

    def __init__(self, t5: T5Tokenizer, words: set[str]):
        self.t5, self.words = t5, words
        self.max_length = t5.max_length

    @classmethod
    def from_file(cls, path: str | os.PathLike, max_length: int) -> "CaptionTokenizer":
        """A word-level sentencepiece model (`spiece.model`, `model_type=word`)."""
        sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        words = {sp.id_to_piece(i).removeprefix("\u2581") for i in range(sp.get_piece_size())
                 if not (sp.is_control(i) or sp.is_unknown(i))}
        return cls(T5Tokenizer.from_file(path, max_length), words)

    def unknown_words(self, prompts: list[str]) -> list[str]:
        """The words of the (normalized) prompts that are not in the vocabulary, each once, in order."""
        return [w for w in dict.fromkeys(w for p in prompts for w in p.split()) if w not in self.words]

    def __call__(self, prompts: str | list[str]) -> Tensor:
        prompts = [normalize_caption(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        unknown = self.unknown_words(prompts)
        if unknown:
            warnings.warn(
                f"{len(unknown)} prompt word(s) the model never saw, read as <unk>: {', '.join(map(repr, unknown))}; "
                f"it knows {len(self.words)}: {' '.join(sorted(self.words))}", stacklevel=2)
        return self.t5(prompts)
