"""FLUX.2 LoRA against Diffusers + PEFT (Diffusers 0.42.1 `Flux2LoraLoaderMixin`), on tiny random FLUX.2
transformers, [klein]-like and [dev]-like (guidance embedding), float32, rel. error 1e-4.

- A PEFT LoRA on Diffusers' `Flux2Transformer2DModel` (split q/k/v, the fused single-block projection, the
  shared modulations, the swapped final adaLN; alpha != rank with rank and alpha patterns), saved as
  Diffusers' training scripts save it, gives Diffusers' outputs in our model.
- One random LoRA on BFL's module names, written in the layouts people share (ai-toolkit / BFL
  `diffusion_model.`, PEFT's `base_model.model.`, Diffusers block names under `diffusion_model.` and their
  `sformer_blocks.` alias, kohya `lora_unet_` with alpha, ComfyUI `lora_down/up` with alpha): each file read
  by Diffusers' own loader (`Flux2KleinPipeline.lora_state_dict` + `load_lora_into_transformer`) and by
  `convert.load_lora` gives the same outputs (ComfyUI's: Diffusers sends `lora_down` keys to its kohya
  converter, which drops them; its reference is the same LoRA in the ai-toolkit layout).
- `inject_lora` targets FLUX.2's blocks (attn, mlp, mod groups), and `save_lora` writes a file Diffusers loads
  with the same outputs.
- Text-encoder keys, LoKr and FLUX.1 LoRAs are refused or skipped by name; ComfyUI's fp8 `comfy_quant` FLUX.2
  files load.
"""

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch
from builders import rel_err
from diffusers import Flux2KleinPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from test_flux2 import bfl_state, diffusers_forward, inputs, reference
from test_lora import add_random_peft_lora, save_peft_lora

import convert
from convert import CheckpointError, load_transformer
from convert.files import Checkpoint
from convert.lora_formats import detect_format
from mmdit.flux2 import PRESETS, Flux2
from mmdit.lora import LoRALinear, adapter_names, inject_lora, lora_parameters, resolve_targets
from sampling import load_pipeline_lora

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Already found a `peft_config`")]

SMALL = dict(context_in_dim=48, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 8, 8, 8))
PARAMS = {"klein": dataclasses.replace(PRESETS["flux2-klein-4b"], **SMALL),
          "dev": dataclasses.replace(PRESETS["flux2-dev"], **SMALL)}
H = SMALL["hidden_size"]
# PEFT target regex over Diffusers' FLUX.2 module names: split q/k/v (-> rows of our fused qkv), both output
# projections, the fused single-block linear1 and linear2, SwiGLU MLPs, shared modulations, the final adaLN
# (stored as (scale, shift) by Diffusers), the image embedder and ([dev]) the guidance embedder.
PEFT_TARGETS = (r".*(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out|attn\.to_qkv_mlp_proj"
                r"|single_transformer_blocks\.\d\.attn\.to_out|ff\.linear_in|ff_context\.linear_out|norm_out\.linear"
                r"|double_stream_modulation_img\.linear"
                r"|single_stream_modulation\.linear|x_embedder|guidance_embedder\.linear_1)")


@pytest.fixture(scope="module", params=list(PARAMS))
def flux2(request, tmp_path_factory):
    p = PARAMS[request.param]
    d = tmp_path_factory.mktemp(f"flux2_lora_{request.param}")
    sd = bfl_state(p, seed=4)
    save_file(sd, d / "base.safetensors")
    return SimpleNamespace(p=p, sd=sd, base=d / "base.safetensors", x=inputs(p, B=2, h=4, w=6))


def ours(case):
    return load_transformer(case.base, dtype=torch.float32)


@torch.no_grad()
def run(model, x):
    return model(**x)


@torch.no_grad()
def diffusers_run(case, path) -> torch.Tensor:
    """What `Flux2KleinPipeline.load_lora_weights(path)` does to the transformer, then its output."""
    ref = reference(case.p, case.sd)
    sd, metadata = Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    assert sd and all("lora" in k for k in sd)  # load_lora_weights' own check
    Flux2KleinPipeline.load_lora_into_transformer(sd, transformer=ref, adapter_name="x", metadata=metadata)
    return diffusers_forward(ref, **case.x)


