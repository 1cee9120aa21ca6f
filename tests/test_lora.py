"""LoRA against Diffusers + PEFT: a LoRA made with PEFT on Diffusers' tiny FLUX / SD3.5 model (random A and B,
alpha != rank, per-module rank and alpha patterns) and saved the way Diffusers saves it gives, loaded into our
model, the same outputs (rel. error 1e-4, float32); the same weights written in the kohya, ComfyUI, BFL,
XLabs and ai-toolkit layouts give the same outputs again; the files we save load in Diffusers and match;
merging, switching and scaling adapters; LoRAs for other base models are refused."""

import math
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from builders import TINY_FLUX, diffusers_flux, flux_bfl_to_diffusers, flux_state, rel_err
from safetensors import safe_open
from safetensors.torch import save_file
from test_flux import diffusers_forward
from test_flux import inputs as flux_inputs
from test_sd3 import CASES, diffusers_sd3, sai_state, write_sai
from test_sd3 import inputs as sd3_inputs
from test_sd3 import reference as sd3_reference

import convert
from convert import CheckpointError, load_transformer
from mmdit.flux import Flux, FluxParams
from mmdit.lora import (
    LoRALinear,
    inject_lora,
    lora_enabled,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    set_lora_enabled,
    set_lora_scale,
    unmerge_lora,
)

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # PEFT: several adapters
H, M = TINY_FLUX.hidden_size, TINY_FLUX.mlp_hidden
# PEFT target regexes over Diffusers module names: "full" covers split q/k/v (to fused rows), proj_mlp, the
# swapped final adaLN, an MLP and the modulations; "attn" is what the XLabs layout can express.
FLUX_LORAS = {
    "full": r".*(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out|proj_mlp|single_transformer_blocks\.\d\.proj_out"
    r"|norm_out\.linear|ff_context\.net\.2|norm1\.linear)",
    "attn": r".*(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out|single_transformer_blocks\.\d\.proj_out)",
}
RANK, ALPHA, PATTERNS = 4, 8.0, dict(rank_pattern={"to_k": 2}, alpha_pattern={"to_add_out": 3.0})


def peft_scale(path: str, rank: int) -> float:
    return (3.0 if path.endswith("to_add_out") else ALPHA) / rank


def add_random_peft_lora(model, name: str, targets: str, seed: int):
    from peft import LoraConfig

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets, **PATTERNS)
    model.add_adapter(cfg, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B != 0: with B = 0 every loader would pass
        for n, p in model.named_parameters():
            if re.search(rf"\.lora_[AB]\.{name}\.", n):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return cfg


def save_peft_lora(pipeline_cls, model, name: str, cfg, folder) -> str:
    """The way Diffusers' training scripts save a LoRA: PEFT state dict + LoraConfig in the header."""
    from peft.utils import get_peft_model_state_dict

    pipeline_cls.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(model, adapter_name=name),
        transformer_lora_adapter_metadata=cfg.to_dict(),
    )
    return str(folder / "pytorch_lora_weights.safetensors")


def diffusers_load(pipeline_cls, model, path, name: str) -> None:
    """What `pipeline.load_lora_weights(path)` does for the transformer."""
    out = pipeline_cls.lora_state_dict(str(path), return_lora_metadata=True)
    sd, metadata = out[0], out[-1]
    kwargs = {"network_alphas": None} if len(out) == 3 or pipeline_cls.__name__.startswith("Flux") else {}
    pipeline_cls.load_lora_into_transformer(sd, transformer=model, adapter_name=name, metadata=metadata, **kwargs)


# ---- FLUX ----


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """Base file, Diffusers' model with two PEFT LoRAs, their files, and reference outputs."""
    from diffusers import FluxPipeline

    d = tmp_path_factory.mktemp("flux_lora")
    sd = flux_state()
    save_file(sd, d / "base.safetensors")
    ref = diffusers_flux(TINY_FLUX)
    ref.load_state_dict(flux_bfl_to_diffusers(sd, TINY_FLUX), strict=True)
    ref.eval()
    x = flux_inputs(TINY_FLUX, B=1, h=4, w=4)
    files, outs = {}, {}
    for i, (name, targets) in enumerate(FLUX_LORAS.items()):
        cfg = add_random_peft_lora(ref, name, targets, seed=10 + i)
        (d / name).mkdir()
        files[name] = save_peft_lora(FluxPipeline, ref, name, cfg, d / name)
    with torch.no_grad():
        for name in FLUX_LORAS:
            ref.set_adapters([name])
            outs[name] = diffusers_forward(ref, **x)
        ref.set_adapters(["full"], [0.5])
        outs["full@0.5"] = diffusers_forward(ref, **x)
        ref.set_adapters(list(FLUX_LORAS))
        outs["both"] = diffusers_forward(ref, **x)
    return SimpleNamespace(dir=d, base=d / "base.safetensors", files=files, outs=outs, x=x)


