"""LoRA files with full-weight deltas (`.diff`, `.diff_b`) and the alpha rules, against Diffusers.

- A ComfyUI-format FLUX LoRA whose `.diff` / `.diff_b` are all zeros (trainers write them for norms
  and biases) loads as Diffusers loads it (Diffusers drops zero deltas).
- Non-zero deltas are `W + strength * D`: the reference is Diffusers' model run on the base weights
  with the deltas (and the LoRA pair) added, in our naming (ComfyUI) and in Diffusers' own naming
  (split q/k/v, the swapped final adaLN, a norm weight); switching, scaling, merging, removing.
- Alpha 0 follows each format's trainer (kohya: the rank; PEFT/Diffusers, ComfyUI: scale 0); a vector,
  NaN, negative or non-numeric alpha, NaN/Inf or integer LoRA tensors: one error each, naming file and key.
"""

import json
import re
from types import SimpleNamespace

import pytest
import torch
from builders import TINY_FLUX, diffusers_flux, flux_bfl_to_diffusers, flux_state, rel_err
from safetensors.torch import save_file
from test_flux import diffusers_forward
from test_flux import inputs as flux_inputs
from test_lora import diffusers_load

import convert
from convert import CheckpointError, load_transformer
from convert.lora import load_text_encoder_lora
from mmdit.lora import (
    LoRALinear,
    adapter_names,
    lora_enabled,
    lora_state_dict,
    merge_lora,
    remove_lora,
    set_lora_scale,
    unmerge_lora,
)
from mmdit.t5 import T5Config, T5Encoder

H, HD = TINY_FLUX.hidden_size, TINY_FLUX.hidden_size // TINY_FLUX.num_heads
R = 4


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    d = tmp_path_factory.mktemp("deltas")
    sd = flux_state()
    save_file(sd, d / "base.safetensors")
    return SimpleNamespace(dir=d, sd=sd, base=d / "base.safetensors", x=flux_inputs(TINY_FLUX, B=1, h=4, w=4))


def rand(*shape, seed=0, scale=0.2):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def diffusers_out(sd: dict, x: dict, extra: dict | None = None) -> torch.Tensor:
    """Diffusers' FLUX on BFL weights `sd` (plus `extra` deltas added under Diffusers names)."""
    dsd = flux_bfl_to_diffusers(sd, TINY_FLUX)
    for k, v in (extra or {}).items():
        dsd[k] = dsd[k] + v
    ref = diffusers_flux(TINY_FLUX)
    ref.load_state_dict(dsd, strict=True)
    with torch.no_grad():
        return diffusers_forward(ref.eval(), **x)


@torch.no_grad()
def run(model, x):
    return model(**x)


PAIR = {  # a LoRA pair on double_blocks.0.img_attn.proj, alpha 8, rank 4: scale 2
    "double_blocks.0.img_attn.proj.lora_down.weight": rand(R, H, seed=1),
    "double_blocks.0.img_attn.proj.lora_up.weight": rand(H, R, seed=2),
    "double_blocks.0.img_attn.proj.alpha": torch.tensor(8.0),
}


def with_pair(sd: dict, strength: float = 1.0) -> dict:
    out = dict(sd)
    up, down = PAIR["double_blocks.0.img_attn.proj.lora_up.weight"], PAIR["double_blocks.0.img_attn.proj.lora_down.weight"]
    out["double_blocks.0.img_attn.proj.weight"] = sd["double_blocks.0.img_attn.proj.weight"] + strength * 2.0 * up @ down
    return out