def test_diffusers_file_matches_peft(flux2, tmp_path):
    ref = reference(flux2.p, flux2.sd)
    cfg = add_random_peft_lora(ref, "full", PEFT_TARGETS, seed=10)
    path = save_peft_lora(Flux2KleinPipeline, ref, "full", cfg, tmp_path)
    with torch.no_grad():
        expected = diffusers_forward(ref, **flux2.x)
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    assert {"transformer.norm_out.linear.lora_B.weight", "transformer.transformer_blocks.0.attn.to_k.lora_A.weight",
            "transformer.single_transformer_blocks.1.attn.to_qkv_mlp_proj.lora_B.weight"} <= keys
    guidance_key = "transformer.time_guidance_embed.guidance_embedder.linear_1.lora_A.weight"
    assert flux2.p.guidance_embed == (guidance_key in keys)
    model = ours(flux2)
    base = run(model, flux2.x)
    assert convert.load_lora(model, path) == "pytorch_lora_weights"
    assert rel_err(run(model, flux2.x), expected) <= 1e-4
    assert rel_err(base, expected) > 1e-2  # the LoRA changes the output
    assert rel_err(diffusers_run(flux2, path), expected) <= 1e-4  # Diffusers' loader reads the file as PEFT wrote it


# ---- the layouts people share, from one LoRA on BFL's module names ----

# Modules Diffusers' kohya FLUX.2 converter (`_convert_kohya_flux2_lora_to_diffusers`) maps; it drops the others.
KOHYA_MODULES = r"img_in|txt_in|time_in\..*|final_layer\.linear|(double|single)_blocks\..*"


def bfl_lora(p, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our Linear: (A (r, in), B (out, r))} on every Linear but the final adaLN (Diffusers' BFL-layout converter
    renames it to `norm_out.linear` without swapping its (shift, scale) halves), ranks 2 and 4."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, m) in enumerate((n, m) for n, m in Flux2(p).named_modules() if isinstance(m, torch.nn.Linear)):
        if name != "final_layer.adaLN_modulation.1":
            r = 2 if i % 3 == 0 else 4
            A, B = torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g)
            out[name] = (0.3 * A, 0.3 * B)
    return out


def write_layout(layout: str, lora: dict, path) -> None:
    out = {}
    if layout == "kohya":  # alpha = 2r: scale 2, so B / 2 stores the same update
        lora = {mod: ab for mod, ab in lora.items() if re.fullmatch(KOHYA_MODULES, mod)}
    for mod, (A, B) in lora.items():
        r = A.shape[0]
        if layout in ("ai-toolkit", "diffusers-blocks", "sformer-blocks"):  # no alpha: scale 1
            out |= {f"diffusion_model.{mod}.lora_A.weight": A, f"diffusion_model.{mod}.lora_B.weight": B}
        elif layout == "peft":
            out |= {f"base_model.model.{mod}.lora_A.weight": A, f"base_model.model.{mod}.lora_B.weight": B}
        elif layout == "kohya":
            k = "lora_unet_" + mod.replace(".", "_")
            out |= {f"{k}.lora_down.weight": A, f"{k}.lora_up.weight": B / 2, f"{k}.alpha": torch.tensor(2.0 * r)}
        elif layout == "comfyui":  # alpha = r / 2: scale 0.5
            k = f"diffusion_model.{mod}"
            out |= {f"{k}.lora_down.weight": A, f"{k}.lora_up.weight": 2 * B, f"{k}.alpha": torch.tensor(r / 2)}
    if layout in ("diffusers-blocks", "sformer-blocks"):  # the blocks in Diffusers' names, as Diffusers converts them
        blocks = {k: v for k, v in out.items() if "_blocks." in k}
        converted = Flux2KleinPipeline.lora_state_dict(dict(blocks))
        out = {k: v for k, v in out.items() if k not in blocks}
        for k, v in converted.items():
            k = "diffusion_model." + k.removeprefix("transformer.")
            out[k.replace("diffusion_model.transformer_blocks.", "diffusion_model.sformer_blocks.")
                if layout == "sformer-blocks" else k] = v
        assert any(".attn.to_q.lora_A" in k for k in out) and any("single_transformer_blocks" in k for k in out)
    save_file(out, path)


