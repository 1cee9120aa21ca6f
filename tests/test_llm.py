"""FLUX.2's text side against transformers and Diffusers: the LLM encoder, its loader, the chat tokenizer.

Tiny random `Qwen3ForCausalLM` and `Mistral3ForConditionalGeneration` models are saved as the official
folders are (`save_pretrained`, bf16, sharded with an index; transformers 5 writes Mistral3's text stack
under `language_model.model.`) and loaded with `convert.llm.load_llm_encoder`; their stacked hidden
states must equal transformers' `hidden_states` (batch 2 with right and left padding).

Tokenizers: tests/flux2_builders.py (byte-level BPEs with the real chat templates). The reference for ids and masks is Diffusers' own code path on
transformers' `AutoTokenizer`; for embeddings, Diffusers' `Flux2KleinPipeline.encode_prompt` and
`Flux2Pipeline._get_mistral_3_small_prompt_embeds` on the tiny models.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from builders import randomize_, rel_err
from flux2_builders import (
    MISTRAL_TEMPLATE,
    QWEN3_TEMPLATE,
    WORDS,
    write_mistral_tokenizer,
    write_qwen_tokenizer,
)
from safetensors.torch import load_file

from convert import CheckpointError, save_safetensors_atomic
from convert.llm import llm_config, load_chat_tokenizer, load_llm_encoder
from mmdit.chat_tokenizer import PROMPT_FORMATS, SYSTEM_MESSAGE, ChatTokenizer
from mmdit.llm import LLM_PRESETS, LLMConfig, LLMEncoder

TOL = 1e-4
TINY = LLMConfig().tiny()  # 6 layers, (2, 4, 5) used: layer 6 and the final norm are skipped
LAYERS = TINY.out_layers

AWKWARD = [
    "",
    "a photo of a cat",
    "Café naïve résumé — “quotes” «guillemets» 東京 日本語 москва 🙂🐱 👩‍👩‍👧 e\u0301 vs \u00e9",
    "   spaces,\ttabs\n\nand newlines   ",
    "typed specials <|im_end|> <|endoftext|> [INST] </s> [IMG] <think> stay what the tokenizer makes them",
    " ".join(WORDS * 25),  # far past 512 tokens: truncated, the template's tail cut
]


@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory):
    return write_qwen_tokenizer(tmp_path_factory.mktemp("qwen_tokenizer"))


@pytest.fixture(scope="module")
def mistral_tokenizer(tmp_path_factory):
    return write_mistral_tokenizer(tmp_path_factory.mktemp("mistral_tokenizer"))


def _bf16_exact(model):
    """Round the weights to bf16 (the files' dtype), kept in fp32: the reference sees what the file holds."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(reference Qwen3ForCausalLM in fp32, its folder saved bf16 and sharded)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=TINY.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ))
    hf = _bf16_exact(randomize_(hf.eval(), seed=0))
    d = tmp_path_factory.mktemp("qwen_te")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(d, max_shard_size="60KB")
    return hf, d


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    """(reference Mistral3ForConditionalGeneration in fp32, its folder saved bf16 and sharded)."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    text = MistralConfig(
        vocab_size=TINY.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_theta=1e9, rms_norm_eps=1e-5, tie_word_embeddings=False,
        sliding_window=None,  # as in Mistral-Small-3.x (MistralConfig defaults to 4096)
    )
    vision = PixtralVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, head_dim=16, image_size=32,
        patch_size=16,
    )
    hf = Mistral3ForConditionalGeneration(Mistral3Config(text_config=text, vision_config=vision, spatial_merge_size=2))
    hf = _bf16_exact(randomize_(hf.eval(), seed=1))
    d = tmp_path_factory.mktemp("mistral_te")
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(d, max_shard_size="60KB")
    return hf, d


def _ids(padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2: one full row, one with 14 pads on `padding_side`."""
    ids = torch.randint(0, TINY.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 40, dtype=torch.long)
    if padding_side == "right":
        mask[1, 26:] = 0
    else:
        mask[1, :14] = 0
    return ids, mask


def _reference(hf, ids, mask, layers=LAYERS) -> torch.Tensor:
    with torch.no_grad():
        hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    return torch.cat([hidden[i] for i in layers], dim=-1)


# ---- the encoder and its loader ----


@pytest.mark.parametrize("arch,padding_side", [("qwen3", "right"), ("mistral", "left"), ("mistral", "right")])
def test_encoder_matches_transformers(arch, padding_side, qwen, mistral):
    hf, folder = qwen if arch == "qwen3" else mistral
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    enc = load_llm_encoder(folder, out_layers=LAYERS, dtype=torch.float32)
    theta, eps = (1e6, 1e-6) if arch == "qwen3" else (1e9, 1e-5)
    assert enc.cfg == replace(TINY, arch=arch, rope_theta=theta, rms_norm_eps=eps)
    assert len(enc.model.layers) == 5 and not hasattr(enc.model, "norm")  # layer 6 and the final norm: not built
    ids, mask = _ids(padding_side)
    ref = _reference(hf, ids, mask)
    with torch.no_grad():
        out = enc(ids, mask)
        reordered = load_llm_encoder(folder, out_layers=(5, 0, 2), dtype=torch.float32)(ids, mask)
    assert out.shape == (2, 40, 3 * 64)
    assert rel_err(out, ref) <= TOL
    assert rel_err(reordered, _reference(hf, ids, mask, (5, 0, 2))) <= TOL  # any order, the embeddings too
    assert rel_err(out[1, :, :64], out[0, :, :64]) > 0.1  # the padding changed something


def test_default_layers_dtype_and_prefixes(qwen, mistral, tmp_path):
    """FLUX.2's layers by default; bf16 as stored; Mistral3's text stack under either prefix."""
    with pytest.raises(CheckpointError, match=r"out_layers \[9, 18, 27\] out of range.*\[0, 5\]"):
        load_llm_encoder(qwen[1])  # klein's (9, 18, 27)
    hf, folder = mistral
    with pytest.raises(CheckpointError, match=r"out_layers \[10, 20, 30\] out of range.*\[0, 5\]"):
        load_llm_encoder(folder)  # dev's (10, 20, 30) do not fit a 6-layer model
    keys = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(k.startswith("language_model.model.layers.") for k in keys)  # what transformers 5 writes
    # the in-memory layout of transformers >= 4.52 (`model.language_model.`), as a single file
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(f))
    renamed = {k.replace("language_model.model.", "model.language_model.", 1): v for k, v in sd.items()}
    save_safetensors_atomic(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    enc = load_llm_encoder(tmp_path, out_layers=LAYERS)
    assert enc.dtype == torch.bfloat16
    ids, mask = _ids("left")
    with torch.no_grad():
        assert rel_err(enc.float()(ids, mask), _reference(hf, ids, mask)) <= TOL


def test_bad_input(qwen, tmp_path):
    hf, folder = qwen
    config = json.loads((folder / "config.json").read_text())
    sd = {k: v.clone() for k, v in hf.state_dict().items()}

    def attempt(tensors, match, config=config, **kw):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        save_safetensors_atomic(tensors, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=match):
            load_llm_encoder(d, **kw)

    missing = {k: v for k, v in sd.items() if k != "model.layers.4.mlp.up_proj.weight"}
    attempt(missing, r"missing 1 key\(s\), first: model\.layers\.4\.mlp\.up_proj\.weight", out_layers=LAYERS)
    unexpected = sd | {"model.layers.1.self_attn.q_proj.bias": torch.zeros(64)}
    attempt(unexpected, r"unexpected 1 key\(s\), first: model\.layers\.1\.self_attn\.q_proj\.bias", out_layers=LAYERS)
    stray = sd | {"model.rotary_emb.inv_freq": torch.zeros(8)}  # under the prefix, neither a layer nor the norm
    attempt(stray, r"1 unexpected key\(s\) in the qwen3 text stack, first: rotary_emb\.inv_freq", out_layers=LAYERS)
    wrong = sd | {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}
    attempt(wrong, r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[16, 64\].*\[32, 64\]", out_layers=LAYERS)
    attempt(sd, "unsupported qwen3 config: sliding window", config | {"use_sliding_window": True})
    attempt(sd, "model_type 'llama'", config | {"model_type": "llama"})
    attempt({"foo.weight": torch.zeros(1)}, "no LLM text stack", out_layers=LAYERS)
    # later layers and the final norm may be absent: they are never read
    later = {k: v for k, v in sd.items() if not k.startswith(("model.layers.5.", "model.norm.", "lm_head."))}
    d = tmp_path / "truncated"
    save_safetensors_atomic(later, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(config))
    ids, mask = _ids("right")
    with torch.no_grad():
        enc = load_llm_encoder(d, out_layers=LAYERS, dtype=torch.float32)
        assert rel_err(enc(ids, mask), _reference(hf, ids, mask)) <= TOL


@pytest.mark.parametrize("preset", list(LLM_PRESETS))
def test_presets_have_the_reference_layout(preset):
    """Full size on the meta device: our keys and shapes are transformers' for the layers used; what is skipped."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen3Config, Qwen3ForCausalLM

    c = LLM_PRESETS[preset]
    shape = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
    )
    with torch.device("meta"):
        ours = LLMEncoder(c)
        if c.arch == "qwen3":
            ref = Qwen3ForCausalLM(Qwen3Config(**shape, tie_word_embeddings=preset == "qwen3-4b"))
        else:
            ref = MistralForCausalLM(MistralConfig(**shape, tie_word_embeddings=False))
    ref_shapes = {k: list(v.shape) for k, v in ref.state_dict().items()}
    ours_shapes = {k: list(v.shape) for k, v in ours.state_dict().items()}
    used = {k: v for k, v in ref_shapes.items() if k == "model.embed_tokens.weight" or any(
        k.startswith(f"model.layers.{i}.") for i in range(c.depth))}
    assert ours_shapes == used
    skipped = sum(p.numel() for p in ref.parameters()) - sum(p.numel() for p in ours.parameters())
    # the savings stated in convert/llm.py, in billions of parameters
    assert round(skipped / 1e9, 2) == {"qwen3-4b": 0.91, "qwen3-8b": 2.36, "mistral-small-3.1": 6.23}[preset]


def test_config_from_official_files():
    """Qwen3-4B's config.json (transformers 4.51 style) and a Mistral3 one with text_config (5.x style)."""
    qwen = {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2560,
        "intermediate_size": 9728, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-06, "hidden_act": "silu",
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None, "tie_word_embeddings": True,
    }
    assert llm_config(qwen, None, "qwen") == LLM_PRESETS["qwen3-4b"]
    mistral = {"model_type": "mistral3", "text_config": {
        "model_type": "mistral", "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768,
        "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
        "rope_parameters": {"rope_theta": 1000000000.0, "rope_type": "default"}, "rms_norm_eps": 1e-05,
        "sliding_window": None, "hidden_act": "silu",
    }}
    assert llm_config(mistral, None, "mistral") == LLM_PRESETS["mistral-small-3.1"]


# ---- the chat tokenizer ----


def test_system_message_is_bfls():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE as diffusers_message

    assert SYSTEM_MESSAGE == diffusers_message


def test_klein_tokens_match_diffusers(qwen_tokenizer):
    """Diffusers' `_get_qwen3_prompt_embeds` tokenization, prompt by prompt, on transformers' AutoTokenizer."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(qwen_tokenizer))
    ours = load_chat_tokenizer(qwen_tokenizer, "flux2-klein")
    assert (ours.padding_side, ours.max_length) == ("right", 512)
    with pytest.warns(UserWarning, match=r"prompt truncated to 512 tokens: \d+ token\(s\) dropped from the right"):
        ids, mask = ours(AWKWARD)
    for i, prompt in enumerate(AWKWARD):
        text = hf.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert ours.render(prompt) == text
        ref = hf(text, return_tensors="pt", padding="max_length", truncation=True, max_length=512)
        assert ids[i].tolist() == ref["input_ids"][0].tolist(), prompt
        assert mask[i].tolist() == ref["attention_mask"][0].tolist(), prompt
    assert ours.render("a cat").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    pad = hf.convert_tokens_to_ids("<|endoftext|>")
    assert ids[0, -1] == pad and mask[0, -1] == 0 and mask[-1].all()  # right-padded; the long one fills all 512
    assert len(set(ids[1].tolist()) - {pad}) > 8  # real tokens


def test_dev_tokens_match_diffusers(mistral_tokenizer):
    """Diffusers' `format_input` + `apply_chat_template(..., padding="max_length", truncation=True)` (batched)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(mistral_tokenizer))
    ours = load_chat_tokenizer(mistral_tokenizer, "flux2-dev")
    assert ours.padding_side == "left"
    with pytest.warns(UserWarning, match="prompt truncated to 512 tokens"):
        ids, mask = ours(AWKWARD)
    ref = hf.apply_chat_template(
        format_input(prompts=AWKWARD, system_message=SYSTEM_MESSAGE), add_generation_prompt=False, tokenize=True,
        return_dict=True, return_tensors="pt", padding="max_length", truncation=True, max_length=512,
    )
    assert ids.tolist() == ref["input_ids"].tolist() and mask.tolist() == ref["attention_mask"].tolist()
    assert ours.render("a [IMG] cat") == f"<s>[SYSTEM_PROMPT]{SYSTEM_MESSAGE}[/SYSTEM_PROMPT][INST]a  cat[/INST]"
    assert ids[1, 0] == hf.convert_tokens_to_ids("<pad>") and mask[1, 0] == 0  # left padding
    assert ids[1, -1] == hf.convert_tokens_to_ids("[/INST]") and ids[1, (mask[1] == 1).nonzero()[0]] == 1  # <s> once


def test_klein_encode_prompt_matches_diffusers(qwen, qwen_tokenizer):
    """The text part of `Flux2KleinPipeline.encode_prompt`, on the same tiny Qwen3 and tokenizer."""
    from diffusers import Flux2KleinPipeline
    from transformers import AutoTokenizer

    hf, folder = qwen
    pipe = Flux2KleinPipeline(
        scheduler=None, vae=None, text_encoder=hf, tokenizer=AutoTokenizer.from_pretrained(str(qwen_tokenizer)),
        transformer=None,
    )
    prompts = [AWKWARD[2], AWKWARD[0]]
    with torch.no_grad():
        ref, _ = pipe.encode_prompt(prompts, device="cpu", text_encoder_out_layers=LAYERS)
        ids, mask = load_chat_tokenizer(qwen_tokenizer, "flux2-klein")(prompts)
        ours = load_llm_encoder(folder, out_layers=LAYERS, dtype=torch.float32)(ids, mask)
    assert ours.shape == ref.shape == (2, 512, 3 * 64)
    assert rel_err(ours, ref) <= TOL


def test_dev_prompt_embeds_match_diffusers(mistral, mistral_tokenizer):
    """`Flux2Pipeline._get_mistral_3_small_prompt_embeds` on the tiny Mistral3 (left padding: pads see no key)."""
    from diffusers import Flux2Pipeline
    from transformers import AutoTokenizer

    hf, folder = mistral
    prompts = ["a photo of a cat [IMG] on a chair", AWKWARD[3]]
    with torch.no_grad():
        ref = Flux2Pipeline._get_mistral_3_small_prompt_embeds(
            text_encoder=hf, tokenizer=AutoTokenizer.from_pretrained(str(mistral_tokenizer)), prompt=prompts,
            device=torch.device("cpu"), hidden_states_layers=LAYERS,
        )
        ids, mask = load_chat_tokenizer(mistral_tokenizer, "flux2-dev")(prompts)
        ours = load_llm_encoder(folder, out_layers=LAYERS, dtype=torch.float32)(ids, mask)
    assert torch.isfinite(ref).all() and ours.shape == ref.shape == (2, 512, 3 * 64)
    assert rel_err(ours, ref) <= TOL


def test_tokenizer_folder_variants(qwen_tokenizer, mistral_tokenizer, tmp_path):
    """Template from chat_template.json; default padding side by class; clear errors."""
    import shutil

    from tokenizers import Tokenizer

    d = tmp_path / "repo" / "tokenizer"
    shutil.copytree(mistral_tokenizer, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": MISTRAL_TEMPLATE}))
    for cls, side in (("LlamaTokenizerFast", "left"), ("PreTrainedTokenizerFast", "right")):
        (d / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "padding_side"}
                                                            | {"tokenizer_class": cls}))
        tok = load_chat_tokenizer(tmp_path / "repo", "flux2-dev")  # a repo folder: its tokenizer/
        assert tok.padding_side == side
    with pytest.warns(UserWarning, match="truncated to 64 tokens"):  # the system message alone is longer
        assert load_chat_tokenizer(d, "flux2-dev", max_length=64)("a cat")[0].shape == (1, 64)
    (d / "chat_template.json").unlink()
    with pytest.raises(ValueError, match="no chat template"):
        load_chat_tokenizer(d, "flux2-dev")
    with pytest.raises(ValueError, match="unknown prompt format 'flux3'"):
        load_chat_tokenizer(qwen_tokenizer, "flux3")
    tok = Tokenizer.from_file(str(qwen_tokenizer / "tokenizer.json"))
    with pytest.raises(ValueError, match="pad token '<nope>' is not in the tokenizer's vocabulary"):
        ChatTokenizer(tok, QWEN3_TEMPLATE, PROMPT_FORMATS["flux2-klein"], pad_token="<nope>")
    left = ChatTokenizer(tok, QWEN3_TEMPLATE, PROMPT_FORMATS["flux2-klein"], "<|endoftext|>", max_length=8,
                         truncation_side="left")
    with pytest.warns(UserWarning, match="dropped from the left"):
        ids, mask = left("a photo of a cat")
    full = tok.encode(left.render("a photo of a cat"), add_special_tokens=False).ids
    assert ids[0].tolist() == full[-8:] and mask.all()  # the head was cut