def test_zero_deltas_load_as_diffusers_loads_them(flux, tmp_path):
    """The report's file: a ComfyUI FLUX LoRA with all-zero `.diff` (norms) and `.diff_b` (biases)."""
    from diffusers import FluxPipeline

    lora = {f"diffusion_model.{k}": v for k, v in PAIR.items()}
    lora |= {
        "diffusion_model.double_blocks.1.txt_attn.qkv.lora_down.weight": rand(R, H, seed=3),
        "diffusion_model.double_blocks.1.txt_attn.qkv.lora_up.weight": rand(3 * H, R, seed=4),
        "diffusion_model.double_blocks.1.txt_attn.qkv.alpha": torch.tensor(2.0),
        "diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff": torch.zeros(HD),
        "diffusion_model.single_blocks.0.norm.key_norm.scale.diff": torch.zeros(HD),
        "diffusion_model.double_blocks.0.img_attn.proj.diff_b": torch.zeros(H),
        "diffusion_model.single_blocks.1.linear2.diff_b": torch.zeros(H),
    }
    save_file(lora, tmp_path / "comfy.safetensors")
    ref = diffusers_flux(TINY_FLUX)
    ref.load_state_dict(flux_bfl_to_diffusers(flux.sd, TINY_FLUX), strict=True)
    diffusers_load(FluxPipeline, ref.eval(), tmp_path / "comfy.safetensors", "x")
    with torch.no_grad():
        expected = diffusers_forward(ref, **flux.x)
    model = load_transformer(flux.base)
    convert.load_lora(model, tmp_path / "comfy.safetensors")
    assert rel_err(run(model, flux.x), expected) <= 1e-4
    assert rel_err(run(load_transformer(flux.base), flux.x), expected) > 1e-2  # the pairs do change it


# Non-zero deltas in ComfyUI naming: a norm's `scale` by its parameter name and by its module name, a
# Linear weight (2-D) and biases, the final adaLN bias; with a LoRA pair on the same Linear as a bias delta.
COMFY_DELTAS = {
    "double_blocks.0.img_attn.norm.query_norm.scale.diff": ("double_blocks.0.img_attn.norm.query_norm.scale", 5),
    "single_blocks.1.norm.key_norm.diff": ("single_blocks.1.norm.key_norm.scale", 6),
    "double_blocks.1.txt_mlp.0.diff": ("double_blocks.1.txt_mlp.0.weight", 7),
    "double_blocks.0.img_attn.proj.diff_b": ("double_blocks.0.img_attn.proj.bias", 8),
    "final_layer.adaLN_modulation.1.diff_b": ("final_layer.adaLN_modulation.1.bias", 9),
}


def comfy_file(flux, path, prefix="diffusion_model.") -> dict[str, torch.Tensor]:
    """Write the pair and the deltas; returns {our parameter: D}."""
    deltas = {param: rand(*flux.sd[param].shape, seed=seed) for _, (param, seed) in COMFY_DELTAS.items()}
    tensors = {f"{prefix}{k}": v for k, v in PAIR.items()}
    tensors |= {f"{prefix}{key}": deltas[param] for key, (param, _) in COMFY_DELTAS.items()}
    save_file(tensors, path)
    return deltas


def plus(sd: dict, deltas: dict, strength: float = 1.0) -> dict:
    return {k: v + strength * deltas[k] if k in deltas else v for k, v in sd.items()}


def test_deltas_are_added_to_any_parameter(flux, tmp_path):
    deltas = comfy_file(flux, tmp_path / "d.safetensors")
    expected = diffusers_out(with_pair(plus(flux.sd, deltas)), flux.x)
    half = diffusers_out(with_pair(plus(flux.sd, deltas, 0.5), 0.5), flux.x)

    model = load_transformer(flux.base)
    keys = set(model.state_dict())
    base = run(model, flux.x)
    assert convert.load_lora(model, tmp_path / "d.safetensors") == "d"
    assert rel_err(run(model, flux.x), expected) <= 1e-4
    assert {k for k in model.state_dict() if ".lora." not in k} == keys  # deltas: outside the state dict
    assert isinstance(model.double_blocks[0].img_attn.proj, LoRALinear)

    set_lora_scale(model, "d", 0.5)
    assert rel_err(run(model, flux.x), half) <= 1e-4
    set_lora_scale(model, "d", 1.0)
    with lora_enabled(model, False):  # switched off: the base weights, bit for bit
        assert torch.equal(run(model, flux.x), base)
        assert all(torch.equal(v, flux.sd[k]) for k, v in model.state_dict().items() if k in keys)
    assert rel_err(run(model, flux.x), expected) <= 1e-4

    merge_lora(model)
    assert rel_err(run(model, flux.x), expected) <= 1e-4
    unmerge_lora(model)
    assert rel_err(run(model, flux.x), expected) <= 1e-4

    # lora_state_dict writes the ComfyUI layout, deltas included: it loads back to the same outputs
    save_file({f"diffusion_model.{k}": v for k, v in lora_state_dict(model, "d").items()}, tmp_path / "again.safetensors")
    again = load_transformer(flux.base)
    convert.load_lora(again, tmp_path / "again.safetensors")
    assert rel_err(run(again, flux.x), expected) <= 1e-4

    remove_lora(model, "d")
    assert adapter_names(model) == [] and not any(n.endswith("lora_deltas") for n, _ in model.named_modules())
    merged = "double_blocks.0.img_attn.proj.weight"  # the pair's Linear: merged and unmerged, up to rounding
    assert all(torch.equal(v, flux.sd[k]) for k, v in model.state_dict().items() if k != merged)
    assert rel_err(model.state_dict()[merged], flux.sd[merged]) <= 1e-6 and rel_err(run(model, flux.x), base) <= 1e-6


