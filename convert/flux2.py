"""FLUX.2 layouts: the config a BFL FLUX.2 checkpoint implies, and the Diffusers -> BFL key map.

BFL keys are ours (BFL flux2 `src/flux2/model.py`). Diffusers' `Flux2Transformer2DModel` (0.42.1,
`models/transformers/transformer_flux2.py`) splits the double blocks' fused `qkv` into `to_q/to_k/to_v`
(`add_{q,k,v}_proj` for text), keeps the single blocks' `linear1`/`linear2` fused (`to_qkv_mlp_proj`,
`to_out`), renames the shared modulations `.lin` -> `.linear`, and stores the final adaLN as
(scale, shift) where BFL has (shift, scale). The SwiGLU halves are in the same order in both.
Facts: Diffusers `loaders/single_file_utils.py` `convert_flux2_transformer_checkpoint_to_diffusers`;
docs/flux2.md.
A family's layout module: the names are listed in convert/families.py. A FLUX.2 file also has FLUX.1's
probe key (`double_blocks.0.img_attn.qkv.weight`), so convert/families.py lists FLUX.2 before FLUX.1.
"""

from __future__ import annotations

from mmdit.flux2 import PRESETS, Flux2Params

from .files import Checkpoint, CheckpointError
from .mapping import KeyMap

NATIVE = "bfl"
NATIVE_PROBE = "single_stream_modulation.lin.weight"  # Diffusers' CHECKPOINT_KEY_NAMES["flux2"]
DIFFUSERS_CLASS = "Flux2Transformer2DModel"
DIFFUSERS_PROBE = "single_stream_modulation.linear.weight"
# One LLM text encoder (Diffusers `Flux2Pipeline` / `Flux2KleinPipeline`), loaded by convert/llm.py
DIFFUSERS_TEXT_ENCODERS = {"text_encoder": "llm"}

_B = r"transformer_blocks\.(\d+)\."
_S = r"single_transformer_blocks\.(\d+)\."

