"""SD3 / SD3.5 / SD3.5 Medium (MMDiT-X) against Diffusers' `SD3Transformer2DModel`.

Tiny random models in SAI's layout are saved as half-precision single files; the reference gets the
same rounded weights through Diffusers' own single-file converter, ours through `convert.load_transformer`.
TACA's reference is Diffusers' joint attention rewritten with explicit logits (Diffusers puts the
IMAGE tokens first, so its scaled block is image queries x text keys = `[:, :, :n_img, n_img:]`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from builders import randomize_, rel_err
from convert import CheckpointError, detect_transformer, load_transformer, save_safetensors_atomic
from convert.__main__ import main as convert_cli
from convert.files import Checkpoint, Entry
from convert.sd3 import params_from_diffusers_config, params_from_native, variant_name
from mmdit import build_model
from mmdit.attention import as_temperature_matrix
from mmdit.sd3 import PRESETS, SD3, SD3Params

# SD3's tiny layout (head_dim 64 as in the real models), narrow inputs, a 16 x 16 position table (latents up to 32 x 32)
_TINY = replace(PRESETS["sd3-medium"].tiny(), pos_embed_max_size=16, adm_in_channels=32, context_in_dim=48)
CASES = {
    "sd3-medium-like": _TINY,
    "sd3.5-large-like": replace(_TINY, depth=3, qk_norm=True),
    "sd3.5-medium-like": replace(_TINY, depth=3, qk_norm=True, x_block_self_attn_layers=(0, 1)),
}
PREFIX = "model.diffusion_model."
EXTRA = {  # parts of an SAI single file that belong to other loaders
    "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8),
    "first_stage_model.decoder.conv_in.weight": torch.ones(4, 16, 3, 3),
}


def sai_state(p: SD3Params, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random SD3 state dict in SAI's layout (float32); the position table is random too."""
    model = randomize_(SD3(p), seed)
    model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return {k: v.clone() for k, v in model.state_dict().items()}


def write_sai(path, sd: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str = PREFIX, extra=EXTRA) -> None:
    save_safetensors_atomic({**{prefix + k: v.to(dtype) for k, v in sd.items()}, **extra}, path)


def diffusers_sd3(p: SD3Params, sai_file):
    """The reference: Diffusers' model, loaded through Diffusers' single-file converter (float32)."""
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    sd = {k: v.float() for k, v in load_file(str(sai_file)).items() if k.startswith(PREFIX)}
    ref = SD3Transformer2DModel(
        sample_size=2 * p.pos_embed_max_size, patch_size=p.patch_size, in_channels=p.in_channels,
        num_layers=p.depth, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, caption_projection_dim=p.hidden_size,
        pooled_projection_dim=p.adm_in_channels, out_channels=p.out_channels,
        pos_embed_max_size=p.pos_embed_max_size, dual_attention_layers=p.x_block_self_attn_layers,
        qk_norm="rms_norm" if p.qk_norm else None,
    )
    ref.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(sd), strict=True)
    return ref.eval()


class ExplicitJointAttention:
    """Diffusers' JointAttnProcessor2_0 with explicit logits times the temperature T[query modality][key modality]."""

    def __init__(self, temperature):
        self.T = as_temperature_matrix(temperature)  # (B|1, H|1, 2, 2), 0 = text, 1 = image

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        B, n_img, _ = hidden_states.shape

        def heads(t):  # (B, L, H*D) -> (B, H, L, D)
            return t.view(B, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)

        x, c = hidden_states, encoder_hidden_states
        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        cq, ck, cv = heads(attn.add_q_proj(c)), heads(attn.add_k_proj(c)), heads(attn.add_v_proj(c))
        if attn.norm_q is not None:
            q, k, cq, ck = attn.norm_q(q), attn.norm_k(k), attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat((q, cq), 2), torch.cat((k, ck), 2), torch.cat((v, cv), 2)  # image FIRST
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, L, L)
        m = (torch.arange(q.shape[2]) < n_img).long()  # modality: image 1, text 0
        logits = logits * self.T[:, :, m[:, None], m[None, :]]  # float gamma: only [:, :, :n_img, n_img:]
        out = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, L, H*D)
        img, txt = out[:, :n_img], out[:, n_img:]
        return attn.to_out[0](img), (None if attn.context_pre_only else attn.to_add_out(txt))