def test_deltas_in_kohya_and_diffusers_naming(flux, tmp_path):
    """kohya names (`lora_unet_` + module with `_`) and Diffusers names (split q/k/v rows of the fused
    bias, `proj_mlp` rows of linear1, the swapped `norm_out`, a norm weight), against Diffusers' model
    with the same deltas added under its own names."""
    deltas = comfy_file(flux, tmp_path / "k.safetensors", prefix="")
    kohya = {}
    for k, v in PAIR.items():
        mod, role = re.fullmatch(r"(.+)\.(lora_down\.weight|lora_up\.weight|alpha)", k).groups()
        kohya[f"lora_unet_{mod.replace('.', '_')}.{role}"] = v
    kohya |= {"lora_unet_double_blocks_1_txt_mlp_0.diff": deltas["double_blocks.1.txt_mlp.0.weight"],
              "lora_unet_double_blocks_0_img_attn_proj.diff_b": deltas["double_blocks.0.img_attn.proj.bias"],
              "lora_unet_single_blocks_1_norm_key_norm.diff": deltas["single_blocks.1.norm.key_norm.scale"]}
    save_file(kohya, tmp_path / "kohya.safetensors")
    used = {k: deltas[k] for k in ("double_blocks.1.txt_mlp.0.weight", "double_blocks.0.img_attn.proj.bias",
                                   "single_blocks.1.norm.key_norm.scale")}
    model = load_transformer(flux.base)
    convert.load_lora(model, tmp_path / "kohya.safetensors")
    assert rel_err(run(model, flux.x), diffusers_out(with_pair(plus(flux.sd, used)), flux.x)) <= 1e-4

    M = TINY_FLUX.mlp_hidden
    theirs = {  # Diffusers parameter -> D
        "transformer_blocks.0.attn.to_k.bias": rand(H, seed=10),
        "transformer_blocks.1.attn.add_v_proj.bias": rand(H, seed=11),
        "transformer_blocks.0.attn.norm_added_q.weight": rand(HD, seed=12),
        "single_transformer_blocks.0.proj_mlp.weight": rand(M, H, seed=13),
        "norm_out.linear.bias": rand(2 * H, seed=14),
    }
    tensors = {f"transformer.{k.rpartition('.')[0]}.{'diff' if k.endswith('weight') else 'diff_b'}": v
               for k, v in theirs.items()}
    save_file(tensors, tmp_path / "diffusers.safetensors")
    model = load_transformer(flux.base)
    convert.load_lora(model, tmp_path / "diffusers.safetensors")
    assert rel_err(run(model, flux.x), diffusers_out(flux.sd, flux.x, theirs)) <= 1e-4


