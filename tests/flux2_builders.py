"""Tiny FLUX.2 parts for the tests: LLM tokenizer folders, Qwen3 / Mistral3 text encoders, the autoencoder,
the transformer, and whole Diffusers pipelines (`Flux2KleinPipeline`, `Flux2Pipeline`) saved as the official
repos are, with their BFL single-file counterparts.

Tokenizers: byte-level BPEs trained here with `tokenizers`, pre-tokenized as Qwen2's and Mistral's (tekken)
tokenizer.json are, with their special tokens and the real chat templates: Qwen3's from Qwen/Qwen3-4B's
tokenizer_config.json and Mistral-Small-3.1's from mistralai/Mistral-Small-3.1-24B-Instruct-2503 (transcribed
from public copies; the branches FLUX.2 reaches are the ones that matter).
"""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from builders import randomize_
from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
)
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from PIL import Image
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from mmdit.flux2 import PRESETS, Flux2

VOCAB_SIZE = 512  # of the tiny LLMs; the tokenizers use fewer ids

QWEN_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TEKKEN_SPLIT = (
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"""
    r"""[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


# Qwen/Qwen3-4B tokenizer_config.json "chat_template"
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# mistralai/Mistral-Small-3.1-24B-Instruct-2503 chat template
MISTRAL_TEMPLATE = r"""{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is " + today + ".\n\nWhen you're not sure about some information, you say that you don't have the information and don't make up anything.\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \"What are some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")" %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0]['content'] is string %}
        {%- set system_message = messages[0]['content'] %}
    {%- else %}
        {%- set system_message = messages[0]['content'][0]['text'] %}
    {%- endif %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
        {%- else %}
            {{- '[INST]' }}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] in ['image', 'image_url'] %}
                    {{- '[IMG]' }}
                {%- else %}
                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                {%- endif %}
            {%- endfor %}
            {{- '[/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'system' %}
        {%- if message['content'] is string %}
            {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
        {%- else %}
            {{- '[SYSTEM_PROMPT]' + message['content'][0]['text'] + '[/SYSTEM_PROMPT]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""


WORDS = (
    "a photo of the cat dog sitting on red blue green chair table under bright sunny day night city "
    "portrait painting oil style highly detailed cinematic lighting astronaut riding horse mars café naïve "
    "résumé Zürich straße Ελλάδα москва 東京 日本語 🙂 🐱 4k 8k 1024 3.5 it's don't"
).split()


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def bpe(split: str, special: list[str], added: list[str], bos: str | None, vocab_size: int = 400):
    """A byte-level BPE as Qwen2's / tekken's tokenizer.json: regex split, byte-level alphabet, special tokens."""
    tok = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(400, 0), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if bos:  # Mistral's tokenizer.json adds <s> when asked for special tokens (the chat path never asks)
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size() <= VOCAB_SIZE
    return tok



def write_qwen_tokenizer(d: Path) -> Path:
    """A Qwen3-style tokenizer folder: chat template and pad token in tokenizer_config.json."""
    d.mkdir(parents=True, exist_ok=True)
    tok = bpe(QWEN_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<think>", "</think>"], None)
    tok.normalizer = normalizers.NFC()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "add_bos_token": False, "bos_token": None, "unk_token": None,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "model_max_length": 40960,
        "chat_template": QWEN3_TEMPLATE,
    }))
    return d


def write_mistral_tokenizer(d: Path) -> Path:
    """A Mistral-style processor folder: the template in chat_template.jinja, left padding with <pad>."""
    d.mkdir(parents=True, exist_ok=True)
    special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"]
    bpe(TEKKEN_SPLIT, special, [], "<s>").save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TokenizersBackend", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "padding_side": "left", "model_max_length": 131072,
    }))
    (d / "chat_template.jinja").write_text(MISTRAL_TEMPLATE)
    return d


# ---- tiny parts and pipelines ----

PROMPTS = ["a photo of a cat", "a red dog on the table"]
LLM_HIDDEN = 32  # the context is 3 x 32 wide
QWEN3_LAYERS, MISTRAL_LAYERS = 28, 31  # FLUX.2's hidden states (9, 18, 27) and (10, 20, 30) must exist
# FLUX.1-dev's scheduler config, which the FLUX.2 repos use (Diffusers `scripts/convert_flux2_to_diffusers.py`)
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                 max_image_seq_len=4096)
TINY_DIFFUSERS_CONFIG = dict(in_channels=128, num_layers=2, num_single_layers=2, attention_head_dim=32,
                             num_attention_heads=2, joint_attention_dim=3 * LLM_HIDDEN, mlp_ratio=3.0,
                             axes_dims_rope=(8, 8, 8, 8), rope_theta=2000)
KLEIN_DEFAULTS = {"steps": 2, "guidance": 4.0, "size": 64}  # model_index.json "sampling_defaults" of the tiny folder


def tiny_qwen3(seed: int):
    return randomize_(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=LLM_HIDDEN, intermediate_size=48, num_hidden_layers=QWEN3_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )), seed).eval()


def tiny_mistral3(seed: int):
    text = transformers.MistralConfig(
        vocab_size=VOCAB_SIZE, hidden_size=LLM_HIDDEN, intermediate_size=48, num_hidden_layers=MISTRAL_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rope_theta=1e9, rms_norm_eps=1e-5,
        tie_word_embeddings=False, sliding_window=None,
    )
    vision = transformers.PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                              num_attention_heads=2, head_dim=16, image_size=32, patch_size=16)
    config = transformers.Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2)
    return randomize_(transformers.Mistral3ForConditionalGeneration(config), seed).eval()


def tiny_vae(seed: int) -> AutoencoderKLFlux2:
    """Four levels of 32 channels (the real spatial factor 8), one block each, random batch-norm statistics."""
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                             block_out_channels=(32,) * 4, layers_per_block=1, latent_channels=32)
    randomize_(vae, seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    vae.bn.running_mean.copy_(torch.randn(128, generator=g) * 0.5)
    vae.bn.running_var.copy_(torch.rand(128, generator=g) * 2 + 0.2)
    return vae


def tiny_transformer(bfl: dict[str, torch.Tensor], guidance: bool) -> Flux2Transformer2DModel:
    """Diffusers' model holding BFL weights, converted by Diffusers' own single-file converter."""
    model = Flux2Transformer2DModel(**TINY_DIFFUSERS_CONFIG, guidance_embeds=guidance)
    model.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl)), strict=True)
    return model.eval()


def bfl_transformer(guidance: bool, seed: int) -> dict[str, torch.Tensor]:
    """A random FLUX.2 transformer in BFL's layout (our keys), the size of `TINY_DIFFUSERS_CONFIG`."""
    p = replace(PRESETS["flux2-dev" if guidance else "flux2-klein-4b"], context_in_dim=3 * LLM_HIDDEN, hidden_size=64,
                num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 8, 8, 8))
    return {k: v.clone() for k, v in randomize_(Flux2(p), seed).state_dict().items()}


def klein_pipeline(work: Path) -> tuple[Flux2KleinPipeline, Path, dict[str, torch.Tensor]]:
    """A base (undistilled) Flux2KleinPipeline saved to work/'klein' (with tiny sampling defaults in its
    model_index.json), and its transformer's BFL state dict."""
    tok = transformers.AutoTokenizer.from_pretrained(str(write_qwen_tokenizer(work / "qwen_tokenizer")))
    bfl = bfl_transformer(guidance=False, seed=3)
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=tiny_vae(1),
                              text_encoder=tiny_qwen3(2), tokenizer=tok, transformer=tiny_transformer(bfl, False),
                              is_distilled=False)
    folder = work / "klein"
    pipe.save_pretrained(folder, safe_serialization=True)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"sampling_defaults": KLEIN_DEFAULTS}))
    return pipe, folder, bfl


def dev_pipeline(work: Path) -> tuple[Flux2Pipeline, Path]:
    """A [dev]-like Flux2Pipeline (guidance embedding, Mistral3 text encoder) saved to work/'dev'."""
    tok = transformers.AutoTokenizer.from_pretrained(str(write_mistral_tokenizer(work / "mistral_tokenizer")))
    pipe = Flux2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=tiny_vae(11),
                         text_encoder=tiny_mistral3(12), tokenizer=tok,
                         transformer=tiny_transformer(bfl_transformer(guidance=True, seed=13), True))
    folder = work / "dev"
    pipe.save_pretrained(folder, safe_serialization=True)
    return pipe, folder


def noise(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Initial latents (B, 32, H/8, W/8), in the autoencoder's normalized space."""
    return torch.randn(batch, 32, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def random_image(width: int, height: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy())
