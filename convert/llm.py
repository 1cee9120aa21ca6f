"""Loading FLUX.2's text encoder (an HF Qwen3 / Mistral3 folder, only the layers used) and its chat tokenizer.

Text encoder: a Hugging Face folder (`text_encoder/` of a FLUX.2 repo, or the LLM's own repo): config.json
and safetensors, sharded with a `model.safetensors.index.json` as the official bf16 folders are. The text
stack is found by its `embed_tokens.weight` key: under `model.` in `Qwen3ForCausalLM` / `MistralForCausalLM`;
`Mistral3ForConditionalGeneration` files have it under `language_model.model.` (the original layout, which
transformers 5.23's `save_pretrained` still writes) or `model.language_model.` (transformers' in-memory
names). Strict for what runs: every key of the embedding and of the decoder layers up to the deepest one
used must be there with the right shape, and any other key under the text stack's prefix must be a later
decoder layer or the final norm; those, `lm_head` and (Mistral3) the vision tower and projector are never
read. What that saves, in bf16 (from the presets; GB = 10^9 bytes):
- Qwen3-4B ([klein] 4B, layers to 27 of 36): 9 layers, 0.91 B parameters, 1.8 GB of 8.0 GB (`lm_head` is tied);
- Qwen3-8B ([klein] 9B, to 27 of 36): 9 layers and `lm_head`, 2.36 B parameters, 4.7 GB of 16.4 GB;
- Mistral-Small-3.x ([dev], to 30 of 40): 10 layers and `lm_head`, 6.23 B parameters, 12.5 GB of the text
  part's 47.1 GB (plus the 0.4 B-parameter vision tower and projector, about 0.9 GB).

Chat tokenizer: the folder's `tokenizer.json` (read with `tokenizers`), its chat template from
`chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`'s `chat_template` (the first that
exists, as transformers looks for them), its pad token, padding side and truncation side from
`tokenizer_config.json` (over `special_tokens_map.json`). When no padding side is written, it is the
tokenizer class's default in transformers: left for `LlamaTokenizer[Fast]` (the class Mistral's folders
name), right otherwise (Qwen2Tokenizer).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from mmdit.chat_tokenizer import MAX_LENGTH, PROMPT_FORMATS, ChatTokenizer, PromptFormat
from mmdit.llm import FLUX2_OUT_LAYERS, LLMConfig, LLMEncoder

from .files import Checkpoint, CheckpointError, load_state_dict_strict, read_config

PROBE = "embed_tokens.weight"  # what precedes it in a file is the text stack's prefix
MODEL_TYPES = {"qwen3": "qwen3", "mistral": "mistral"}  # HF model_type -> our arch
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
LEFT_PADDING_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")  # transformers' LlamaTokenizer.padding_side


def _folder(path: Path, sub: str) -> Path:
    """`path` itself, or its `sub/` when `path` is a whole (Diffusers) repo folder."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    return path / sub if path.is_dir() and (path / sub).is_dir() else path


