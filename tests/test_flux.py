"""FLUX.1 against Diffusers' FluxTransformer2DModel: same weights (BFL files, converted with the documented
rules), same inputs, float32 outputs within rel. error 1e-4, with and without TACA; and the loader's errors."""

import dataclasses
import math
import pickle
from contextlib import contextmanager
from typing import ClassVar

import pytest
import torch
from builders import TINY_FLUX, diffusers_flux, flux_bfl_to_diffusers, flux_state, rel_err
from einops import rearrange
from safetensors.torch import save_file

import convert
import mmdit
import mmdit.attention
from convert import CheckpointError, load_transformer
from convert.__main__ import inspect as inspect_checkpoint
from mmdit.attention import attention_reference
from mmdit.flux import PRESETS, Flux, FluxParams, image_ids

SCHNELL = dataclasses.replace(TINY_FLUX, guidance_embed=False)
CTX_LEN = 7


def inputs(p: FluxParams, B=2, h=6, w=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(B, p.in_channels // 4, h, w, generator=g),
        t=torch.rand(B, generator=g),
        context=torch.randn(B, CTX_LEN, p.context_in_dim, generator=g),
        pooled=torch.randn(B, p.vec_in_dim, generator=g),
        guidance=torch.tensor([3.5, 1.5][:B]) if p.guidance_embed else None,
    )


@contextmanager
def diffusers_explicit_taca(temperature, n_txt):
    """Replace the attention inside the Diffusers FLUX model by explicit logits with TACA's factor."""
    import diffusers.models.transformers.transformer_flux as tf

    original = tf.dispatch_attention_fn

    def explicit(query, key, value, **_):  # (B, L, H, D), text first
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        L = q.shape[2]
        factor = torch.ones(L, L)
        factor[n_txt:, :n_txt] = temperature  # image queries x text keys
        w = torch.softmax(factor * (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1)
        return (w @ v).transpose(1, 2)

    tf.dispatch_attention_fn = explicit
    try:
        yield
    finally:
        tf.dispatch_attention_fn = original


def diffusers_forward(ref, x, t, context, pooled, guidance):
    B, _, h, w = x.shape
    out = ref(
        hidden_states=rearrange(x, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=2, pw=2),
        encoder_hidden_states=context,
        pooled_projections=pooled,
        timestep=t,
        img_ids=image_ids(h // 2, w // 2),
        txt_ids=torch.zeros(context.shape[1], 3),
        guidance=guidance,
        return_dict=False,
    )[0]
    return rearrange(out, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=h // 2, ph=2, pw=2)


def reference(p: FluxParams, sd: dict):
    ref = diffusers_flux(p)
    ref.load_state_dict(flux_bfl_to_diffusers({k: v.float() for k, v in sd.items()}, p), strict=True)
    return ref.eval()


@pytest.mark.parametrize("params", [TINY_FLUX, SCHNELL], ids=["dev", "schnell"])
@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn], ids=["fp32", "bf16", "fp8"])
@pytest.mark.parametrize("gamma", [None, 1.25], ids=["plain", "taca"])
def test_matches_diffusers(tmp_path, params, file_dtype, gamma):
    sd = {k: v.to(file_dtype) for k, v in flux_state(params).items()}
    save_file(sd, tmp_path / "flux.safetensors")
    ours = load_transformer(tmp_path / "flux.safetensors", dtype=torch.float32)
    assert ours.family == "flux" and ours.dtype == torch.float32
    ref = reference(params, sd)
    args = inputs(params)
    with torch.no_grad():
        v = ours(**args, temperature=gamma)
        with diffusers_explicit_taca(gamma or 1.0, CTX_LEN):
            r = diffusers_forward(ref, **args)
    assert v.shape == args["x"].shape
    assert rel_err(v, r) <= 1e-4
    if gamma is not None:  # TACA changes the output, so the comparison above is meaningful
        assert rel_err(v, ours(**args)) > 1e-3


def test_taca_matrix_equals_gamma_and_general_matrix_matches_reference(monkeypatch):
    sd = flux_state(TINY_FLUX)
    model = Flux(TINY_FLUX)
    model.load_state_dict(sd)
    args = inputs(TINY_FLUX, B=1)
    with torch.no_grad():
        by_gamma = model(**args, temperature=1.3)
        by_matrix = model(**args, temperature=torch.tensor([[1.0, 1.0], [1.3, 1.0]]))
        assert rel_err(by_matrix, by_gamma) <= 1e-5
        # a general per-head matrix: the fused path equals explicit logits inside our own model
        T = torch.tensor([[[1.1, 0.9], [1.3, 1.0]], [[1.0, 1.2], [0.8, 1.05]]])
        fast = model(**args, temperature=T)
        monkeypatch.setattr(mmdit.attention, "attention", attention_reference)  # what every JointAttention calls
        slow = model(**args, temperature=T)
    assert rel_err(fast, slow) <= 1e-5


def test_layouts_load_to_same_outputs(tmp_path):
    """BFL bare keys, `model.diffusion_model.` prefix, Diffusers folder (sharded) and repo folder."""
    sd = flux_state(TINY_FLUX, seed=3)
    save_file(sd, tmp_path / "bare.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, tmp_path / "prefixed.safetensors")
    ref = reference(TINY_FLUX, sd)
    ref.save_pretrained(tmp_path / "repo" / "transformer", max_shard_size="2MB")
    assert (tmp_path / "repo" / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    args = inputs(TINY_FLUX, seed=5)
    with torch.no_grad():
        expected = diffusers_forward(ref, **args)
        for src in ["bare.safetensors", "prefixed.safetensors", "repo/transformer", "repo"]:
            model = load_transformer(tmp_path / src, dtype=torch.float32)
            assert rel_err(model(**args), expected) <= 1e-4, src
    assert convert.detect_transformer(tmp_path / "repo").layout == "diffusers"
    assert convert.detect_transformer(tmp_path / "prefixed.safetensors").layout == "bfl"


def test_scaled_fp8_is_dequantized(tmp_path):
    """ComfyUI 'scaled fp8': W = W_fp8 * scale_weight, marker and scales consumed."""
    sd = flux_state(TINY_FLUX, seed=4)
    stored, expected = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}, {}
    for k, v in sd.items():
        if k.endswith("qkv.weight"):
            s = v.abs().max() / 448
            stored[k] = (v / s).to(torch.float8_e4m3fn)
            stored[k.replace(".weight", ".scale_weight")] = s.reshape(())
            stored[k.replace(".weight", ".scale_input")] = torch.ones(())
            expected[k] = stored[k].float() * s
        else:
            stored[k] = expected[k] = v
    save_file(stored, tmp_path / "scaled.safetensors")
    model = load_transformer(tmp_path / "scaled.safetensors", dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_load_dtype_and_defaults(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in flux_state(TINY_FLUX).items()}
    save_file(sd, tmp_path / "f.safetensors")
    m = load_transformer(tmp_path / "f.safetensors")  # the file's own dtype
    assert m.dtype == torch.bfloat16 and not any(p.is_meta for p in m.parameters())
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    v = m(**inputs(TINY_FLUX))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()  # returned in x's dtype
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}
    save_file(fp8, tmp_path / "f8.safetensors")
    assert load_transformer(tmp_path / "f8.safetensors").dtype == torch.bfloat16  # float8 upcast


def test_config_detected_from_keys(tmp_path):
    wide = dataclasses.replace(TINY_FLUX, depth=3, depth_single_blocks=1, mlp_ratio=2.0, context_in_dim=48)
    save_file(flux_state(wide), tmp_path / "w.safetensors")
    d = convert.detect_transformer(tmp_path / "w.safetensors")
    assert d.params == wide and d.family == "flux"
    assert d.num_params == sum(p.numel() for p in Flux(wide).parameters())
    text = inspect_checkpoint(str(tmp_path / "w.safetensors"))
    assert "family:     flux" in text and "depth = 3" in text and "float32" in text
    assert "flux-dev-like" in text and f"{d.num_params:,}" in text


def test_presets_are_the_official_configs():
    dev, schnell = PRESETS["flux-dev"], PRESETS["flux-schnell"]
    with torch.device("meta"):
        n_dev = sum(p.numel() for p in Flux(dev).parameters())
        n_schnell = sum(p.numel() for p in Flux(schnell).parameters())
        keys = Flux(dev).state_dict().keys()
    # the headers of the official files (black-forest-labs/FLUX.1-dev, -schnell; docs/formats.md, FLUX BFL layout)
    assert (n_dev, n_schnell) == (11_901_408_320, 11_891_178_560)
    assert len(keys) == 780
    assert dev.head_dim == 128 and schnell.guidance_embed is False


def test_tiny_keeps_the_layout_and_build_model_picks_by_family():
    for p in PRESETS.values():
        tiny = p.tiny()
        assert (tiny.depth, tiny.depth_single_blocks, tiny.num_heads) == (2, 2, 2)
        assert (tiny.head_dim, tiny.axes_dim, tiny.in_channels, tiny.vec_in_dim, tiny.context_in_dim,
                tiny.guidance_embed) == (p.head_dim, p.axes_dim, p.in_channels, p.vec_in_dim, p.context_in_dim,
                                         p.guidance_embed)
        model = mmdit.build_model(tiny)
        assert type(model) is Flux and model.family == tiny.family == "flux" and model.params == tiny

    @dataclasses.dataclass(frozen=True)
    class OtherParams:
        family: ClassVar[str] = "flux3"

    with pytest.raises(ValueError, match="no model for the family 'flux3'; known: flux, flux2, sd3"):
        mmdit.build_model(OtherParams())


def test_errors_name_the_problem(tmp_path):
    sd = flux_state(TINY_FLUX)
    missing = dict(sd)
    del missing["double_blocks.1.txt_mlp.2.bias"]
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"double_blocks\.1\.txt_mlp\.2\.bias"):
        load_transformer(tmp_path / "missing.safetensors")

    extra = dict(sd, **{"double_blocks.0.img_attn.extra.weight": torch.zeros(2)})
    save_file(extra, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*double_blocks\.0\.img_attn\.extra\.weight"):
        load_transformer(tmp_path / "extra.safetensors")

    bad = dict(sd, **{"single_blocks.0.linear2.weight": torch.zeros(256, 100)})
    save_file(bad, tmp_path / "shape.safetensors")
    with pytest.raises(CheckpointError, match=r"single_blocks\.0\.linear2\.weight.*\[256, 100\].*\[256, 1280\]"):
        load_transformer(tmp_path / "shape.safetensors")

    (tmp_path / "model.ckpt").write_bytes(pickle.dumps({"state_dict": {}}))
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_transformer(tmp_path / "model.ckpt")

    save_file({"some.other.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="unsupported layout"):
        load_transformer(tmp_path / "other.safetensors")

    with pytest.raises(CheckpointError, match="no such file"):
        load_transformer(tmp_path / "absent.safetensors")

    (tmp_path / "dfolder").mkdir()
    save_file(flux_bfl_to_diffusers(sd, TINY_FLUX), tmp_path / "dfolder" / "x.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        load_transformer(tmp_path / "dfolder")


def test_model_input_errors():
    model = Flux(TINY_FLUX)
    args = inputs(TINY_FLUX)
    with pytest.raises(ValueError, match="guidance"):
        model(**dict(args, guidance=None))
    with pytest.raises(ValueError, match="even"):
        model(**dict(args, x=torch.randn(2, 16, 5, 4)))
    with pytest.raises(ValueError, match="channels"):
        model(**dict(args, x=torch.randn(2, 8, 6, 4)))
    with pytest.raises(ValueError, match="sum to the head dim"):
        FluxParams(axes_dim=(16, 56, 50))


def test_inspect_cli(tmp_path, capsys):
    from convert.__main__ import main

    save_file(flux_state(SCHNELL), tmp_path / "s.safetensors")
    assert main(["inspect", str(tmp_path / "s.safetensors")]) == 0
    assert "flux-schnell-like" in capsys.readouterr().out
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    assert main(["inspect", str(tmp_path / "bad.safetensors")]) == 2
    assert "not a safetensors file" in capsys.readouterr().err
