"""Detect and load the text encoders: CLIP-L, OpenCLIP bigG and T5-XXL, from any of their official layouts.

What an encoder is, and its config, come from its keys and shapes (and the folder's config.json when
there is one), never from a file name. Layouts read (docs/formats.md, "Text encoders"):
- Hugging Face folders (`text_encoder*/`: config.json + safetensors, sharded or not);
- SAI single files `clip_l.safetensors` (no `text_projection`), `clip_g.safetensors`,
  `t5xxl_fp16.safetensors` / `t5xxl_fp8_e4m3fn.safetensors` (float8 is upcast at load);
- the `text_encoders.{clip_l,clip_g,t5xxl}.transformer.` parts of SAI single files (`prefix=`,
  or found alone when the file holds exactly one encoder);
- transformers >= 5.6 `save_pretrained` of a `CLIPTextModel` (keys without `text_model.`);
- open_clip's layout (`transformer.resblocks.N...`, fused `in_proj`, `text_projection` as `x @ P`;
  a whole open_clip model's `visual.*` tower is left out).
T5's `shared.weight` and `encoder.embed_tokens.weight` are tied aliases: either or both may be there.
The model is built on the meta device and filled tensor by tensor with a strict load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from mmdit.clip import ACTIVATIONS, CLIPConfig, CLIPTextEncoder
from mmdit.t5 import T5Config, T5Encoder

from .files import Checkpoint, CheckpointError, Config, Shapes, load_state_dict_strict, read_config
from .mapping import KeyMap

# layout -> a key every checkpoint of it has; what precedes it in a file is the encoder's prefix
PROBES = {
    "t5": "encoder.block.0.layer.0.SelfAttention.q.weight",
    "clip": "text_model.embeddings.token_embedding.weight",
    "clip-flat": "embeddings.token_embedding.weight",
    "open_clip": "transformer.resblocks.0.attn.in_proj_weight",
}
# Keys that carry nothing the model needs: CLIP's `position_ids` buffer (older files), open_clip's `logit_scale`.
IGNORED = ("text_model.embeddings.position_ids", "logit_scale")
# A whole open_clip model's vision tower (it has resblocks too): not part of the text encoder.
VISION = "visual."
# Without a config.json, CLIP's activation follows from its width: OpenAI's quick GELU, OpenCLIP's GELU.
ACT_BY_WIDTH = {768: "quick_gelu", 1280: "gelu"}

_L = r"transformer\.resblocks\.(\d+)\."
_OURS = r"text_model.encoder.layers.\1."
OPEN_CLIP = KeyMap(
    renames=[
        (r"token_embedding\.weight", "text_model.embeddings.token_embedding.weight"),
        (r"positional_embedding", "text_model.embeddings.position_embedding.weight"),
        (r"ln_final\.(weight|bias)", r"text_model.final_layer_norm.\1"),
        (rf"{_L}ln_([12])\.(weight|bias)", _OURS + r"layer_norm\2.\3"),
        (rf"{_L}mlp\.c_fc\.(weight|bias)", _OURS + r"mlp.fc1.\2"),
        (rf"{_L}mlp\.c_proj\.(weight|bias)", _OURS + r"mlp.fc2.\2"),
        (rf"{_L}attn\.out_proj\.(weight|bias)", _OURS + r"self_attn.out_proj.\2"),
        (rf"{_L}attn\.in_proj_(weight|bias)", _OURS + r"self_attn.in_proj.\2"),  # split into q, k, v below
        (r"text_projection", "text_projection.weight"),  # transposed below
        (r"logit_scale", "logit_scale"),
    ]
)

Loader = Callable[[], torch.Tensor]


def find_encoders(ckpt: Checkpoint) -> dict[str, str]:
    """{prefix: layout} of every text encoder in the file."""
    found: dict[str, str] = {}
    for key in ckpt:
        for layout, probe in PROBES.items():
            if not key.endswith(probe):
                continue
            prefix = key[: -len(probe)]
            if prefix.endswith(VISION) or (layout == "clip-flat" and prefix.endswith("text_model.")):
                continue  # open_clip's vision tower; a `text_model.` key, the "clip" layout
            found[prefix] = layout
    return found


def _source(ckpt: Checkpoint, layout: str, dtype: torch.dtype, device) -> tuple[dict[str, Loader], dict[str, list]]:
    """The encoder's tensors under our key names: lazy loaders and their shapes."""
    if layout == "open_clip":
        return _open_clip_source(ckpt, dtype, device)
    names = {k: k for k in ckpt}  # ours -> source
    if layout == "clip-flat":
        names = {(k if k == "text_projection.weight" else "text_model." + k): k for k in ckpt}
    if layout == "t5" and "encoder.embed_tokens.weight" in names:
        src = names.pop("encoder.embed_tokens.weight")
        names.setdefault("shared.weight", src)
    names = {ours: src for ours, src in names.items() if ours not in IGNORED}
    loaders = {ours: (lambda s=src: ckpt.load(s, dtype, device)) for ours, src in names.items()}
    return loaders, {ours: ckpt.shape(src) for ours, src in names.items()}


