"""The LLM tokenizer of FLUX.2: a prompt -> a chat -> the model's chat template -> padded token ids.

FLUX.2 does not tokenize the prompt alone: it wraps it in a chat, renders the chat with the text
encoder's own chat template, and tokenizes the rendered text (Diffusers 0.42.1
`pipelines/flux2/pipeline_flux2_klein.py` `_get_qwen3_prompt_embeds`, `pipelines/flux2/pipeline_flux2.py`
`format_input` and `_get_mistral_3_small_prompt_embeds`; BFL flux2 `src/flux2/text_encoder.py`):
- [klein] (Qwen3): one user message holding the prompt, with the generation prompt and Qwen3's
  thinking switched off (`enable_thinking=False`), which ends the text with an empty
  `<think>\\n\\n</think>\\n\\n` block;
- [dev] (Mistral-Small-3.x): a system message (BFL's `SYSTEM_MESSAGE`) then the user message, both as
  content blocks `[{"type": "text", ...}]`, no generation prompt; `[IMG]` is removed from the prompt first.
Both then pad to `max_length` (512) with the tokenizer's pad token on its padding side (Qwen3: right,
`<|endoftext|>`; Mistral: `<pad>` on the side its folder configures, left for its Llama tokenizer class)
and truncate longer texts on the right, cutting the template's tail. The rendered text is tokenized without adding
special tokens: Qwen's tokenizer adds none, and Mistral's template writes `<s>` itself (transformers
then turns special tokens off). Special tokens typed in a prompt (`<|im_end|>`) are special tokens, as
in transformers.

Rendering: the template is Jinja, run as transformers' `apply_chat_template` runs it (`trim_blocks`,
`lstrip_blocks`, the loop-controls extension, `raise_exception`, `strftime_now`, a `tojson` filter, the
named special tokens as variables), with jinja2, which PyTorch already depends on. Templates are code
from the model's folder: they run in Jinja's immutable sandbox, as transformers runs them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from datetime import datetime

import jinja2
import jinja2.ext
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from torch import Tensor

# BFL flux2 `src/flux2/system_messages.py` SYSTEM_MESSAGE (also Diffusers `pipelines/flux2/system_messages.py`)
SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)
MAX_LENGTH = 512  # Diffusers' max_sequence_length default for both FLUX.2 pipelines (BFL: MAX_LENGTH)


@dataclass(frozen=True)
class PromptFormat:
    """How one prompt becomes a chat for the template, and which switches the template gets."""

    system: str | None = None  # a system message before the user's, or none
    content_blocks: bool = False  # message content as [{"type": "text", "text": ...}] instead of a string
    add_generation_prompt: bool = False
    template_kwargs: tuple[tuple[str, object], ...] = ()  # extra template variables, e.g. enable_thinking
    removed: tuple[str, ...] = ()  # substrings taken out of the prompt first

    def messages(self, prompt: str) -> list[dict]:
        for s in self.removed:
            prompt = prompt.replace(s, "")

        def content(text):
            return [{"type": "text", "text": text}] if self.content_blocks else text

        system = [{"role": "system", "content": content(self.system)}] if self.system is not None else []
        return system + [{"role": "user", "content": content(prompt)}]


PROMPT_FORMATS = {
    "flux2-klein": PromptFormat(add_generation_prompt=True, template_kwargs=(("enable_thinking", False),)),
    "flux2-dev": PromptFormat(system=SYSTEM_MESSAGE, content_blocks=True, removed=("[IMG]",)),
}


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template, compiled in the environment transformers gives templates (utils/chat_template_utils.py)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class ChatTokenizer:
    """`tok(prompts) -> (input_ids, attention_mask)`, each (B, max_length) long; mask 1 = token, 0 = pad.

    tokenizer: the `tokenizers` object of the folder's `tokenizer.json`; chat_template: its Jinja source;
    special_tokens: the named special tokens the template may read (`bos_token`, `eos_token`, ...);
    pad_token must be in the vocabulary.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        prompt_format: PromptFormat,
        pad_token: str,
        special_tokens: dict[str, str] | None = None,
        max_length: int = MAX_LENGTH,
        padding_side: str = "right",
        truncation_side: str = "right",
    ):
        for name, side in (("padding_side", padding_side), ("truncation_side", truncation_side)):
            if side not in ("left", "right"):
                raise ValueError(f"{name} must be 'left' or 'right', got {side!r}")
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.pad = tokenizer.token_to_id(pad_token)
        if self.pad is None:
            raise ValueError(f"pad token {pad_token!r} is not in the tokenizer's vocabulary")
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()  # a saved tokenizer.json may carry these: we frame the ids ourselves
        self.tokenizer.no_truncation()
        self.template = compile_chat_template(chat_template)
        self.prompt_format = prompt_format
        self.special_tokens = dict(special_tokens or {})
        self.max_length, self.padding_side, self.truncation_side = max_length, padding_side, truncation_side

    def render(self, prompt: str) -> str:
        """The text the tokenizer sees: the prompt's chat through the template."""
        f = self.prompt_format
        return self.template.render(
            messages=f.messages(prompt), tools=None, documents=None, add_generation_prompt=f.add_generation_prompt,
            **self.special_tokens, **dict(f.template_kwargs),
        )

    def __call__(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = self.tokenizer.encode_batch([self.render(p) for p in prompts], add_special_tokens=False)
        ids, mask = [], []
        for e in encoded:
            row = e.ids
            if len(row) > self.max_length:
                warnings.warn(
                    f"prompt truncated to {self.max_length} tokens: {len(row) - self.max_length} token(s) "
                    f"dropped from the {self.truncation_side}", stacklevel=2,
                )
                row = row[: self.max_length] if self.truncation_side == "right" else row[-self.max_length :]
            pad = self.max_length - len(row)
            if self.padding_side == "right":
                ids.append(row + [self.pad] * pad)
                mask.append([1] * len(row) + [0] * pad)
            else:
                ids.append([self.pad] * pad + row)
                mask.append([0] * pad + [1] * len(row))
        shape = (len(prompts), self.max_length)
        return torch.tensor(ids, dtype=torch.long).reshape(shape), torch.tensor(mask, dtype=torch.long).reshape(shape)
