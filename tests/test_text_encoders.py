"""The text encoders and their loader against transformers' CLIPTextModel[WithProjection] and T5EncoderModel.

Tiny random models are written in each official layout (Hugging Face folders, sharded or not; SAI
single files; the `text_encoders.*` parts of an SAI bundle; open_clip's layout; fp16 and fp8 T5),
loaded with `convert.load_text_encoder`, and run on the same token ids as the reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from builders import randomize_, rel_err
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from convert import CheckpointError, load_text_encoder, save_safetensors_atomic
from mmdit import t5
from mmdit.clip import CLIP_PRESETS, CLIPConfig, CLIPTextEncoder
from mmdit.t5 import T5Encoder, relative_position_bucket

TOL = 1e-4
VOCAB, POSITIONS = 1000, 24
T5_LEN = 140  # past max_distance 128, so every bucket kind is used
TINY_T5 = t5.T5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2)


def hf_clip(width: int, heads: int, act: str, projection: int | None, seed: int):
    cfg = CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=heads,
        max_position_embeddings=POSITIONS, hidden_act=act, projection_dim=projection or width,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # eos_token_id 2: the legacy argmax pooling, as shipped
    )
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return randomize_(model.eval(), seed)


def on_disk(hf) -> dict[str, torch.Tensor]:
    """The official key names: transformers >= 5.6 drops `text_model.` from CLIPTextModel, the files keep it."""
    return {
        (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v.clone()
        for k, v in hf.state_dict().items()
    }


def clip_ids(pad: int) -> torch.Tensor:
    """Three prompts of different lengths: tokens, EOS (the highest id), then padding."""
    ids = torch.randint(1, VOCAB - 2, (3, POSITIONS), generator=torch.Generator().manual_seed(1))
    for b, eos in enumerate((2, POSITIONS // 2, POSITIONS - 1)):
        ids[b, eos] = VOCAB - 1
        ids[b, eos + 1 :] = pad
    return ids


@pytest.fixture(scope="module")
def refs():
    return {
        "small": hf_clip(64, 4, "quick_gelu", None, seed=0),  # heads only from config.json (64 // 64 = 1)
        "small-proj": hf_clip(64, 4, "gelu", 32, seed=1),
        "clip_l": hf_clip(768, 12, "quick_gelu", None, seed=2),  # widths whose activation is known without config
        "clip_g": hf_clip(1280, 20, "gelu", 32, seed=3),
        "t5": randomize_(
            T5EncoderModel(T5Config(
                vocab_size=TINY_T5.vocab_size, d_model=TINY_T5.d_model, d_kv=TINY_T5.d_kv, num_heads=TINY_T5.num_heads,
                d_ff=TINY_T5.d_ff, num_layers=TINY_T5.num_layers, feed_forward_proj="gated-gelu",
            )).eval(),
            seed=4,
        ),
    }


def check_clip(enc, hf, pad: int = VOCAB - 1) -> None:
    ids = clip_ids(pad)
    with torch.no_grad():
        out = hf(ids, output_hidden_states=True)
        h0, p0 = enc(ids)
        h1, p1 = enc(ids, skip=1)
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    assert rel_err(h0, out.last_hidden_state) <= TOL
    assert rel_err(h1, out.hidden_states[-2]) <= TOL
    assert rel_err(p0, pooled) <= TOL and rel_err(p1, pooled) <= TOL
    assert rel_err(h0, h1) > 0.1  # the two hidden states differ: skip did something


def t5_ids() -> torch.Tensor:
    return torch.randint(0, 100, (2, T5_LEN), generator=torch.Generator().manual_seed(5))


def t5_state(hf) -> dict[str, torch.Tensor]:
    """The HF state dict, both embedding names (tied: cloned apart, as safetensors wants)."""
    return {k: v.clone() for k, v in hf.state_dict().items()}


def check_t5(enc, hf) -> None:
    ids = t5_ids()
    with torch.no_grad():
        assert rel_err(enc(ids), hf(ids).last_hidden_state) <= TOL


def hf_with(hf, sd: dict[str, torch.Tensor]):
    """A copy of the reference with other (e.g. fp8-rounded, upcast) weights."""
    copy = type(hf)(hf.config).eval()
    copy.load_state_dict({k: v.float() for k, v in sd.items()})
    return copy


# ---- CLIP ----


def test_clip_hf_folder_official_keys(tmp_path, refs):
    hf = refs["small"]
    save_safetensors_atomic(on_disk(hf), tmp_path / "model.safetensors")
    hf.config.to_json_file(tmp_path / "config.json")
    enc = load_text_encoder(tmp_path)
    assert enc.cfg.heads == 4 and enc.cfg.act == "quick_gelu" and enc.text_projection is None
    check_clip(enc, hf)


def test_clip_save_pretrained_flat_keys(tmp_path, refs):
    hf = refs["small"]
    hf.save_pretrained(tmp_path)  # transformers >= 5.6: keys without `text_model.`
    check_clip(load_text_encoder(tmp_path), hf)


def test_clip_with_projection_sharded_folder(tmp_path, refs):
    hf = refs["small-proj"]
    hf.save_pretrained(tmp_path, max_shard_size="40KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    enc = load_text_encoder(tmp_path)
    assert enc.cfg.act == "gelu" and enc.cfg.projection_dim == 32
    check_clip(enc, hf, pad=0)


def test_sai_clip_l_file(tmp_path, refs):
    """`clip_l.safetensors`: HF keys, no text_projection (pooled unprojected), an old `position_ids` buffer."""
    hf = refs["clip_l"]
    sd = on_disk(hf) | {"text_model.embeddings.position_ids": torch.arange(POSITIONS)[None]}
    save_safetensors_atomic(sd, tmp_path / "clip_l.safetensors")
    enc = load_text_encoder(tmp_path / "clip_l.safetensors")
    assert (enc.cfg.act, enc.cfg.heads, enc.text_projection) == ("quick_gelu", 12, None)
    check_clip(enc, hf)


def test_sai_clip_g_file_fp16(tmp_path, refs):
    hf = refs["clip_g"]
    sd = {k: v.half() for k, v in on_disk(hf).items()}
    save_safetensors_atomic(sd, tmp_path / "clip_g.safetensors")
    assert load_text_encoder(tmp_path / "clip_g.safetensors").dtype == torch.float16  # the file's own dtype
    enc = load_text_encoder(tmp_path / "clip_g.safetensors", dtype=torch.float32)
    assert (enc.cfg.act, enc.cfg.heads, enc.cfg.projection_dim) == ("gelu", 20, 32)
    check_clip(enc, hf_with(hf, sd), pad=0)


def test_open_clip_layout(tmp_path, refs):
    """open_clip's layout (Diffusers `loaders/single_file_utils.py` `convert_open_clip_checkpoint`, in reverse):
    fused in_proj (rows q, k, v), text_projection used as x @ P, logit_scale.

    Written under a prefix, with a (stub) vision tower as in a whole open_clip model, which is left out.
    """
    hf = refs["clip_g"]
    sd = on_disk(hf)
    oc = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].T.contiguous(),
        "logit_scale": torch.tensor(4.6),
        "visual.transformer.resblocks.0.attn.in_proj_weight": torch.zeros(6, 2),  # a whole model's vision tower
        "visual.proj": torch.zeros(2, 2),
    }
    for i in range(2):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                         ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
                oc[f"{theirs}{b}.{w}"] = sd[f"{ours}{a}.{w}"]
            oc[f"{theirs}attn.in_proj_{w}"] = torch.cat([sd[f"{ours}self_attn.{p}_proj.{w}"] for p in "qkv"])
    save_safetensors_atomic({"cond.model." + k: v for k, v in oc.items()}, tmp_path / "open_clip.safetensors")
    check_clip(load_text_encoder(tmp_path / "open_clip.safetensors"), hf, pad=0)


# ---- T5 ----


def test_t5_hf_folder(tmp_path, refs):
    hf = refs["t5"]
    hf.save_pretrained(tmp_path)
    enc = load_text_encoder(tmp_path)
    assert enc.cfg == TINY_T5
    check_t5(enc, hf)


@pytest.mark.parametrize("names", [("shared.weight", "encoder.embed_tokens.weight"), ("encoder.embed_tokens.weight",)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn])
def test_t5_single_file(tmp_path, refs, names, dtype):
    """`t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors`: either or both embedding names; fp8 upcast."""
    hf = refs["t5"]
    embedding = ("shared.weight", "encoder.embed_tokens.weight")
    sd = {k: v.to(dtype) for k, v in hf.state_dict().items() if k not in embedding}
    sd |= {n: hf.shared.weight.detach().to(dtype) for n in names}
    save_safetensors_atomic(sd, tmp_path / "t5xxl.safetensors")
    default = torch.float16 if dtype == torch.float16 else torch.bfloat16  # float8 is upcast
    assert load_text_encoder(tmp_path / "t5xxl.safetensors").dtype == default
    enc = load_text_encoder(tmp_path / "t5xxl.safetensors", dtype=torch.float32)
    check_t5(enc, hf_with(hf, sd | {n: sd[names[0]] for n in embedding}))


def test_t5_scaled_fp8_file(tmp_path, refs):
    """ComfyUI's `t5xxl_fp8_e4m3fn_scaled.safetensors`: `W = W_fp8 * scale_weight`, marker and scales consumed."""
    hf = refs["t5"]
    stored, dequantized = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in t5_state(hf).items():
        if k.endswith(".weight") and ".layer." in k:
            s = v.abs().max() / 448
            stored[k] = (v / s).to(torch.float8_e4m3fn)
            stored[k.removesuffix("weight") + "scale_weight"] = s.reshape(())
            stored[k.removesuffix("weight") + "scale_input"] = torch.ones(())
            dequantized[k] = stored[k].float() * s
        else:
            stored[k] = dequantized[k] = v
    save_safetensors_atomic(stored, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    enc = load_text_encoder(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.float32)
    check_t5(enc, hf_with(hf, dequantized))


def test_relative_position_bucket():
    offsets = torch.arange(-300, 301)[None, :]
    for buckets, distance in ((32, 128), (8, 20)):
        expected = T5Attention._relative_position_bucket(offsets, True, buckets, distance)
        assert torch.equal(relative_position_bucket(offsets, buckets, distance), expected)


def test_t5_fp16_does_not_overflow(refs):
    """wo scaled up so the residual stream passes the fp16 maximum: the fp16 model stays finite and close to fp32."""
    sd = t5_state(refs["t5"])
    for k in sd:
        if k.endswith("DenseReluDense.wo.weight"):
            sd[k] *= 1e5
    ours = T5Encoder(TINY_T5)
    ours.load_state_dict({k: v for k, v in sd.items() if k != "encoder.embed_tokens.weight"})
    residual = []
    ours.encoder.final_layer_norm.register_forward_hook(lambda m, args, out: residual.append(args[0].abs().max()))
    ids = t5_ids()
    with torch.no_grad():
        full = ours(ids)
        half = ours.half()(ids)
    assert residual[0] > 2 * torch.finfo(torch.float16).max  # an fp16 residual stream would hold inf here
    assert half.dtype == torch.float16 and torch.isfinite(half).all()
    assert rel_err(half, full) <= 1e-2


# ---- SAI bundles and bad input ----


def test_sai_bundle_parts(tmp_path, refs):
    parts = {"clip_l": on_disk(refs["clip_l"]), "clip_g": on_disk(refs["clip_g"]), "t5xxl": t5_state(refs["t5"])}
    sd = {f"text_encoders.{n}.transformer.{k}": v for n, p in parts.items() for k, v in p.items()}
    sd |= {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 2), "first_stage_model.w": torch.zeros(1)}
    save_safetensors_atomic(sd, tmp_path / "sd3_incl_clips_t5.safetensors")
    f = tmp_path / "sd3_incl_clips_t5.safetensors"
    check_clip(load_text_encoder(f, prefix="text_encoders.clip_l.transformer."), refs["clip_l"])
    check_clip(load_text_encoder(f, prefix="text_encoders.clip_g.transformer."), refs["clip_g"], pad=0)
    check_t5(load_text_encoder(f, prefix="text_encoders.t5xxl.transformer."), refs["t5"])
    with pytest.raises(CheckpointError, match=r"3 text encoders .*text_encoders\.clip_g\.transformer\..*pass prefix="):
        load_text_encoder(f)
    with pytest.raises(CheckpointError, match="no text encoder under prefix 'text_encoders.clip_x.'"):
        load_text_encoder(f, prefix="text_encoders.clip_x.")
    # a file with exactly one encoder among other parts: found without prefix=
    one = {k: v for k, v in sd.items() if not k.startswith("text_encoders.clip")}
    save_safetensors_atomic(one, tmp_path / "t5_only.safetensors")
    check_t5(load_text_encoder(tmp_path / "t5_only.safetensors"), refs["t5"])