def inputs(p: SD3Params, B: int = 2, H: int = 12, W: int = 8, L: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, p.in_channels, H, W, generator=g),
        torch.rand(B, generator=g),
        torch.randn(B, L, p.context_in_dim, generator=g),
        torch.randn(B, p.adm_in_channels, generator=g),
    )


def reference(ref, x, t, context, pooled):
    with torch.no_grad():
        out = ref(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t * 1000,
                  return_dict=False)
    return out[0]


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(name, params, SAI file, our model, Diffusers' model); fp16 files for two cases, bf16 for the last."""
    name, p = request.param, CASES[request.param]
    dtype = torch.bfloat16 if name == "sd3.5-medium-like" else torch.float16
    path = tmp_path_factory.mktemp(name) / "sd3.safetensors"
    write_sai(path, sai_state(p), dtype)
    return name, p, path, load_transformer(path, dtype=torch.float32), diffusers_sd3(p, path)


@torch.no_grad()
def test_matches_diffusers(pair):
    _, p, _, ours, ref = pair
    assert ours.params == p and ours.family == "sd3"
    for H, W in ((12, 8), (32, 32), (6, 18)):  # non-square and cropped, the whole table, crop on one axis
        x, t, context, pooled = inputs(p, H=H, W=W)
        out = ours(x, t, context, pooled)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert rel_err(out, reference(ref, x, t, context, pooled)) <= 1e-4
        # guidance is part of the shared interface; SD3 ignores it
        assert torch.equal(ours(x, t, context, pooled, guidance=torch.full((2,), 3.5)), out)


@torch.no_grad()
def test_taca_matches_diffusers(pair):
    _, p, _, ours, ref = pair
    x, t, context, pooled = inputs(p)
    plain = ours(x, t, context, pooled)
    per_head = 1 + torch.rand(2, p.num_heads, 2, 2, generator=torch.Generator().manual_seed(3))  # [B, H, 2, 2]
    for temperature in (1.7, per_head):
        out = ours(x, t, context, pooled, temperature=temperature)
        joint = {blk.attn: blk.attn.processor for blk in ref.transformer_blocks}
        try:
            for attn in joint:  # the joint attentions only: attn2 (MMDiT-X) keeps Diffusers' own processor
                attn.set_processor(ExplicitJointAttention(temperature))
            expected = reference(ref, x, t, context, pooled)
        finally:
            for attn, proc in joint.items():
                attn.set_processor(proc)
        assert rel_err(out, expected) <= 1e-4
        assert rel_err(out, plain) > 1e-3  # the temperature does change the output


@torch.no_grad()
def test_latent_larger_than_table(pair):
    _, p, _, ours, _ = pair
    x, t, context, pooled = inputs(p, H=34, W=8)
    with pytest.raises(ValueError, match=r"34x8 \(17x4 patches\).*16x16 patches"):
        ours(x, t, context, pooled)


@torch.no_grad()
def test_half_precision_model_returns_input_dtype(pair):
    _, p, path, ours, _ = pair
    half = load_transformer(path)  # the file's own dtype
    assert half.dtype == (torch.bfloat16 if p.x_block_self_attn_layers else torch.float16)
    x, t, context, pooled = inputs(p)
    out = half(x, t, context, pooled)
    assert out.dtype == torch.float32 and rel_err(out, ours(x, t, context, pooled)) < 5e-2


def test_single_file_parts_and_prefixes(tmp_path):
    """Bundled encoders and VAE are skipped; prefixed and bare keys load the same exact weights."""
    p = CASES["sd3.5-medium-like"]
    sd = sai_state(p, seed=4)
    for prefix, extra in ((PREFIX, EXTRA), ("", {})):
        path = tmp_path / f"sd3{prefix}.safetensors"
        write_sai(path, sd, torch.bfloat16, prefix, extra)
        loaded = load_transformer(path).state_dict()
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in sd.items())


