"""FLUX.2 against Diffusers' Flux2Transformer2DModel: BFL files converted by Diffusers' own single-file converter,
Diffusers state dicts through our key map, inputs packed and positioned by Diffusers' own pipeline functions;
float32 outputs within rel. error 1e-4, with and without TACA, with and without reference images."""

import dataclasses

import diffusers.models.transformers.transformer_flux2 as diffusers_flux2
import pytest
import torch
from builders import randomize_, rel_err
from diffusers import Flux2Transformer2DModel
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
from diffusers.pipelines.flux2.pipeline_flux2 import Flux2Pipeline as P
from safetensors.torch import save_file

import mmdit
import mmdit.attention
from convert.files import Checkpoint, CheckpointError
from convert.flux2 import DIFFUSERS_TO_BFL, params_from_diffusers_config, params_from_native, variant_name
from mmdit.attention import attention_reference
from mmdit.flux2 import PRESETS, Flux2, Flux2Params, image_ids, patchify, reference_t, text_ids
from training.loop import checkpoint_blocks

DEV = PRESETS["flux2-dev"].tiny()  # guidance embedding, context 15360
KLEIN = PRESETS["flux2-klein-4b"].tiny()  # no guidance, context 7680
CTX_LEN = 7


def diffusers_config(p: Flux2Params) -> dict:
    return dict(
        in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        attention_head_dim=p.head_dim, num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        mlp_ratio=p.mlp_ratio, axes_dims_rope=p.axes_dim, rope_theta=p.theta, guidance_embeds=p.guidance_embed,
    )


def bfl_state(p: Flux2Params, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random FLUX.2 state dict in the BFL layout (float32)."""
    return {k: v.clone() for k, v in randomize_(Flux2(p), seed).state_dict().items()}


def reference(p: Flux2Params, sd: dict) -> Flux2Transformer2DModel:
    """Diffusers' model holding the BFL weights, converted by Diffusers' own single-file converter."""
    ref = Flux2Transformer2DModel(**diffusers_config(p))
    ref.load_state_dict(convert_flux2_transformer_checkpoint_to_diffusers(dict(sd)), strict=True)
    return ref.eval()


def ours(p: Flux2Params, sd: dict) -> Flux2:
    model = Flux2(p)
    model.load_state_dict(sd, strict=True)
    return model.eval()


def inputs(p: Flux2Params, B=2, h=8, w=6, seed=1):
    """Non-square latents (8 x 6 -> 4 x 3 tokens), batch 2, different t and guidance per sample."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(B, p.in_channels // 4, h, w, generator=g),
        t=torch.rand(B, generator=g),
        context=torch.randn(B, CTX_LEN, p.context_in_dim, generator=g),
        guidance=torch.tensor([4.0, 2.5][:B]) if p.guidance_embed else None,
    )


def refs(p: Flux2Params, seed=2):
    """Two reference latents of other sizes than x, batch 1 (the same references for every sample)."""
    g = torch.Generator().manual_seed(seed)
    C = p.in_channels // 4
    return [torch.randn(1, C, 4, 6, generator=g), torch.randn(1, C, 6, 2, generator=g)]


def diffusers_forward(ref, x, t, context, guidance=None, ref_latents=()):
    """Tokens, ids and unpacking exactly as Flux2Pipeline / Flux2KleinPipeline build them."""
    latents = P._patchify_latents(x)  # (B, 128, h, w)
    hidden, img_ids = P._pack_latents(latents), P._prepare_latent_ids(latents)
    if ref_latents:
        patches = [P._patchify_latents(r) for r in ref_latents]
        B = x.shape[0]
        ref_tokens = torch.cat([P._pack_latents(r) for r in patches], 1).expand(B, -1, -1)
        hidden = torch.cat((hidden, ref_tokens), 1)
        img_ids = torch.cat((img_ids, P._prepare_image_ids(patches).expand(B, -1, -1)), 1)
    out = ref(
        hidden_states=hidden, encoder_hidden_states=context, timestep=t, guidance=guidance,
        img_ids=img_ids, txt_ids=P._prepare_text_ids(context), return_dict=False,
    )[0]
    out = P._unpack_latents_with_ids(out[:, : latents.shape[2] * latents.shape[3]], P._prepare_latent_ids(latents))
    return P._unpatchify_latents(out)


def explicit_taca_in_diffusers(monkeypatch, temperature, n_txt=CTX_LEN):
    """Every attention of Diffusers' FLUX.2 (both block types) computed by explicit logits with TACA's factor."""

    def explicit(query, key, value, attn_mask=None, **_):  # (B, L, H, D), text first
        assert attn_mask is None
        q, k, v = (a.transpose(1, 2) for a in (query, key, value))
        return attention_reference(q, k, v, n_txt, temperature).unflatten(-1, (q.shape[1], q.shape[3]))

    monkeypatch.setattr(diffusers_flux2, "dispatch_attention_fn", explicit)