@pytest.mark.parametrize("layout", ["ai-toolkit", "peft", "diffusers-blocks", "sformer-blocks", "kohya", "comfyui"])
def test_shared_layouts_match_diffusers(flux2, layout, tmp_path):
    lora = bfl_lora(flux2.p, seed=20)
    path = tmp_path / f"{layout}.safetensors"
    write_layout(layout, lora, path)
    if layout == "comfyui":  # Diffusers cannot read it: the same LoRA in the ai-toolkit layout is the reference
        write_layout("ai-toolkit", lora, tmp_path / "reference.safetensors")
        expected = diffusers_run(flux2, tmp_path / "reference.safetensors")
    else:
        expected = diffusers_run(flux2, path)
    model = ours(flux2)
    base = run(model, flux2.x)
    convert.load_lora(model, path, name="x")
    assert rel_err(run(model, flux2.x), expected) <= 1e-4
    assert rel_err(base, expected) > 1e-2


def test_final_adaln_is_swapped_between_layouts(flux2, tmp_path):
    """Our final adaLN is BFL's (shift, scale), Diffusers' `norm_out.linear` (scale, shift): a LoRA on it in the
    BFL layout equals the Diffusers-layout one with B's halves swapped (convert/lora_formats.py)."""
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(4, H, generator=g), torch.randn(2 * H, 4, generator=g)
    save_file({"diffusion_model.final_layer.adaLN_modulation.1.lora_A.weight": A,
               "diffusion_model.final_layer.adaLN_modulation.1.lora_B.weight": B}, tmp_path / "bfl.safetensors")
    save_file({"transformer.norm_out.linear.lora_A.weight": A,
               "transformer.norm_out.linear.lora_B.weight": torch.cat(B.chunk(2)[::-1])}, tmp_path / "d.safetensors")
    expected = diffusers_run(flux2, tmp_path / "d.safetensors")
    for name in ("bfl", "d"):
        model = ours(flux2)
        convert.load_lora(model, tmp_path / f"{name}.safetensors")
        assert rel_err(run(model, flux2.x), expected) <= 1e-4


# ---- our adapters, saved for Diffusers ----


def test_injected_lora_saves_and_loads_in_diffusers(flux2, tmp_path):
    model = ours(flux2)
    assert resolve_targets(model)["single_blocks.0.linear1"] == (0, 3 * H)  # default "attn": q, k, v rows only
    names = inject_lora(model, rank=3, alpha=6, targets=["attn", "mlp", "mod"])
    assert sorted(names) == sorted([
        "double_stream_modulation_img.lin", "double_stream_modulation_txt.lin", "single_stream_modulation.lin",
        *[f"double_blocks.{i}.{s}_{p}" for i in range(2) for s in ("img", "txt")
          for p in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")],
        *[f"single_blocks.{i}.linear{j}" for i in range(2) for j in (1, 2)],
    ])
    lin1 = model.single_blocks[1].linear1
    assert isinstance(lin1, LoRALinear) and (lin1.lora["default"].offset, lin1.lora["default"].length) == (
        0, lin1.out_features)  # attn's q, k, v rows and mlp's rows: one span
    base = run(model, flux2.x)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.2 * torch.randn_like(p))
    expected = run(model, flux2.x)
    assert rel_err(expected, base) > 1e-2
    path = tmp_path / "ours.safetensors"
    convert.save_lora(model, path, metadata={"taca.gamma": 1.2})
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["mmdit.family"] == "flux2" and json.loads(meta["mmdit.targets"]) == sorted(names)
    assert "transformer.double_stream_modulation_txt.linear.lora_A.weight" in keys
    assert "transformer.transformer_blocks.1.attn.add_v_proj.lora_B.weight" in keys
    assert rel_err(diffusers_run(flux2, path), expected) <= 1e-4
    again = ours(flux2)
    convert.load_lora(again, path)
    assert rel_err(run(again, flux2.x), expected) <= 1e-4


# ---- what is refused or skipped ----


