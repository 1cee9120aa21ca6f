"""FLUX.1 layouts: the config a BFL checkpoint implies, and the Diffusers -> BFL key map.

BFL keys are ours (BFL flux `src/flux/model.py`). Diffusers splits the fused projections (`qkv` into
`to_q/to_k/to_v`, the single block's `linear1` into `to_q/to_k/to_v/proj_mlp`) and stores the final
adaLN as (scale, shift) where BFL has (shift, scale): Diffusers `loaders/single_file_utils.py`
(`convert_flux_transformer_checkpoint_to_diffusers`), explained in docs/formats.md.
A family's layout module: the names are listed in convert/families.py.
"""

from __future__ import annotations

from mmdit.flux import PRESETS, FluxParams

from .files import Checkpoint, Config
from .mapping import KeyMap

NATIVE = "bfl"
NATIVE_PROBE = "double_blocks.0.img_attn.qkv.weight"
DIFFUSERS_CLASS = "FluxTransformer2DModel"
DIFFUSERS_PROBE = "single_transformer_blocks.0.attn.to_q.weight"
DIFFUSERS_TEXT_ENCODERS = {"text_encoder": "clip_l", "text_encoder_2": "t5"}  # Diffusers `FluxPipeline`

_B = r"transformer_blocks\.(\d+)\."
_S = r"single_transformer_blocks\.(\d+)\."
_W = r"(weight|bias)"

DIFFUSERS_TO_BFL = KeyMap(
    renames=[
        (rf"x_embedder\.{_W}", r"img_in.\1"),
        (rf"context_embedder\.{_W}", r"txt_in.\1"),
        (rf"time_text_embed\.timestep_embedder\.linear_1\.{_W}", r"time_in.in_layer.\1"),
        (rf"time_text_embed\.timestep_embedder\.linear_2\.{_W}", r"time_in.out_layer.\1"),
        (rf"time_text_embed\.text_embedder\.linear_1\.{_W}", r"vector_in.in_layer.\1"),
        (rf"time_text_embed\.text_embedder\.linear_2\.{_W}", r"vector_in.out_layer.\1"),
        (rf"time_text_embed\.guidance_embedder\.linear_1\.{_W}", r"guidance_in.in_layer.\1"),
        (rf"time_text_embed\.guidance_embedder\.linear_2\.{_W}", r"guidance_in.out_layer.\1"),
        (rf"{_B}norm1\.linear\.{_W}", r"double_blocks.\1.img_mod.lin.\2"),
        (rf"{_B}norm1_context\.linear\.{_W}", r"double_blocks.\1.txt_mod.lin.\2"),
        (rf"{_B}attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale"),
        (rf"{_B}attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale"),
        (rf"{_B}attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale"),
        (rf"{_B}attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale"),
        (rf"{_B}attn\.to_out\.0\.{_W}", r"double_blocks.\1.img_attn.proj.\2"),
        (rf"{_B}attn\.to_add_out\.{_W}", r"double_blocks.\1.txt_attn.proj.\2"),
        (rf"{_B}ff\.net\.0\.proj\.{_W}", r"double_blocks.\1.img_mlp.0.\2"),
        (rf"{_B}ff\.net\.2\.{_W}", r"double_blocks.\1.img_mlp.2.\2"),
        (rf"{_B}ff_context\.net\.0\.proj\.{_W}", r"double_blocks.\1.txt_mlp.0.\2"),
        (rf"{_B}ff_context\.net\.2\.{_W}", r"double_blocks.\1.txt_mlp.2.\2"),
        (rf"{_S}norm\.linear\.{_W}", r"single_blocks.\1.modulation.lin.\2"),
        (rf"{_S}attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale"),
        (rf"{_S}attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale"),
        (rf"{_S}proj_out\.{_W}", r"single_blocks.\1.linear2.\2"),
        (rf"proj_out\.{_W}", r"final_layer.linear.\1"),
        (rf"norm_out\.linear\.{_W}", r"final_layer.adaLN_modulation.1.\1"),
    ],
    fused=[
        *[(rf"{_B}attn\.to_{c}\.{_W}", r"double_blocks.\1.img_attn.qkv.\2", i) for i, c in enumerate("qkv")],
        *[(rf"{_B}attn\.add_{c}_proj\.{_W}", r"double_blocks.\1.txt_attn.qkv.\2", i) for i, c in enumerate("qkv")],
        *[(rf"{_S}attn\.to_{c}\.{_W}", r"single_blocks.\1.linear1.\2", i) for i, c in enumerate("qkv")],
        (rf"{_S}proj_mlp\.{_W}", r"single_blocks.\1.linear1.\2", 3),
    ],
    swap=[r"final_layer\.adaLN_modulation\.1\.(weight|bias)"],
)