@pytest.mark.parametrize("params", [DEV, KLEIN], ids=["dev", "klein"])
@pytest.mark.parametrize("gamma", [None, 1.25], ids=["plain", "taca"])
def test_bfl_file_matches_diffusers(one_thread, monkeypatch, params, gamma):
    sd = bfl_state(params)
    model, ref = ours(params, sd), reference(params, sd)
    args = inputs(params)
    with torch.no_grad():
        v = model(**args, temperature=gamma)
        if gamma is not None:
            explicit_taca_in_diffusers(monkeypatch, gamma)
        r = diffusers_forward(ref, **args)
        assert v.shape == args["x"].shape
        assert rel_err(v, r) <= 1e-4
        if gamma is not None:  # TACA changes the output, so the comparison above is meaningful
            assert rel_err(v, model(**args)) > 1e-3
        if params.guidance_embed:  # the guidance embedding is used
            assert rel_err(v, model(**dict(args, guidance=torch.tensor([1.0, 1.0])), temperature=gamma)) > 1e-3


@pytest.mark.parametrize("gamma", [None, 1.25], ids=["plain", "taca"])
def test_reference_images_match_diffusers(one_thread, monkeypatch, gamma):
    """Editing: two reference images after the image tokens, at t = 10, 20; TACA's image queries include them."""
    sd = bfl_state(KLEIN, seed=4)
    model, ref = ours(KLEIN, sd), reference(KLEIN, sd)
    args, ref_latents = inputs(KLEIN, seed=5), refs(KLEIN)
    with torch.no_grad():
        v = model(**args, temperature=gamma, ref_latents=ref_latents)
        if gamma is not None:
            explicit_taca_in_diffusers(monkeypatch, gamma)
        r = diffusers_forward(ref, **args, ref_latents=ref_latents)
        assert v.shape == args["x"].shape and rel_err(v, r) <= 1e-4
        assert rel_err(v, model(**args, temperature=gamma)) > 1e-3  # the references are attended to
        batched = [z.expand(2, -1, -1, -1) for z in ref_latents]  # per-sample references equal shared ones
        assert rel_err(model(**args, temperature=gamma, ref_latents=batched), v) <= 1e-6


def test_general_temperature_matrix_equals_explicit_logits(one_thread, monkeypatch):
    """The fused two-call path equals explicit logits inside our own model, per head, with references."""
    model = ours(KLEIN, bfl_state(KLEIN, seed=6))
    args = dict(inputs(KLEIN, B=1), ref_latents=refs(KLEIN)[:1])
    T = torch.tensor([[[1.1, 0.9], [1.3, 1.0]], [[1.0, 1.2], [0.8, 1.05]]])
    with torch.no_grad():
        by_gamma = model(**args, temperature=1.3)
        assert rel_err(model(**args, temperature=torch.tensor([[1.0, 1.0], [1.3, 1.0]])), by_gamma) <= 1e-5
        fast = model(**args, temperature=T)
        monkeypatch.setattr(mmdit.attention.JointAttention, "forward", lambda self, *a: attention_reference(*a))
        slow = model(**args, temperature=T)
    assert rel_err(fast, slow) <= 1e-5


def test_diffusers_state_dict_through_key_map(one_thread, tmp_path):
    """Diffusers layout -> ours with our KeyMap loads strictly and gives Diffusers' outputs; Diffusers'
    own BFL -> Diffusers converter takes the result back to the same tensors."""
    ref = randomize_(Flux2Transformer2DModel(**diffusers_config(DEV)), seed=7).eval()
    dsd = ref.state_dict()
    save_file(dsd, tmp_path / "diffusers.safetensors")
    loaders = DIFFUSERS_TO_BFL.tensors(Checkpoint.open(tmp_path / "diffusers.safetensors"))
    bfl = {k: load() for k, load in loaders.items()}
    model = ours(DEV, bfl)
    back = convert_flux2_transformer_checkpoint_to_diffusers(dict(bfl))
    assert back.keys() == dsd.keys() and all(torch.equal(back[k], dsd[k]) for k in dsd)
    args = inputs(DEV, seed=8)
    with torch.no_grad():
        assert rel_err(model(**args), diffusers_forward(ref, **args)) <= 1e-4
    assert params_from_diffusers_config(dict(ref.config)) == DEV