def test_bad_input(tmp_path, refs):
    sd = on_disk(refs["clip_l"])

    def attempt(tensors, match, config=None):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        save_safetensors_atomic(tensors, folder / "model.safetensors")
        if config:
            (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(CheckpointError, match=match):
            load_text_encoder(folder)

    missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    attempt(missing, r"missing 1 key\(s\), first: text_model\.encoder\.layers\.1\.mlp\.fc2\.bias")
    wrong = sd | {"text_model.encoder.layers.1.mlp.fc1.weight": torch.zeros(65, 768)}
    attempt(wrong, r"'text_model\.encoder\.layers\.1\.mlp\.fc1\.weight' has shape \[65, 768\].*expects \[64, 768\]")
    attempt(wrong, r"'text_model\.encoder\.layers\.1\.mlp\.fc1\.weight' has shape \[65, 768\].*\[64, 768\]")
    t5 = {k: v for k, v in t5_state(refs["t5"]).items() if "relative_attention_bias" not in k}
    attempt(t5, r"lacks key 'encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight'")
    attempt({"foo.weight": torch.zeros(1)}, "no CLIP or T5 text encoder")
    attempt(on_disk(refs["small"]), "width 64 without a config.json")
    attempt(t5_state(refs["t5"]), "only T5 v1.1's gated-gelu", config={"feed_forward_proj": "relu"})


def test_skip_out_of_range():
    enc = CLIPTextEncoder(CLIPConfig(vocab_size=10, max_positions=5, width=8, layers=2, heads=2, mlp_dim=8))
    with pytest.raises(ValueError, match=r"skip must be in \[0, 1\]"):
        enc(torch.zeros(1, 5, dtype=torch.long), skip=2)


@pytest.mark.parametrize("preset", ["clip-l", "clip-g", "t5-v1.1-xxl"])
def test_presets_have_the_reference_layout(preset):
    """The full-size presets, built on the meta device: same keys and shapes as transformers' model."""
    hf_config = {
        "clip-l": CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        "clip-g": CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                 hidden_act="gelu", projection_dim=1280),
        "t5-v1.1-xxl": T5Config(d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
                                feed_forward_proj="gated-gelu"),
    }[preset]
    with torch.device("meta"):
        if preset == "t5-v1.1-xxl":
            ours, ref = T5Encoder(t5.T5_PRESETS[preset]), T5EncoderModel(hf_config)
        else:
            cls = CLIPTextModelWithProjection if preset == "clip-g" else CLIPTextModel
            ours, ref = CLIPTextEncoder(CLIP_PRESETS[preset]), cls(hf_config)
    ref_shapes = {k: list(v.shape) for k, v in ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    ours_shapes = {k: list(v.shape) for k, v in ours.state_dict().items()}
    if preset == "clip-l":  # transformers >= 5.6 keeps CLIPTextModel's keys without `text_model.` in memory
        ref_shapes = {"text_model." + k: v for k, v in ref_shapes.items()}
    assert ours_shapes == ref_shapes