def ours(flux):
    return load_transformer(flux.base, dtype=torch.float32)


@torch.no_grad()
def run(model, x):
    return model(**x)


@pytest.mark.parametrize("name", list(FLUX_LORAS))
def test_diffusers_file_matches_peft(flux, name):
    model = ours(flux)
    base = run(model, flux.x)
    assert convert.load_lora(model, flux.files[name]) == "pytorch_lora_weights"
    assert rel_err(run(model, flux.x), flux.outs[name]) <= 1e-4
    assert rel_err(base, flux.outs[name]) > 1e-2  # the LoRA changes the output


# The same LoRAs in the other layouts, built here from the PEFT weights (docs/formats.md, "LoRA formats"). Where
# each Diffusers Linear's rows live in ours is read off builders' BFL -> Diffusers conversion (Diffusers
# `loaders/single_file_utils.py` `convert_flux_transformer_checkpoint_to_diffusers`).


def bfl_rows() -> dict[str, tuple[str, torch.Tensor]]:
    """{Diffusers Linear: (our Linear, our row of each of its rows)}: convert a state dict whose weight rows
    hold (Linear index, row index), and read them back on the Diffusers side (split, sliced or swapped)."""
    model = Flux(TINY_FLUX)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    for i, n in enumerate(names):
        w = sd[f"{n}.weight"]
        w[:, 0], w[:, 1] = i, torch.arange(w.shape[0])
    return {
        k[: -len(".weight")]: (names[int(w[0, 0])], w[:, 1].long())
        for k, w in flux_bfl_to_diffusers(sd, TINY_FLUX).items() if k.endswith(".weight") and w.dim() == 2
    }


