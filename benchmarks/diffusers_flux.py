"""Diffusers' `FluxTransformer2DModel` for a FluxParams, and the BFL -> Diffusers key rules to fill it with our weights.

The rules are those of Diffusers' `convert_flux_transformer_checkpoint_to_diffusers`
(`loaders/single_file_utils.py`; docs/formats.md, FLUX Diffusers layout and the mapping): chunk the
fused qkv, split `linear1` into (H, H, H, M), swap the final adaLN halves (BFL's (shift, scale) is
Diffusers' (scale, shift)). Written here for any config (Diffusers' own assumes the full-size widths)
and without copies where a view serves, so the step-time twin shares our tensors. The tests use the
same rules as an oracle independent of `convert/`, whose loaders go the other way.
"""

from __future__ import annotations

import re

import torch

from mmdit.flux import FluxParams


def _swap(t):
    a, b = t.chunk(2, 0)
    return torch.cat((b, a), 0)


def flux_bfl_to_diffusers(sd: dict[str, torch.Tensor], p: FluxParams) -> dict[str, torch.Tensor]:
    """BFL keys -> FluxTransformer2DModel keys (Diffusers' `convert_flux_transformer_checkpoint_to_diffusers`)."""
    H, M = p.hidden_size, p.mlp_hidden
    out = {}
    simple = [
        (r"img_in\.", "x_embedder."), (r"txt_in\.", "context_embedder."),
        (r"time_in\.in_layer\.", "time_text_embed.timestep_embedder.linear_1."),
        (r"time_in\.out_layer\.", "time_text_embed.timestep_embedder.linear_2."),
        (r"vector_in\.in_layer\.", "time_text_embed.text_embedder.linear_1."),
        (r"vector_in\.out_layer\.", "time_text_embed.text_embedder.linear_2."),
        (r"guidance_in\.in_layer\.", "time_text_embed.guidance_embedder.linear_1."),
        (r"guidance_in\.out_layer\.", "time_text_embed.guidance_embedder.linear_2."),
        (r"double_blocks\.(\d+)\.img_mod\.lin\.", r"transformer_blocks.\1.norm1.linear."),
        (r"double_blocks\.(\d+)\.txt_mod\.lin\.", r"transformer_blocks.\1.norm1_context.linear."),
        (r"double_blocks\.(\d+)\.img_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_q.weight"),
        (r"double_blocks\.(\d+)\.img_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_k.weight"),
        (r"double_blocks\.(\d+)\.txt_attn\.norm\.query_norm\.scale", r"transformer_blocks.\1.attn.norm_added_q.weight"),
        (r"double_blocks\.(\d+)\.txt_attn\.norm\.key_norm\.scale", r"transformer_blocks.\1.attn.norm_added_k.weight"),
        (r"double_blocks\.(\d+)\.img_attn\.proj\.", r"transformer_blocks.\1.attn.to_out.0."),
        (r"double_blocks\.(\d+)\.txt_attn\.proj\.", r"transformer_blocks.\1.attn.to_add_out."),
        (r"double_blocks\.(\d+)\.img_mlp\.0\.", r"transformer_blocks.\1.ff.net.0.proj."),
        (r"double_blocks\.(\d+)\.img_mlp\.2\.", r"transformer_blocks.\1.ff.net.2."),
        (r"double_blocks\.(\d+)\.txt_mlp\.0\.", r"transformer_blocks.\1.ff_context.net.0.proj."),
        (r"double_blocks\.(\d+)\.txt_mlp\.2\.", r"transformer_blocks.\1.ff_context.net.2."),
        (r"single_blocks\.(\d+)\.modulation\.lin\.", r"single_transformer_blocks.\1.norm.linear."),
        (r"single_blocks\.(\d+)\.norm\.query_norm\.scale", r"single_transformer_blocks.\1.attn.norm_q.weight"),
        (r"single_blocks\.(\d+)\.norm\.key_norm\.scale", r"single_transformer_blocks.\1.attn.norm_k.weight"),
        (r"single_blocks\.(\d+)\.linear2\.", r"single_transformer_blocks.\1.proj_out."),
        (r"final_layer\.linear\.", "proj_out."),
    ]
    for k, v in sd.items():
        if m := re.fullmatch(r"double_blocks\.(\d+)\.(img|txt)_attn\.qkv\.(weight|bias)", k):
            names = ["to_q", "to_k", "to_v"] if m[2] == "img" else ["add_q_proj", "add_k_proj", "add_v_proj"]
            for n, t in zip(names, v.chunk(3, 0)):
                out[f"transformer_blocks.{m[1]}.attn.{n}.{m[3]}"] = t
        elif m := re.fullmatch(r"single_blocks\.(\d+)\.linear1\.(weight|bias)", k):
            for n, t in zip(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], v.split((H, H, H, M), 0)):
                out[f"single_transformer_blocks.{m[1]}.{n}.{m[2]}"] = t
        elif m := re.fullmatch(r"final_layer\.adaLN_modulation\.1\.(weight|bias)", k):
            out[f"norm_out.linear.{m[1]}"] = _swap(v)
        else:
            for pat, rep in simple:
                if re.match(pat, k):
                    out[re.sub(pat, rep, k, count=1)] = v
                    break
            else:
                raise KeyError(k)
    return out


def diffusers_flux(p: FluxParams):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
        joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed,
        axes_dims_rope=tuple(p.axes_dim),
    )
