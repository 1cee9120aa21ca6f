"""SD3 / SD3.5 layouts: the config an SAI checkpoint implies, and the Diffusers -> SAI key map.

SAI keys are ours (SAI sd3.5 `mmditx.py`). Diffusers splits the fused `qkv` into `to_q/to_k/to_v`
(image) and `add_q_proj/...` (text), renames the rest, and stores two adaLNs as (scale, shift) where
SAI has (shift, scale): the final layer's and the last block's pre-only context adaLN (both are
Diffusers' `AdaLayerNormContinuous`). Diffusers `loaders/single_file_utils.py`
(`convert_sd3_transformer_checkpoint_to_diffusers`), explained in docs/formats.md.
A family's layout module: the names are listed in convert/families.py.
"""

from __future__ import annotations

import math

from mmdit.sd3 import PRESETS, SD3Params

from .files import Checkpoint, CheckpointError, Config
from .mapping import KeyMap

NATIVE = "sai"
NATIVE_PROBE = "joint_blocks.0.context_block.attn.qkv.weight"
DIFFUSERS_CLASS = "SD3Transformer2DModel"
DIFFUSERS_PROBE = "pos_embed.pos_embed"  # FLUX's Diffusers layout has no position table
# Diffusers `StableDiffusion3Pipeline` folders -> our encoder roles
DIFFUSERS_TEXT_ENCODERS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5"}

_B = r"transformer_blocks\.(\d+)\."
_J = r"joint_blocks.\1."
_W = r"(weight|bias)"