def fused_loras(path: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{our Linear: (A, B)} with the PEFT scales folded into B; split q/k/v -> A stacked, B block-diagonal."""
    rows_of, out_features = bfl_rows(), {n: m.out_features for n, m in Flux(TINY_FLUX).named_modules()
                                         if isinstance(m, torch.nn.Linear)}
    with safe_open(path, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    parts: dict[str, list] = {}
    for k in sd:
        if k.endswith("lora_A.weight"):
            mod = k[len("transformer.") : -len(".lora_A.weight")]
            A, B = sd[k], sd[k.replace("lora_A", "lora_B")]
            ours, rows = rows_of[mod]
            parts.setdefault(ours, []).append((rows, A, B * peft_scale(mod, A.shape[0])))
    fused = {}
    for mod, ps in parts.items():
        A = torch.cat([a for _, a, _ in ps])
        B = torch.zeros(out_features[mod], A.shape[0])
        col = 0
        for rows, a, b in ps:
            B[rows, col : col + a.shape[0]] = b
            col += a.shape[0]
        fused[mod] = (A, B)
    return fused


XLABS = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
         "txt_attn.proj": "proj_lora2", "linear1": "qkv_lora", "linear2": "proj_lora"}


def write_layout(layout: str, src: str, path) -> None:
    fused = fused_loras(src)
    out = {}
    for mod, (A, B) in fused.items():
        r = A.shape[0]
        if layout == "kohya":  # alpha = 2r: scale 2
            k = "lora_unet_" + mod.replace(".", "_")
            out.update({f"{k}.lora_down.weight": A, f"{k}.lora_up.weight": B / 2, f"{k}.alpha": torch.tensor(2.0 * r)})
        elif layout == "comfyui":  # alpha = r / 2: scale 0.5
            k = "diffusion_model." + mod
            out.update({f"{k}.lora_down.weight": A, f"{k}.lora_up.weight": 2 * B, f"{k}.alpha": torch.tensor(r / 2)})
        elif layout == "bfl":  # bare keys, no alpha: scale 1
            out.update({f"{mod}.lora_A.weight": A, f"{mod}.lora_B.weight": B})
        elif layout == "xlabs":  # no alpha; the single block's qkv_lora covers linear1's q, k, v rows
            block, sub = mod.split(".", 2)[:2], mod.split(".", 2)[2]
            k = f"{'.'.join(block)}.processor.{XLABS[sub]}"
            out.update({f"{k}.down.weight": A, f"{k}.up.weight": B[: 3 * H] if sub == "linear1" else B})
    if layout == "kohya":  # a text-encoder LoRA in the same file is not applied, with a warning
        out["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(2, 8)
        out["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(8, 2)
    save_file(out, path)


def write_ai_toolkit(src: str, path) -> None:
    """PEFT keys, no alpha, no metadata (scale 1): the scales are folded into B."""
    with safe_open(src, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for k, v in sd.items():
        if k.endswith("lora_B.weight"):
            mod = k[len("transformer.") : -len(".lora_B.weight")]
            v = v * peft_scale(mod, v.shape[1])
        out[k] = v
    save_file(out, path)


@pytest.mark.parametrize(
    "layout, lora", [("kohya", "full"), ("comfyui", "full"), ("bfl", "full"), ("ai-toolkit", "full"), ("xlabs", "attn")]
)
def test_other_layouts_match(flux, layout, lora, tmp_path):
    path = tmp_path / f"{layout}.safetensors"
    if layout == "ai-toolkit":
        write_ai_toolkit(flux.files[lora], path)
    else:
        write_layout(layout, flux.files[lora], path)
    model = ours(flux)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert.load_lora(model, path, name="x")
    assert (layout == "kohya") == any("text-encoder" in str(w.message) for w in caught)
    assert rel_err(run(model, flux.x), flux.outs[lora]) <= 1e-4


def test_saved_file_loads_in_diffusers(flux, tmp_path):
    from diffusers import FluxPipeline

    model = ours(flux)
    convert.load_lora(model, flux.files["full"], name="full")
    out = tmp_path / "ours.safetensors"
    convert.save_lora(model, out, name="full", metadata={"taca_gamma": 1.2, "note": "test"})
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["mmdit.family"] == "flux" and meta["taca_gamma"] == "1.2" and meta["note"] == "test"
    assert "double_blocks.0.img_attn.qkv" in meta["mmdit.targets"]

    ref = diffusers_flux(TINY_FLUX)
    ref.load_state_dict(flux_bfl_to_diffusers(flux_state(), TINY_FLUX), strict=True)
    diffusers_load(FluxPipeline, ref.eval(), out, "ours")
    with torch.no_grad():
        assert rel_err(diffusers_forward(ref, **flux.x), flux.outs["full"]) <= 1e-4
    again = ours(flux)
    convert.load_lora(again, out)
    assert rel_err(run(again, flux.x), flux.outs["full"]) <= 1e-4


def test_injected_lora_saves_and_loads_in_diffusers(flux, tmp_path):
    """A fresh adapter on the default targets (linear1: only its q, k, v rows) trained a bit, saved, read by Diffusers."""
    from diffusers import FluxPipeline

    model = ours(flux)
    base = run(model, flux.x)
    names = inject_lora(model, rank=3, alpha=6)
    assert names == [
        *[f"double_blocks.{i}.{s}_attn.{p}" for i in range(2) for s in ("img", "txt") for p in ("qkv", "proj")],
        *[f"single_blocks.{i}.linear{j}" for i in range(2) for j in (1, 2)],
    ]
    lin1 = model.single_blocks[0].linear1
    assert isinstance(lin1, LoRALinear) and (lin1.lora["default"].offset, lin1.lora["default"].length) == (0, 3 * H)
    assert rel_err(run(model, flux.x), base) == 0  # B = 0 at the start
    assert len(lora_parameters(model)) == 2 * len(names)
    model.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)
    model(**flux.x).square().mean().backward()
    assert all(p.grad is not None for p in lora_parameters(model, "default"))
    assert all(p.grad is None for n, p in model.named_parameters() if "lora" not in n)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(0.2 * torch.randn_like(p))
    expected = run(model, flux.x)
    out = tmp_path / "injected.safetensors"
    convert.save_lora(model, out)

    ref = diffusers_flux(TINY_FLUX)
    ref.load_state_dict(flux_bfl_to_diffusers(flux_state(), TINY_FLUX), strict=True)
    diffusers_load(FluxPipeline, ref.eval(), out, "ours")
    with torch.no_grad():
        assert rel_err(diffusers_forward(ref, **flux.x), expected) <= 1e-4
    # lora_state_dict is the BFL/ComfyUI layout (B padded to all rows): it loads back exactly
    sd = {f"diffusion_model.{k}": v for k, v in lora_state_dict(model, "default").items()}
    save_file(sd, tmp_path / "comfy.safetensors")
    again = ours(flux)
    convert.load_lora(again, tmp_path / "comfy.safetensors")
    assert rel_err(run(again, flux.x), expected) <= 1e-4


def test_merge_switch_scale(flux):
    model = ours(flux)
    base = run(model, flux.x)
    w0 = model.single_blocks[0].linear1.weight.clone()
    convert.load_lora(model, flux.files["full"], name="full")
    convert.load_lora(model, flux.files["attn"], name="attn")
    assert rel_err(run(model, flux.x), flux.outs["both"]) <= 1e-4
    with lora_enabled(model, ["attn"]):
        assert rel_err(run(model, flux.x), flux.outs["attn"]) <= 1e-4
    with lora_enabled(model, False):
        assert rel_err(run(model, flux.x), base) == 0
    assert rel_err(run(model, flux.x), flux.outs["both"]) <= 1e-4  # restored after the block

    set_lora_enabled(model, ["full"])
    set_lora_scale(model, "full", 0.5)
    assert rel_err(run(model, flux.x), flux.outs["full@0.5"]) <= 1e-4
    set_lora_scale(model, "full", 1.0)
    unmerged = run(model, flux.x)
    merge_lora(model)
    assert rel_err(run(model, flux.x), unmerged) <= 1e-5
    assert rel_err(model.single_blocks[0].linear1.weight, w0) > 1e-3
    with pytest.raises(RuntimeError, match="unmerge"):
        set_lora_scale(model, "full", 0.3)
    unmerge_lora(model)
    assert rel_err(model.single_blocks[0].linear1.weight, w0) <= 1e-6
    assert rel_err(run(model, flux.x), unmerged) <= 1e-5


def test_toggle_does_not_recompile():
    from torch._dynamo.testing import CompileCounter

    layer = LoRALinear(8, 6)
    layer.add("a", rank=2, alpha=2, rows=(2, 3))
    torch.nn.init.normal_(layer.lora["a"].lora_B)
    x = torch.randn(4, 8)
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    with torch.no_grad():
        on = compiled(x)
        with lora_enabled(layer, False):
            off = compiled(x)
        set_lora_scale(layer, "a", 2.0)
        twice = compiled(x)
        base = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert counter.frame_count == 1
    delta = layer.lora["a"].lora_B @ layer.lora["a"].lora_A
    assert rel_err(on[:, 2:5], base[:, 2:5] + x @ delta.T) <= 1e-5 and torch.equal(on[:, :2], base[:, :2])
    assert torch.equal(off, base)
    assert rel_err(twice[:, 2:5], base[:, 2:5] + 2 * x @ delta.T) <= 1e-5


def lora_for(params: FluxParams, path) -> None:
    model = Flux(params)
    inject_lora(model, rank=2)
    convert.save_lora(model, path)


def test_refuses_other_base_models(flux, tmp_path):
    model = ours(flux)
    lora_for(FluxParams(**{**TINY_FLUX.__dict__, "hidden_size": 128, "num_heads": 1}), tmp_path / "narrow.safetensors")
    with pytest.raises(CheckpointError, match=r"LoRA .transformer\..*has down \[2, 128\].*takes 256 inputs"):
        convert.load_lora(model, tmp_path / "narrow.safetensors")
    lora_for(FluxParams(**{**TINY_FLUX.__dict__, "depth": 3}), tmp_path / "deep.safetensors")
    with pytest.raises(CheckpointError, match=r"match no layer.*transformer\.transformer_blocks\.2\."):
        convert.load_lora(model, tmp_path / "deep.safetensors")
    assert not any(isinstance(m, LoRALinear) and len(m.lora) for m in model.modules())  # nothing half-loaded
    with pytest.warns(UserWarning, match=r"transformer_blocks\.2\."):
        convert.load_lora(model, tmp_path / "deep.safetensors", strict=False)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        convert.load_lora(model, tmp_path / "deep.safetensors", strict=False)

    sd3 = _tiny_sd3(tmp_path)
    write_layout("kohya", flux.files["full"], tmp_path / "kohya.safetensors")
    for path, message in [
        (tmp_path / "deep.safetensors", "a LoRA for a flux model"),  # our header names the family
        (flux.files["full"], r"match no layer.*transformer\.single_transformer_blocks\.0"),
        (tmp_path / "kohya.safetensors", r"match no layer.*lora_unet_double_blocks_0"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            convert.load_lora(sd3, path)
    bad = {"double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(2, H),
           "double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(3 * H, 2),
           "double_blocks.0.img_attn.qkv.lora_B.bias": torch.ones(3 * H)}
    save_file(bad, tmp_path / "control.safetensors")
    with pytest.raises(CheckpointError, match="control"):
        convert.load_lora(model, tmp_path / "control.safetensors", name="c")


def _tiny_sd3(tmp_path):
    path = tmp_path / "sd3.safetensors"
    if not path.exists():
        write_sai(path, sai_state(CASES["sd3-medium-like"]), torch.float32)
    return load_transformer(path)


# ---- SD3.5-Medium (MMDiT-X): attn2, the pre-only last context block (swapped adaLN), the final layer ----

SD3_TARGETS = r".*(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out|norm1_context\.linear|norm_out\.linear|ff\.net\.2)"


def test_sd3_lora_matches_diffusers(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    p = CASES["sd3.5-medium-like"]
    base = tmp_path / "sd3.safetensors"
    write_sai(base, sai_state(p), torch.float32)
    ref = diffusers_sd3(p, base)
    cfg = add_random_peft_lora(ref, "x", SD3_TARGETS, seed=3)
    assert any("attn2.to_q.lora_A" in n for n, _ in ref.named_parameters())
    (tmp_path / "lora").mkdir()
    file = save_peft_lora(StableDiffusion3Pipeline, ref, "x", cfg, tmp_path / "lora")
    x, t, context, pooled = sd3_inputs(p, B=1, H=8, W=8, L=5)
    expected = sd3_reference(ref, x, t, context, pooled)

    model = load_transformer(base)
    plain = run(model, dict(x=x, t=t, context=context, pooled=pooled))
    convert.load_lora(model, file)
    got = run(model, dict(x=x, t=t, context=context, pooled=pooled))
    assert rel_err(got, expected) <= 1e-4 and rel_err(plain, expected) > 1e-2

    out = tmp_path / "ours.safetensors"
    convert.save_lora(model, out, name="pytorch_lora_weights")
    ref2 = diffusers_sd3(p, base)
    diffusers_load(StableDiffusion3Pipeline, ref2, out, "ours")
    assert rel_err(sd3_reference(ref2, x, t, context, pooled), expected) <= 1e-4

    # the same adapter under our SAI paths (no swap): kohya (dots as underscores), ComfyUI (`diffusion_model.`)
    updown = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "alpha": "alpha"}
    layouts = {
        "kohya": lambda mod, role: f"lora_unet_{mod.replace('.', '_')}.{updown[role]}",
        "comfy-updown": lambda mod, role: f"diffusion_model.{mod}.{updown[role]}",
        "comfy-AB": lambda mod, role: f"diffusion_model.{mod}.{role}",
    }
    for layout, name in layouts.items():
        sd = {}
        for k, v in lora_state_dict(model, "pytorch_lora_weights").items():
            mod, role = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|alpha)", k).groups()
            sd[name(mod, role)] = v
        save_file(sd, tmp_path / f"{layout}.safetensors")
        again = load_transformer(base)
        convert.load_lora(again, tmp_path / f"{layout}.safetensors")
        assert rel_err(run(again, dict(x=x, t=t, context=context, pooled=pooled)), expected) <= 1e-4, layout

    names = inject_lora(load_transformer(base))  # default targets: attention of both streams and attn2
    assert "joint_blocks.1.x_block.attn2.qkv" in names and "joint_blocks.2.context_block.attn.qkv" in names
    assert "joint_blocks.2.context_block.attn.proj" not in names and len(names) == 3 * 4 - 1 + 2 * 2


def test_inject_groups_and_bad_targets():
    model = Flux(TINY_FLUX)
    names = inject_lora(model, "m", rank=2, targets=["attn", "mlp", r"final_layer\.linear"])
    lin1 = model.single_blocks[1].linear1.lora["m"]
    assert (lin1.offset, lin1.length) == (0, 3 * H + M)  # q, k, v rows and the MLP rows: all of linear1
    assert "double_blocks.0.img_mlp.2" in names and "final_layer.linear" in names
    assert "double_blocks.0.img_mod.lin" not in names
    with pytest.raises(ValueError, match="match no Linear"):
        inject_lora(model, "n", targets=[r"nothing\.here"])
    with pytest.raises(KeyError, match="no LoRA adapter"):
        set_lora_scale(model, "nope", 1.0)
    assert math.isclose(model.double_blocks[0].img_attn.qkv.lora["m"].scale.item(), 1.0)