def llm_config(config: dict, out_layers: tuple[int, ...] | None, source: str) -> LLMConfig:
    """Our config from an HF config.json (a Mistral3 one: its `text_config`); out_layers default: FLUX.2's."""
    if config.get("model_type") == "mistral3" or "text_config" in config:
        config = config.get("text_config") or {}
    arch = MODEL_TYPES.get(config.get("model_type"))
    if arch is None:
        raise CheckpointError(
            f"{source}: config.json model_type {config.get('model_type')!r} is not a text stack this project runs "
            f"(expected one of {', '.join(MODEL_TYPES)}, or mistral3)"
        )
    rope = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    sliding = config.get("use_sliding_window") if arch == "qwen3" else config.get("sliding_window") is not None
    unsupported = {
        "hidden_act": config.get("hidden_act", "silu") != "silu",
        "attention_bias": bool(config.get("attention_bias", False)),
        "rope_type": rope_type != "default",
        "sliding window": bool(sliding),
    }
    bad = [name for name, is_bad in unsupported.items() if is_bad]
    if bad:
        raise CheckpointError(f"{source}: unsupported {arch} config: {', '.join(bad)} (FLUX.2's encoders use none)")
    try:
        heads = config["num_attention_heads"]
        return LLMConfig(
            arch=arch, vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            out_layers=tuple(out_layers if out_layers is not None else FLUX2_OUT_LAYERS[arch]),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def text_stack_prefix(ckpt: Checkpoint, source: str) -> str:
    """The prefix of the (one) text stack in the file: `model.`, `model.language_model.`, ..."""
    prefixes = sorted(k[: -len(PROBE)] for k in ckpt if k.endswith(PROBE))
    if not prefixes:
        raise CheckpointError(f"{source}: holds no LLM text stack (no key ending in {PROBE!r})")
    if len(prefixes) > 1:
        raise CheckpointError(f"{source}: holds {len(prefixes)} embeddings ({', '.join(prefixes)}): which text stack?")
    return prefixes[0]


def load_llm_encoder(
    path, out_layers: tuple[int, ...] | None = None, device="cpu", dtype: torch.dtype | None = None
) -> LLMEncoder:
    """The text encoder of an HF folder (or a repo holding `text_encoder/`), with the layers `out_layers` need.

    out_layers: indices into transformers' hidden_states (0 = embeddings); default FLUX.2's, (9, 18, 27) for
    Qwen3 and (10, 20, 30) for Mistral. dtype: defaults to the file's own (float8 is upcast to bfloat16).
    """
    folder = _folder(Path(path), "text_encoder")
    source = str(folder)
    config = read_config(folder / "config.json") if folder.is_dir() else None
    if config is None:
        raise CheckpointError(f"{source}: not an HF model folder (no config.json)")
    cfg = llm_config(config, out_layers, source)
    ckpt = Checkpoint.open(folder)
    prefix = text_stack_prefix(ckpt, source)
    stack = ckpt.with_prefix(prefix)
    if prefix:
        source += f" [{prefix}]"

    used, unexpected = [], []
    for key in stack:
        m = re.match(r"layers\.(\d+)\.", key)
        if key == PROBE or (m and int(m[1]) < cfg.depth):
            used.append(key)
        elif not (m or key == "norm.weight"):  # later layers and the final norm are skipped, nothing else
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(
            f"{source}: {len(unexpected)} unexpected key(s) in the {cfg.arch} text stack, "
            f"first: {', '.join(unexpected[:5])}"
        )
    dtype = dtype or stack.load_dtype()
    loaders = stack.loaders(dtype, device)
    tensors = {"model." + k: loaders[k] for k in used}
    with torch.device("meta"):
        model = LLMEncoder(cfg)
    what = f"{cfg.arch} text encoder ({cfg.depth} of {cfg.num_hidden_layers} layers)"
    load_state_dict_strict(model, tensors, what, source)
    return model.eval().requires_grad_(False)


# ---- the chat tokenizer ----


def _token(value) -> str | None:
    """A special token as the configs write it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: Path, config: dict) -> str:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = None
    if (folder / "chat_template.json").is_file():
        template = read_config(folder / "chat_template.json").get("chat_template")
    template = template if template is not None else config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t.get("name"): t.get("template") for t in template}.get("default")
    if not isinstance(template, str):
        raise ValueError(
            f"{folder}: no chat template (looked for chat_template.jinja, chat_template.json and "
            "tokenizer_config.json's chat_template)"
        )
    return template


def load_chat_tokenizer(
    path, prompt_format: str | PromptFormat = "flux2-klein", max_length: int = MAX_LENGTH
) -> ChatTokenizer:
    """The chat tokenizer of a tokenizer folder (or a repo holding `tokenizer/`).

    prompt_format: "flux2-klein" (Qwen3) or "flux2-dev" (Mistral), see mmdit/chat_tokenizer.py.
    max_length: 512 in both FLUX.2 pipelines.
    """
    folder = _folder(Path(path), "tokenizer")
    if not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json")
    if isinstance(prompt_format, str):
        if prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {prompt_format!r}; known: {', '.join(PROMPT_FORMATS)}")
        prompt_format = PROMPT_FORMATS[prompt_format]
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        config.update(read_config(folder / name) or {})
    special = {name: _token(config[name]) for name in SPECIAL_TOKENS if _token(config.get(name)) is not None}
    if "pad_token" not in special:
        raise ValueError(f"{folder}: the tokenizer config names no pad_token")
    default_side = "left" if config.get("tokenizer_class") in LEFT_PADDING_CLASSES else "right"
    return ChatTokenizer(
        Tokenizer.from_file(str(folder / "tokenizer.json")), _chat_template(folder, config), prompt_format,
        pad_token=special["pad_token"], special_tokens=special, max_length=max_length,
        padding_side=config.get("padding_side", default_side), truncation_side=config.get("truncation_side", "right"),
    )