def diffusers_keymap(params: FluxParams) -> KeyMap:
    """Diffusers `FluxTransformer2DModel` keys -> BFL keys (the same rules for every size)."""
    return DIFFUSERS_TO_BFL


def params_from_native(ckpt: Checkpoint) -> FluxParams:
    """The config implied by BFL keys and shapes (axes_dim: (16, 56, 56) scaled to the head dim)."""
    shape = ckpt.shapes(f"{ckpt.source} (FLUX checkpoint)")
    hidden, in_ch = shape["img_in.weight"]
    head_dim = shape["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    return FluxParams(
        in_channels=in_ch,
        out_channels=shape["final_layer.linear.weight"][0],
        vec_in_dim=shape["vector_in.in_layer.weight"][1],
        context_in_dim=shape["txt_in.weight"][1],
        hidden_size=hidden,
        mlp_ratio=shape["double_blocks.0.img_mlp.0.weight"][0] / hidden,
        num_heads=hidden // head_dim,
        depth=shape.count_blocks(r"double_blocks\.(\d+)\."),
        depth_single_blocks=shape.count_blocks(r"single_blocks\.(\d+)\."),
        axes_dim=default_axes(head_dim),
        qkv_bias="double_blocks.0.img_attn.qkv.bias" in shape,
        guidance_embed="guidance_in.in_layer.weight" in shape,
    )


def default_axes(head_dim: int) -> tuple[int, int, int]:
    """FLUX's RoPE split (16, 56, 56) for head dim 128; other head dims keep the 1:3.5:3.5 ratio in even parts."""
    if head_dim == 128:
        return (16, 56, 56)
    a = 2 * round(head_dim / 16)
    b = (head_dim - a) // 2 // 2 * 2
    return (head_dim - 2 * b, b, b)


def params_from_diffusers_config(cfg: dict) -> FluxParams:
    """`FluxTransformer2DModel`'s config.json -> FluxParams (defaults: Diffusers' own); a field of the wrong
    type is an error naming the file and the field."""
    cfg = Config.of(cfg)
    heads, hd = cfg.get_int("num_attention_heads", 24), cfg.get_int("attention_head_dim", 128)
    in_ch = cfg.get_int("in_channels", 64)
    return FluxParams(
        in_channels=in_ch,
        out_channels=cfg.get_int("out_channels") or in_ch,
        vec_in_dim=cfg.get_int("pooled_projection_dim", 768),
        context_in_dim=cfg.get_int("joint_attention_dim", 4096),
        hidden_size=heads * hd,
        num_heads=heads,
        depth=cfg.get_int("num_layers", 19, minimum=0),
        depth_single_blocks=cfg.get_int("num_single_layers", 38, minimum=0),
        axes_dim=cfg.get_ints("axes_dims_rope", (16, 56, 56)),
        guidance_embed=cfg.get_bool("guidance_embeds", False),
    )


def variant_name(p: FluxParams) -> str:
    """The preset's name, else what the shapes suggest (Fill and Depth/Canny by their input width, as Diffusers
    `loaders/single_file_utils.py` `infer_diffusers_model_type` tells them apart)."""
    for name, preset in PRESETS.items():
        if p == preset:
            return name
    if p.in_channels == 384:
        return "flux-fill"
    if p.in_channels == 128:
        return "flux-depth/canny"
    return "flux-dev-like (custom size)" if p.guidance_embed else "flux-schnell-like (custom size)"