def test_delta_errors_and_strict(flux, tmp_path):
    lora = {"diffusion_model.double_blocks.0.img_attn.proj.diff_b": rand(H, seed=1),
            "diffusion_model.double_blocks.9.img_attn.proj.diff_b": rand(H, seed=2)}  # no block 9
    save_file(lora, tmp_path / "far.safetensors")
    model = load_transformer(flux.base)
    with pytest.raises(CheckpointError, match=r"far\.safetensors: 1 LoRA key\(s\) match no layer.*blocks\.9\.") as e:
        convert.load_lora(model, tmp_path / "far.safetensors")
    assert "another base model" not in str(e.value)
    assert adapter_names(model) == []  # nothing half-loaded
    with pytest.warns(UserWarning, match=r"blocks\.9\."):
        convert.load_lora(model, tmp_path / "far.safetensors", strict=False)
    expected = plus(flux.sd, {"double_blocks.0.img_attn.proj.bias": lora["diffusion_model.double_blocks.0.img_attn.proj.diff_b"]})
    assert rel_err(run(model, flux.x), diffusers_out(expected, flux.x)) <= 1e-4

    save_file({"diffusion_model.double_blocks.0.img_attn.proj.diff_b": torch.ones(H + 1)}, tmp_path / "wide.safetensors")
    with pytest.raises(CheckpointError, match=r"wide\.safetensors: 'diffusion_model\.double_blocks\.0\.img_attn\.proj"
                       r"\.diff_b' has shape \[257\].*needs \[256\] \(a LoRA for another base model\?\)"):
        convert.load_lora(load_transformer(flux.base), tmp_path / "wide.safetensors")


def test_text_encoder_deltas(tmp_path):
    """A T5 layer-norm `.diff` and a `.diff` on a Linear of a ComfyUI-named text-encoder part: W + D."""
    cfg = T5Config(vocab_size=40, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_buckets=8, max_distance=16)
    enc = T5Encoder(cfg).eval()
    with torch.no_grad():
        for i, p in enumerate(enc.parameters()):
            p.copy_(rand(*p.shape, seed=100 + i, scale=0.3) + (1 if p.dim() == 1 else 0))
    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    deltas = {"encoder.block.0.layer.0.layer_norm.weight": rand(32, seed=1),
              "encoder.block.1.layer.1.DenseReluDense.wo.weight": rand(32, 64, seed=2)}
    prefix = "text_encoders.t5xxl.transformer."
    save_file({f"{prefix}encoder.block.0.layer.0.layer_norm.diff": deltas["encoder.block.0.layer.0.layer_norm.weight"],
               f"{prefix}encoder.block.1.layer.1.DenseReluDense.wo.diff":
                   deltas["encoder.block.1.layer.1.DenseReluDense.wo.weight"]}, tmp_path / "te.safetensors")
    ids = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(3))
    ref = T5Encoder(cfg).eval()
    ref.load_state_dict(plus(sd, deltas))
    load_text_encoder_lora(enc, tmp_path / "te.safetensors", "t5", "flux")
    with torch.no_grad():
        assert rel_err(enc(ids), ref(ids)) <= 1e-4


# ---- alpha ----


def kohya_pair(alpha) -> dict:
    mod = "lora_unet_double_blocks_0_img_attn_proj"
    out = {f"{mod}.lora_down.weight": PAIR["double_blocks.0.img_attn.proj.lora_down.weight"],
           f"{mod}.lora_up.weight": PAIR["double_blocks.0.img_attn.proj.lora_up.weight"]}
    if alpha is not None:
        out[f"{mod}.alpha"] = alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha)
    return out