DIFFUSERS_TO_BFL = KeyMap(
    renames=[
        (r"x_embedder\.weight", "img_in.weight"),
        (r"context_embedder\.weight", "txt_in.weight"),
        (r"time_guidance_embed\.timestep_embedder\.linear_1\.weight", "time_in.in_layer.weight"),
        (r"time_guidance_embed\.timestep_embedder\.linear_2\.weight", "time_in.out_layer.weight"),
        (r"time_guidance_embed\.guidance_embedder\.linear_1\.weight", "guidance_in.in_layer.weight"),
        (r"time_guidance_embed\.guidance_embedder\.linear_2\.weight", "guidance_in.out_layer.weight"),
        (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.linear\.weight",
         r"\1.lin.weight"),
        (rf"{_B}attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
        (rf"{_B}attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
        (rf"{_B}attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
        (rf"{_B}attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
        (rf"{_B}attn\.to_out\.0\.weight", r"double_blocks.\1.img_attn.proj.weight"),
        (rf"{_B}attn\.to_add_out\.weight", r"double_blocks.\1.txt_attn.proj.weight"),
        (rf"{_B}ff\.linear_in\.weight", r"double_blocks.\1.img_mlp.0.weight"),
        (rf"{_B}ff\.linear_out\.weight", r"double_blocks.\1.img_mlp.2.weight"),
        (rf"{_B}ff_context\.linear_in\.weight", r"double_blocks.\1.txt_mlp.0.weight"),
        (rf"{_B}ff_context\.linear_out\.weight", r"double_blocks.\1.txt_mlp.2.weight"),
        (rf"{_S}attn\.to_qkv_mlp_proj\.weight", r"single_blocks.\1.linear1.weight"),
        (rf"{_S}attn\.to_out\.weight", r"single_blocks.\1.linear2.weight"),
        (rf"{_S}attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
        (rf"{_S}attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
        (r"norm_out\.linear\.weight", "final_layer.adaLN_modulation.1.weight"),
        (r"proj_out\.weight", "final_layer.linear.weight"),
    ],
    fused=[  # one fused qkv per stream from three projections, in q, k, v order
        *[(rf"{_B}attn\.to_{c}\.weight", r"double_blocks.\1.img_attn.qkv.weight", i)
          for i, c in enumerate("qkv")],
        *[(rf"{_B}attn\.add_{c}_proj\.weight", r"double_blocks.\1.txt_attn.qkv.weight", i)
          for i, c in enumerate("qkv")],
    ],
    swap=[r"final_layer\.adaLN_modulation\.1\.weight"],
)


def diffusers_keymap(params: Flux2Params) -> KeyMap:
    """Diffusers `Flux2Transformer2DModel` keys -> BFL keys (the same rules for every size)."""
    return DIFFUSERS_TO_BFL


def params_from_native(ckpt: Checkpoint) -> Flux2Params:
    """The config implied by BFL keys and shapes, never a name.

    Block counts from the block indices, width from `img_in`, head dim from the q-norm width, MLP width
    from `img_mlp.2`, guidance embedding from the presence of `guidance_in`. RoPE's split and theta are
    not stored in a file: 4 equal axes (BFL's (32, 32, 32, 32) at head dim 128), theta 2000.
    """
    shape = ckpt.shapes("FLUX.2 checkpoint")
    hidden, in_ch = shape["img_in.weight"]
    head_dim = shape["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    mlp_hidden = shape["double_blocks.0.img_mlp.2.weight"][1]
    out_ch = shape["final_layer.linear.weight"][0]
    if out_ch != in_ch:
        raise CheckpointError(f"FLUX.2 checkpoint: final_layer.linear has {out_ch} outputs, img_in {in_ch} inputs")
    if hidden % head_dim or head_dim % 8:
        raise CheckpointError(f"FLUX.2 checkpoint: head dim {head_dim} (from the q norm) does not fit width {hidden}")
    p = Flux2Params(
        in_channels=in_ch,
        context_in_dim=shape["txt_in.weight"][1],
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth=shape.count_blocks(r"double_blocks\.(\d+)\."),
        depth_single_blocks=shape.count_blocks(r"single_blocks\.(\d+)\."),
        mlp_ratio=mlp_hidden / hidden,
        axes_dim=(head_dim // 4,) * 4,
        guidance_embed="guidance_in.in_layer.weight" in shape,
    )
    if p.mlp_hidden != mlp_hidden:
        raise CheckpointError(f"FLUX.2 checkpoint: MLP width {mlp_hidden} is not a ratio of the width {hidden}")
    return p


# Flux2Transformer2DModel's constructor defaults (the [dev] config); values our model does not implement.
DIFFUSERS_DEFAULTS = dict(
    patch_size=1, in_channels=128, out_channels=None, num_layers=8, num_single_layers=48, attention_head_dim=128,
    num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=True,
)
_FIXED = dict(patch_size=1, timestep_guidance_channels=256, eps=1e-6)


def params_from_diffusers_config(cfg: dict) -> Flux2Params:
    """Params from a Diffusers `transformer/config.json` (missing entries: the class defaults)."""
    c = {**DIFFUSERS_DEFAULTS, **{k: v for k, v in cfg.items() if k in DIFFUSERS_DEFAULTS}}
    for k, v in _FIXED.items():
        if c[k] != v:
            raise CheckpointError(f"Flux2Transformer2DModel config: {k}={c[k]} is not supported (only {v})")
    if c["out_channels"] not in (None, c["in_channels"]):
        raise CheckpointError(f"Flux2Transformer2DModel config: out_channels {c['out_channels']} != in_channels")
    return Flux2Params(
        in_channels=c["in_channels"],
        context_in_dim=c["joint_attention_dim"],
        hidden_size=c["num_attention_heads"] * c["attention_head_dim"],
        num_heads=c["num_attention_heads"],
        depth=c["num_layers"],
        depth_single_blocks=c["num_single_layers"],
        mlp_ratio=float(c["mlp_ratio"]),
        axes_dim=tuple(c["axes_dims_rope"]),
        theta=int(c["rope_theta"]),
        guidance_embed=bool(c["guidance_embeds"]),
    )


# The text encoder a [klein] context width asks for: it names the size even when the rest is custom.
_KLEIN_BY_CONTEXT = {7680: "flux2-klein-4b", 12288: "flux2-klein-9b"}  # Qwen3-4B / Qwen3-8B, 3 layers stacked


def variant_name(p: Flux2Params) -> str:
    """The preset's name, else "<closest>-like (custom size)": [dev] has guidance embedding, [klein] not;
    a [klein] size is named by its context width when it is Qwen3-4B's or -8B's, else "flux2-klein-like"."""
    for name, preset in PRESETS.items():
        if p == preset:
            return name
    if p.guidance_embed:
        return "flux2-dev-like (custom size)"
    return f"{_KLEIN_BY_CONTEXT.get(p.context_in_dim, 'flux2-klein')}-like (custom size)"