def _open_clip_source(ckpt: Checkpoint, dtype: torch.dtype, device) -> tuple[dict[str, Loader], dict[str, list]]:
    """open_clip -> our keys: `in_proj` rows are q, k, v; `text_projection` is used as `x @ P` (Diffusers
    `loaders/single_file_utils.py` `convert_open_clip_checkpoint`)."""
    loaders, shapes = {}, {}
    for ours, (src,) in OPEN_CLIP.plan([k for k in ckpt if not k.startswith(VISION)], ckpt.source).items():
        if ours in IGNORED:
            continue
        shape = ckpt.shape(src)
        if ".in_proj." in ours:
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                part = ours.replace("in_proj", name)
                loaders[part] = lambda s=src, i=i: ckpt.load(s, dtype, device).chunk(3, dim=0)[i].contiguous()
                shapes[part] = [shape[0] // 3, *shape[1:]]
        elif ours == "text_projection.weight":
            loaders[ours] = lambda s=src: ckpt.load(s, dtype, device).T.contiguous()
            shapes[ours] = shape[::-1]
        else:
            loaders[ours] = lambda s=src: ckpt.load(s, dtype, device)
            shapes[ours] = shape
    return loaders, shapes


def t5_config(shape: Shapes, config: dict | None, source: str) -> T5Config:
    """T5's config from the tensor shapes; config.json, when present, gives what shapes cannot (distance, eps)."""
    config = Config.of(config or {}, f"{source}/config.json")
    ff = config.get_str("feed_forward_proj", "gated-gelu")
    if ff != "gated-gelu":
        raise CheckpointError(
            f"{config.source}: field 'feed_forward_proj' is {ff!r}: only T5 v1.1's gated-gelu is supported"
        )
    vocab, d_model = shape["shared.weight"]
    buckets, heads = shape["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    inner = shape["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    return T5Config(
        vocab_size=vocab, d_model=d_model, d_kv=config.get_int("d_kv", inner // heads), num_heads=heads,
        d_ff=shape["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=shape.count_blocks(r"encoder\.block\.(\d+)\."), num_buckets=buckets,
        max_distance=config.get_int("relative_attention_max_distance", 128),
        eps=config.get_float("layer_norm_epsilon", 1e-6),
    )


def clip_config(shape: Shapes, config: dict | None, source: str) -> CLIPConfig:
    """CLIP's config from the tensor shapes; heads and activation from config.json, else from the width."""
    vocab, width = shape["text_model.embeddings.token_embedding.weight"]
    config = Config.of(config, f"{source}/config.json")
    if config is not None:
        act, heads = config.get_str("hidden_act", "quick_gelu"), config.get_int("num_attention_heads", width // 64)
    elif width in ACT_BY_WIDTH:
        act, heads = ACT_BY_WIDTH[width], width // 64
    else:
        raise CheckpointError(
            f"{source}: CLIP text encoder of width {width} without a config.json: its activation is known only "
            f"for widths {sorted(ACT_BY_WIDTH)}"
        )
    if act not in ACTIVATIONS:
        raise CheckpointError(f"{config.source if config else source}: unsupported CLIP activation {act!r}")
    if width % heads:
        raise CheckpointError(f"{config.source}: field 'num_attention_heads' {heads} does not divide the width {width}")
    proj = shape.get("text_projection.weight")
    return CLIPConfig(
        vocab_size=vocab, width=width, heads=heads, act=act,
        max_positions=shape["text_model.embeddings.position_embedding.weight"][0],
        layers=shape.count_blocks(r"text_model\.encoder\.layers\.(\d+)\."),
        mlp_dim=shape["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        projection_dim=proj[0] if proj else None,
        eps=config.get_float("layer_norm_eps", 1e-5) if config is not None else 1e-5,
    )


def load_text_encoder(
    path, device="cpu", dtype: torch.dtype | None = None, prefix: str | None = None
) -> T5Encoder | CLIPTextEncoder:
    """Load a T5 or CLIP text encoder; kind and config come from the file (and its folder's config.json).

    prefix: the encoder's key prefix in a file holding several (e.g. "text_encoders.clip_g.transformer.").
    dtype: defaults to the file's own (float8 files are upcast to bfloat16).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    config = read_config(path / "config.json")  # None beside a single file
    ckpt, source = Checkpoint.open(path), str(path)

    found = find_encoders(ckpt)
    if prefix is None:
        if not found:
            raise CheckpointError(f"{source}: holds no CLIP or T5 text encoder")
        if len(found) > 1:
            listed = ", ".join(map(repr, sorted(found)))
            raise CheckpointError(f"{source}: holds {len(found)} text encoders (prefixes: {listed}): pass prefix=")
        (prefix,) = found
    elif prefix not in found:
        raise CheckpointError(f"{source}: no text encoder under prefix {prefix!r} (found: {sorted(found) or 'none'})")
    layout, ckpt = found[prefix], ckpt.with_prefix(prefix)
    if prefix:
        source += f" [{prefix}]"

    dtype = dtype or ckpt.load_dtype()
    loaders, shapes = _source(ckpt, layout, dtype, device)
    what, cfg = encoder_config(Shapes(shapes, source), layout, config, source)
    with torch.device("meta"):
        model = (T5Encoder if layout == "t5" else CLIPTextEncoder)(cfg)
    load_state_dict_strict(model, loaders, f"{what} ({cfg})", source)
    return model.eval().requires_grad_(False)


def encoder_config(shapes: Shapes, layout: str, config: dict | None, source: str) -> tuple[str, T5Config | CLIPConfig]:
    """What the encoder is ("T5 encoder" or "CLIP text encoder") and its config, from our keys' shapes."""
    try:
        if layout == "t5":
            return "T5 encoder", t5_config(shapes, config, source)
        return "CLIP text encoder", clip_config(shapes, config, source)
    except CheckpointError:
        raise
    except ValueError as e:  # the config dataclass's own checks
        raise CheckpointError(f"{source}: its shapes and config give an invalid text encoder: {e}") from None


def encoder_shapes(ckpt: Checkpoint, layout: str) -> dict[str, list]:
    """{our key: shape} of a prefix-free view of one encoder (nothing is read)."""
    return _source(ckpt, layout, torch.float32, "cpu")[1]