def test_alpha_zero_follows_each_trainer(flux, tmp_path):
    """kohya sd-scripts: alpha 0 is the rank (scale 1); PEFT (what Diffusers' own files mean), ComfyUI: scale 0."""
    from diffusers import FluxPipeline

    base = run(load_transformer(flux.base), flux.x)
    save_file(kohya_pair(0.0), tmp_path / "kohya0.safetensors")
    save_file(kohya_pair(float(R)), tmp_path / "kohya_r.safetensors")
    model = load_transformer(flux.base)
    convert.load_lora(model, tmp_path / "kohya0.safetensors")
    again = load_transformer(flux.base)
    convert.load_lora(again, tmp_path / "kohya_r.safetensors")
    assert rel_err(run(model, flux.x), run(again, flux.x)) == 0 and rel_err(run(model, flux.x), base) > 1e-3

    # the Diffusers layout with lora_alpha 0 in its PEFT header: Diffusers + PEFT give the base model
    A, B = PAIR["double_blocks.0.img_attn.proj.lora_down.weight"], PAIR["double_blocks.0.img_attn.proj.lora_up.weight"]
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": R, "transformer.lora_alpha": 0,
                                                 "transformer.target_modules": ["transformer_blocks.0.attn.to_out.0"]})}
    save_file({"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": A,
               "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": B}, tmp_path / "peft0.safetensors", meta)
    ref = diffusers_flux(TINY_FLUX)
    ref.load_state_dict(flux_bfl_to_diffusers(flux.sd, TINY_FLUX), strict=True)
    diffusers_load(FluxPipeline, ref.eval(), tmp_path / "peft0.safetensors", "x")
    with torch.no_grad():
        expected = diffusers_forward(ref, **flux.x)
    for name, file in [("peft0", tmp_path / "peft0.safetensors"), ("comfy0", tmp_path / "comfy0.safetensors")]:
        if name == "comfy0":
            save_file({f"diffusion_model.{k}": torch.tensor(0.0) if k.endswith("alpha") else v for k, v in PAIR.items()}, file)
        model = load_transformer(flux.base)
        with pytest.warns(UserWarning, match="alpha 0"):
            convert.load_lora(model, file)
        assert rel_err(run(model, flux.x), expected) <= 1e-4 and rel_err(run(model, flux.x), base) == 0


@pytest.mark.parametrize("case, value, message", [
    ("vector", torch.tensor([4.0, 8.0]), r"'lora_unet_double_blocks_0_img_attn_proj\.alpha' holds 2 values"),
    ("nan", torch.tensor(float("nan")), r"\.alpha' is nan: an alpha is a finite number"),
    ("negative", torch.tensor(-4.0), r"\.alpha' is -4\.0: an alpha is a finite number >= 0"),
    ("bool", torch.tensor(True), r"\.alpha' is stored as torch\.bool"),
    ("inf-up", float("inf"), r"'lora_unet_double_blocks_0_img_attn_proj\.lora_up\.weight' holds NaN or infinite"),
    ("int-down", torch.int32, r"'lora_unet_double_blocks_0_img_attn_proj\.lora_down\.weight' is stored as int32"),
])
def test_bad_alphas_and_values_are_refused(flux, tmp_path, case, value, message):
    tensors = kohya_pair(value if isinstance(value, torch.Tensor) else 8.0)
    if case == "inf-up":
        tensors["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"] = torch.full((H, R), value)
    if case == "int-down":
        tensors["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"] = torch.ones(R, H, dtype=value)
    save_file(tensors, tmp_path / f"{case}.safetensors")
    model = load_transformer(flux.base)
    with pytest.raises(CheckpointError, match=rf"{case}\.safetensors: .*{message}"):
        convert.load_lora(model, tmp_path / f"{case}.safetensors")
    assert adapter_names(model) == []


@pytest.mark.parametrize("metadata, message", [
    ({"transformer.lora_alpha": "abc"}, r"field 'lora_alpha' is 'abc', expected a number"),
    ({"transformer.lora_alpha": 8, "transformer.alpha_pattern": {"to_out.0": [1, 2]}}, r"field 'to_out\.0' is \[1, 2\]"),
    ("{not json", r"header entry 'lora_adapter_metadata': not valid JSON"),
    ("[]", r"header entry 'lora_adapter_metadata': not a JSON object"),
])
def test_bad_lora_metadata_is_refused(flux, tmp_path, metadata, message):
    A, B = PAIR["double_blocks.0.img_attn.proj.lora_down.weight"], PAIR["double_blocks.0.img_attn.proj.lora_up.weight"]
    raw = metadata if isinstance(metadata, str) else json.dumps(metadata)
    save_file({"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": A,
               "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": B}, tmp_path / "m.safetensors",
              {"lora_adapter_metadata": raw})
    with pytest.raises(CheckpointError, match=rf"m\.safetensors: .*{message}"):
        convert.load_lora(load_transformer(flux.base), tmp_path / "m.safetensors")