@torch.no_grad()
def test_diffusers_folder_loads(pair, tmp_path):
    name, p, _, _, ref = pair
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="200KB")  # sharded, with config.json
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    d = detect_transformer(tmp_path)
    assert (d.family, d.layout, d.params, d.variant) == ("sd3", "diffusers", p, variant_name(p))
    ours = load_transformer(tmp_path, dtype=torch.float32)
    x, t, context, pooled = inputs(p, seed=1)
    assert rel_err(ours(x, t, context, pooled), reference(ref, x, t, context, pooled)) <= 1e-4


def test_inspect(pair, capsys):
    name, p, path, _, _ = pair
    assert convert_cli(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "family:     sd3" in out and "layout:     sai" in out
    assert f"variant:    {name} (custom size)" in out
    assert f"depth = {p.depth}" in out and f"x_block_self_attn_layers = {list(p.x_block_self_attn_layers)}" in out


# Official `transformer/config.json` values (stabilityai/stable-diffusion-3-medium-diffusers, -3.5-large, -3.5-medium)
OFFICIAL_CONFIGS = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
                        qk_norm="rms_norm"),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         qk_norm="rms_norm", dual_attention_layers=list(range(13))),
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_from_full_size_shapes(name):
    """The full-size key and shape lists (built on the meta device, read as a header) and configs give the preset."""
    with torch.device("meta"):
        sd = SD3(PRESETS[name]).state_dict()
    ckpt = Checkpoint([], _entries={k: Entry(None, 0, list(v.shape), torch.bfloat16) for k, v in sd.items()})
    assert params_from_native(ckpt) == PRESETS[name] and variant_name(PRESETS[name]) == name
    cfg = dict(attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048, **OFFICIAL_CONFIGS[name])
    assert params_from_diffusers_config(cfg) == PRESETS[name]
    # the SAI single files (docs/formats.md, SD3 SAI layout)
    n_keys = {"sd3-medium": 491, "sd3.5-large": 923, "sd3.5-medium": 665}[name]
    assert len(sd) == n_keys


@pytest.mark.parametrize("name", list(PRESETS))
def test_tiny_keeps_the_layout(name):
    p = PRESETS[name]
    tiny = p.tiny()
    assert (tiny.depth, tiny.num_heads, tiny.head_dim) == (2, 2, p.head_dim)
    assert (tiny.qk_norm, tiny.in_channels, tiny.adm_in_channels, tiny.context_in_dim) == (
        p.qk_norm, p.in_channels, p.adm_in_channels, p.context_in_dim)
    assert bool(tiny.x_block_self_attn_layers) == bool(p.x_block_self_attn_layers)  # MMDiT-X keeps an attn2
    model = build_model(tiny)
    assert type(model) is SD3 and model.family == tiny.family == "sd3" and model.params == tiny


def test_bad_checkpoints(tmp_path):
    p = CASES["sd3.5-medium-like"]
    sd = sai_state(p)

    def load(tensors):
        path = tmp_path / "bad.safetensors"
        write_sai(path, tensors, torch.float16)
        load_transformer(path)

    key = "joint_blocks.1.x_block.attn2.proj.bias"
    with pytest.raises(CheckpointError, match=f"missing 1 key.*{key}"):
        load({k: v for k, v in sd.items() if k != key})
    key = "joint_blocks.0.context_block.mlp.fc1.bias"
    with pytest.raises(CheckpointError, match=rf"{key}' has shape \[{4 * p.hidden_size + 1}\]"):
        load({**sd, key: torch.zeros(4 * p.hidden_size + 1)})
    with pytest.raises(CheckpointError, match="lacks key 'y_embedder.mlp.0.weight'"):
        load({k: v for k, v in sd.items() if not k.startswith("y_embedder")})
    with pytest.raises(CheckpointError, match="unexpected 1 key.*joint_blocks.0.x_block.extra"):
        load({**sd, "joint_blocks.0.x_block.extra": torch.zeros(1)})