def params_from_native(ckpt: Checkpoint) -> SD3Params:
    """The config implied by SAI keys and shapes (head dim: the qk-norm width, else SAI's 64)."""
    shape = ckpt.shapes(f"{ckpt.source} (SD3 checkpoint)")
    hidden, in_ch, patch, _ = shape["x_embedder.proj.weight"]
    n_pos = shape["pos_embed"][1]
    table = math.isqrt(n_pos)
    if table * table != n_pos:
        raise CheckpointError(f"{shape.what}: pos_embed has {n_pos} positions, not a square table")
    qk_norm = "joint_blocks.0.x_block.attn.ln_q.weight" in shape
    head_dim = shape["joint_blocks.0.x_block.attn.ln_q.weight"][0] if qk_norm else 64
    attn2 = shape.block_indices(r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight")  # MMDiT-X blocks
    return SD3Params(
        depth=shape.count_blocks(r"joint_blocks\.(\d+)\."),
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        patch_size=patch,
        in_channels=in_ch,
        out_channels=shape["final_layer.linear.weight"][0] // patch**2,
        pos_embed_max_size=table,
        adm_in_channels=shape["y_embedder.mlp.0.weight"][1],
        context_in_dim=shape["context_embedder.weight"][1],
        mlp_ratio=shape["joint_blocks.0.x_block.mlp.fc1.weight"][0] / hidden,
        qk_norm=qk_norm,
        x_block_self_attn_layers=tuple(sorted(attn2)),
    )


def params_from_diffusers_config(cfg: dict) -> SD3Params:
    """`SD3Transformer2DModel`'s config.json -> SD3Params (defaults: Diffusers' own); a field of the wrong
    type or an unsupported value is an error naming the file and the field."""
    cfg = Config.of(cfg)
    heads, hd = cfg.get_int("num_attention_heads", 18), cfg.get_int("attention_head_dim", 64)
    qk_norm = cfg.get_str("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise CheckpointError(f"{cfg.source}: field 'qk_norm' is {qk_norm!r}: only 'rms_norm' or none is supported")
    caption = cfg.get_int("caption_projection_dim", heads * hd)
    if caption != heads * hd:
        raise CheckpointError(
            f"{cfg.source}: unsupported SD3 config: field 'caption_projection_dim' {caption} differs from "
            f"the hidden size {heads * hd}"
        )
    in_ch = cfg.get_int("in_channels", 16)
    return SD3Params(
        depth=cfg.get_int("num_layers", 18),
        hidden_size=heads * hd,
        num_heads=heads,
        patch_size=cfg.get_int("patch_size", 2),
        in_channels=in_ch,
        out_channels=cfg.get_int("out_channels") or in_ch,
        pos_embed_max_size=cfg.get_int("pos_embed_max_size", 96),
        adm_in_channels=cfg.get_int("pooled_projection_dim", 2048),
        context_in_dim=cfg.get_int("joint_attention_dim", 4096),
        qk_norm=qk_norm is not None,
        x_block_self_attn_layers=cfg.get_ints("dual_attention_layers", ()),
    )


def variant_name(p: SD3Params) -> str:
    """The preset's name, else the preset the layout is like (SD3.5 Large and Large Turbo share one layout)."""
    for name, preset in PRESETS.items():
        if p == preset:
            return name
    if p.x_block_self_attn_layers:
        return "sd3.5-medium-like (custom size)"
    return "sd3.5-large-like (custom size)" if p.qk_norm else "sd3-medium-like (custom size)"


def diffusers_keymap(p: SD3Params) -> KeyMap:
    """Diffusers `SD3Transformer2DModel` keys -> SAI keys (the last block's index comes from p)."""
    return KeyMap(
        renames=[
            (r"pos_embed\.pos_embed", "pos_embed"),
            (rf"pos_embed\.proj\.{_W}", r"x_embedder.proj.\1"),
            (rf"time_text_embed\.timestep_embedder\.linear_1\.{_W}", r"t_embedder.mlp.0.\1"),
            (rf"time_text_embed\.timestep_embedder\.linear_2\.{_W}", r"t_embedder.mlp.2.\1"),
            (rf"time_text_embed\.text_embedder\.linear_1\.{_W}", r"y_embedder.mlp.0.\1"),
            (rf"time_text_embed\.text_embedder\.linear_2\.{_W}", r"y_embedder.mlp.2.\1"),
            (rf"context_embedder\.{_W}", r"context_embedder.\1"),
            (rf"{_B}attn\.norm_q\.weight", rf"{_J}x_block.attn.ln_q.weight"),
            (rf"{_B}attn\.norm_k\.weight", rf"{_J}x_block.attn.ln_k.weight"),
            (rf"{_B}attn\.norm_added_q\.weight", rf"{_J}context_block.attn.ln_q.weight"),
            (rf"{_B}attn\.norm_added_k\.weight", rf"{_J}context_block.attn.ln_k.weight"),
            (rf"{_B}attn\.to_out\.0\.{_W}", rf"{_J}x_block.attn.proj.\2"),
            (rf"{_B}attn\.to_add_out\.{_W}", rf"{_J}context_block.attn.proj.\2"),
            (rf"{_B}attn2\.norm_q\.weight", rf"{_J}x_block.attn2.ln_q.weight"),
            (rf"{_B}attn2\.norm_k\.weight", rf"{_J}x_block.attn2.ln_k.weight"),
            (rf"{_B}attn2\.to_out\.0\.{_W}", rf"{_J}x_block.attn2.proj.\2"),
            (rf"{_B}norm1\.linear\.{_W}", rf"{_J}x_block.adaLN_modulation.1.\2"),
            (rf"{_B}norm1_context\.linear\.{_W}", rf"{_J}context_block.adaLN_modulation.1.\2"),
            (rf"{_B}ff\.net\.0\.proj\.{_W}", rf"{_J}x_block.mlp.fc1.\2"),
            (rf"{_B}ff\.net\.2\.{_W}", rf"{_J}x_block.mlp.fc2.\2"),
            (rf"{_B}ff_context\.net\.0\.proj\.{_W}", rf"{_J}context_block.mlp.fc1.\2"),
            (rf"{_B}ff_context\.net\.2\.{_W}", rf"{_J}context_block.mlp.fc2.\2"),
            (rf"proj_out\.{_W}", r"final_layer.linear.\1"),
            (rf"norm_out\.linear\.{_W}", r"final_layer.adaLN_modulation.1.\1"),
        ],
        fused=[
            *[(rf"{_B}attn\.to_{c}\.{_W}", rf"{_J}x_block.attn.qkv.\2", i) for i, c in enumerate("qkv")],
            *[(rf"{_B}attn\.add_{c}_proj\.{_W}", rf"{_J}context_block.attn.qkv.\2", i) for i, c in enumerate("qkv")],
            *[(rf"{_B}attn2\.to_{c}\.{_W}", rf"{_J}x_block.attn2.qkv.\2", i) for i, c in enumerate("qkv")],
        ],
        swap=[
            rf"joint_blocks\.{p.depth - 1}\.context_block\.adaLN_modulation\.1\.{_W}",
            rf"final_layer\.adaLN_modulation\.1\.{_W}",
        ],
    )