def test_config_read_from_bfl_keys_and_shapes(one_thread, tmp_path):
    custom = dataclasses.replace(KLEIN, depth=3, depth_single_blocks=1, mlp_ratio=2.0, context_in_dim=48)
    cases = [(DEV, "flux2-dev-like (custom size)"), (KLEIN, "flux2-klein-4b-like (custom size)"),
             (custom, "flux2-klein-like (custom size)")]
    for i, (p, name) in enumerate(cases):
        save_file(bfl_state(p), tmp_path / f"{i}.safetensors")
        ckpt = Checkpoint.open(tmp_path / f"{i}.safetensors")
        assert params_from_native(ckpt) == p and variant_name(p) == name
    assert variant_name(PRESETS["flux2-klein-9b"].tiny()) == "flux2-klein-9b-like (custom size)"
    assert variant_name(dataclasses.replace(PRESETS["flux2-dev"])) == "flux2-dev"
    no_mlp = {k: v for k, v in bfl_state(KLEIN).items() if k != "double_blocks.0.img_mlp.2.weight"}
    save_file(no_mlp, tmp_path / "no_mlp.safetensors")
    with pytest.raises(CheckpointError, match=r"double_blocks\.0\.img_mlp\.2\.weight"):
        params_from_native(Checkpoint.open(tmp_path / "no_mlp.safetensors"))
    with pytest.raises(CheckpointError, match="patch_size=2"):
        params_from_diffusers_config({"patch_size": 2})


# transformer/config.json of the official Diffusers repos (entries equal to the class defaults left out)
OFFICIAL_CONFIGS = {
    "flux2-dev": {},
    "flux2-klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                           guidance_embeds=False),
    "flux2-klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                           guidance_embeds=False),
}


def test_presets_are_the_official_configs(one_thread):
    counts = {}
    for name, cfg in OFFICIAL_CONFIGS.items():
        assert params_from_diffusers_config(cfg) == PRESETS[name] and variant_name(PRESETS[name]) == name
        with torch.device("meta"):
            n_ours = sum(p.numel() for p in Flux2(PRESETS[name]).parameters())
            n_diffusers = sum(p.numel() for p in Flux2Transformer2DModel(**cfg).parameters())
        assert n_ours == n_diffusers
        counts[name] = n_ours
    # bf16 files of 64.4 GB, 7.75 GB, 18.2 GB
    assert counts == {"flux2-dev": 32_223_281_152, "flux2-klein-4b": 3_875_544_576, "flux2-klein-9b": 9_078_581_248}
    with torch.device("meta"):
        assert len(Flux2(PRESETS["flux2-dev"]).state_dict()) == 299
    for name, p in PRESETS.items():  # tiny: the same layout and input widths, two blocks of each kind
        tiny = p.tiny()
        assert (tiny.depth, tiny.depth_single_blocks, tiny.head_dim, tiny.context_in_dim) == (2, 2, 128, p.context_in_dim)
        model = mmdit.build_model(tiny)
        assert type(model) is Flux2 and model.family == tiny.family == "flux2" and model.params == tiny


def test_positions_and_packing_are_diffusers():
    """Text (0, 0, 0, l); image (0, row, col, 0); reference i (10 + 10 i, row, col, 0); channels (c, ph, pw)."""
    x = torch.randn(1, 32, 6, 4)
    assert torch.equal(patchify(x), P._pack_latents(P._patchify_latents(x)))
    assert torch.equal(text_ids(5), P._prepare_text_ids(torch.zeros(1, 5, 8))[0].float())
    assert torch.equal(image_ids(3, 2), P._prepare_latent_ids(torch.zeros(1, 128, 3, 2))[0].float())
    sizes = [(2, 3), (4, 1), (1, 2)]
    ours_ids = torch.cat([image_ids(h, w, reference_t(i)) for i, (h, w) in enumerate(sizes)])
    assert torch.equal(ours_ids, P._prepare_image_ids([torch.zeros(1, 128, h, w) for h, w in sizes])[0].float())


def test_gradient_checkpointing_gives_the_same_gradients(one_thread):
    args = dict(inputs(KLEIN, B=1), ref_latents=refs(KLEIN)[1:])
    grads = []
    for ckpt in (False, True):
        model = ours(KLEIN, bfl_state(KLEIN, seed=9)).train()
        if ckpt:  # applied from outside, as `mmdit train` does
            checkpoint_blocks(model)
        model(**args, temperature=1.2).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel_err(grads[1], grads[0]) <= 1e-5


def test_input_errors(one_thread):
    model = Flux2(DEV)
    args = inputs(DEV)
    with torch.no_grad():  # guidance as a float is the same scale for every sample
        assert torch.equal(model(**dict(args, guidance=4.0)), model(**dict(args, guidance=torch.tensor([4.0, 4.0]))))
    with pytest.raises(ValueError, match="guidance"):
        model(**dict(args, guidance=None))
    with pytest.raises(ValueError, match="pooled"):
        model(**args, pooled=torch.zeros(2, 768))
    with pytest.raises(ValueError, match="even"):
        model(**dict(args, x=torch.randn(2, 32, 5, 4)))
    with pytest.raises(ValueError, match="channels"):
        model(**dict(args, x=torch.randn(2, 16, 6, 4)))
    with pytest.raises(ValueError, match="batch"):
        model(**args, ref_latents=[torch.randn(3, 32, 2, 2)])
    with pytest.raises(ValueError, match="sum to the head dim"):
        Flux2Params(axes_dim=(32, 32, 32, 16))
    with pytest.raises(ValueError, match="4 axes"):
        Flux2Params(axes_dim=(64, 32, 32))