def test_refusals_name_the_problem(flux2, tmp_path):
    lora = {f"diffusion_model.double_blocks.0.img_attn.qkv.lora_{ab}.weight": torch.ones(s) for ab, s in
            (("A", (2, H)), ("B", (3 * H, 2)))}
    # a text-encoder part: FLUX.2's LLM takes no LoRA (Diffusers loads the transformer's part only)
    te = {"text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(2, 8),
          "text_encoder.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(8, 2)}
    save_file(lora | te, tmp_path / "te.safetensors")
    with pytest.warns(UserWarning, match=r"te\.safetensors: 2 text-encoder LoRA key.*flux2 model takes no LoRA"):
        convert.load_lora(ours(flux2), tmp_path / "te.safetensors")
    pipe = SimpleNamespace(family="flux2", transformer=ours(flux2), encoders={"llm": torch.nn.Linear(8, 8)})
    with pytest.raises(CheckpointError, match=r"te\.safetensors: 2 LoRA key\(s\) for the llm text encoder, which "
                                              r"takes no LoRA.*first: 'text_encoder\.model"):
        load_pipeline_lora(pipe, tmp_path / "te.safetensors")
    assert not adapter_names(pipe.transformer)  # nothing loaded
    with pytest.warns(UserWarning, match=r"for the llm text encoder, which takes no LoRA"):
        assert load_pipeline_lora(pipe, tmp_path / "te.safetensors", strict=False) == "te"
    assert adapter_names(pipe.transformer) == ["te"] and not isinstance(pipe.encoders["llm"], LoRALinear)
    # LyCORIS LoKr (Diffusers reads it by rebuilding the weight; we do not)
    save_file({"diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1": torch.ones(2, 2),
               "diffusion_model.double_blocks.0.img_attn.qkv.lokr_w2": torch.ones(96, 32)},
              tmp_path / "lokr.safetensors")
    with pytest.raises(CheckpointError, match=r"lokr\.safetensors: a LyCORIS LoKr / LoHa adapter"):
        convert.load_lora(ours(flux2), tmp_path / "lokr.safetensors")
    # a FLUX.1 LoRA on a FLUX.2 model: the single block's linear1 is another width (SwiGLU, no bias)
    save_file({"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.ones(2, H),
               "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.ones(3 * H + 4 * H, 2)},
              tmp_path / "flux1.safetensors")
    with pytest.raises(CheckpointError, match=r"flux1\.safetensors: LoRA .*single_blocks\.0\.linear1 of this "
                                              r"flux2-.*needs 576 output rows"):
        convert.load_lora(ours(flux2), tmp_path / "flux1.safetensors")
    # PEFT's `base_model.model.` prefix is FLUX.2's only (Diffusers' other loaders refuse it)
    assert detect_format(["base_model.model.img_in.lora_A.weight"], "f", "flux2") == "peft"
    with pytest.raises(CheckpointError, match=r"f: unsupported LoRA layout \(PEFT"):
        detect_format(["base_model.model.img_in.lora_A.weight"], "f", "flux")


def test_comfy_quant_fp8_flux2_file_loads(flux2, tmp_path):
    """ComfyUI's mixed-precision fp8 FLUX.2 files (`<layer>.comfy_quant` + `.weight_scale`) are dequantized at load
    (convert/quant.py, the same for every family): W = W_fp8 * weight_scale."""
    layers = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "double_stream_modulation_img.lin"]
    quant, expected = {}, dict(flux2.sd)
    for layer in layers:
        w = flux2.sd[f"{layer}.weight"]
        scale = w.abs().max() / 448
        w8 = (w / scale).to(torch.float8_e4m3fn)
        quant |= {f"{layer}.weight": w8, f"{layer}.weight_scale": scale.reshape(()),
                  f"{layer}.comfy_quant": torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)}
        expected[f"{layer}.weight"] = w8.float() * scale
    save_file(flux2.sd | quant, tmp_path / "fp8.safetensors")
    assert Checkpoint.open(tmp_path / "fp8.safetensors").quantization == "ComfyUI mixed precision (float8_e4m3fn)"
    model = load_transformer(tmp_path / "fp8.safetensors", dtype=torch.float32)
    assert model.family == "flux2"
    got = model.state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
