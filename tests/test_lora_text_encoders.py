"""Text-encoder LoRAs against Diffusers + PEFT on the tiny FLUX and SD3.5 pipelines (tests/pipeline_builders.py).

PEFT adapters with random A and B (alpha != rank, rank and alpha patterns) on copies of Diffusers' text
encoders are the oracle: Diffusers' `encode_prompt` with them. The same weights are saved the way Diffusers
saves them (`save_lora_weights`: `text_encoder.<HF path>.lora_A.weight` + PEFT configs in the header) and in
the kohya layout (`lora_te1_<HF path with _>.lora_down.weight`, `.alpha`; T5 as `lora_te3_`), loaded into our
pipeline with `load_pipeline_lora`: our `encode_prompt` matches (rel. error 1e-4, float32), and Diffusers'
`load_lora_weights` on the Diffusers file matches too (it loads the CLIP encoders only, never T5).
"""

import copy
import json
import re

import pytest
import torch
from builders import rel_err
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from pipeline_builders import PROMPTS, T5_LEN, built, flux_noise, pack, unpack
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_lora import FLUX_LORAS, add_random_peft_lora

import convert
from convert import CheckpointError
from convert.lora import load_text_encoder_lora
from mmdit.lora import (
    adapter_names,
    lora_enabled,
    merge_lora,
    set_lora_scale,
    unmerge_lora,
)
from sampling import load_pipeline, load_pipeline_lora

pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
TOL = 1e-4
RANK, ALPHA = 4, 8.0
CLIP = {"target_modules": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"fc2": 3.0}}
T5 = {"target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"]}
ENCODERS = {"flux": {"text_encoder": CLIP, "text_encoder_2": T5},  # Diffusers component -> PEFT config
            "sd3": {"text_encoder": CLIP, "text_encoder_2": CLIP, "text_encoder_3": T5}}
# Diffusers component -> kohya prefix (sd-scripts: te1 CLIP-L, te2 CLIP-bigG, te3 T5)
KOHYA = {"flux": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
         "sd3": {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}}


def peft_copy(model, seed: int, **cfg):
    """A copy of a transformers encoder with a random PEFT LoRA: (copy, PEFT state dict, LoraConfig)."""
    model = copy.deepcopy(model)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, **cfg)
    model.add_adapter(config, adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B != 0: with B = 0 every loader would pass
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model, get_peft_model_state_dict(model, adapter_name="x"), config


def encode(pipe, family: str):
    """Diffusers' (context, pooled)."""
    with torch.no_grad():
        if family == "flux":
            context, pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=T5_LEN)
        else:
            context, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                       max_sequence_length=T5_LEN)
    return context, pooled


def read(path) -> tuple[dict, dict]:
    """A LoRA file's tensors and header."""
    with safe_open(str(path), "pt") as f:
        return load_file(path), f.metadata()


def close(got, expected) -> bool:
    return all(rel_err(a, b) <= TOL for a, b in zip(got, expected))


def write_kohya(family: str, loras: dict, path) -> None:
    """The PEFT weights as kohya keys, alpha per module so that alpha / rank is PEFT's scale."""
    out = {}
    for component, (_, sd, _) in loras.items():
        for k, v in sd.items():
            mod, ab = re.fullmatch(r"(.+)\.lora_([AB])\.weight", k).groups()
            if ".layers." in mod:  # CLIP: sd-scripts writes transformers 4's `text_model.` paths
                mod = "text_model." + mod.removeprefix("text_model.")
            key = KOHYA[family][component] + mod.replace(".", "_")
            out[f"{key}.lora_{'down' if ab == 'A' else 'up'}.weight"] = v
            out[f"{key}.alpha"] = torch.tensor(3.0 if mod.endswith(".fc2") else ALPHA)
    save_file(out, path)


def add_diffusers_keys(src, dst, component: str, sd: dict, config) -> None:
    """The Diffusers-layout file `src` plus an encoder's PEFT weights and config, as `dst`
    (`save_lora_weights` takes no T5 weights)."""
    tensors, meta = read(src)
    tensors |= {f"{component}.{k}": v for k, v in sd.items()}
    cfg = json.loads(meta["lora_adapter_metadata"])
    cfg |= {f"{component}.{k}": sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    save_file(tensors, dst, {**meta, "lora_adapter_metadata": json.dumps(cfg)})


def build(family: str, d):
    """Diffusers' tiny pipeline (shared, left unchanged), PEFT copies of its encoders, the oracle outputs
    and the LoRA files; the FLUX file also holds a transformer LoRA."""
    ref, folder = built(family)
    loras = {c: peft_copy(getattr(ref, c), seed=i, **cfg) for i, (c, cfg) in enumerate(ENCODERS[family].items())}
    oracle = type(ref)(**{**ref.components, **{c: m for c, (m, _, _) in loras.items()}})
    clips = {c: v for c, v in loras.items() if ENCODERS[family][c] is CLIP}
    save = {f"{c}_lora_layers": sd for c, (_, sd, _) in clips.items()}
    save |= {f"{c}_lora_adapter_metadata": cfg.to_dict() for c, (_, _, cfg) in clips.items()}
    if family == "flux":
        transformer = copy.deepcopy(ref.transformer)
        cfg = add_random_peft_lora(transformer, "x", FLUX_LORAS["attn"], seed=7)
        save |= {"transformer_lora_layers": get_peft_model_state_dict(transformer, adapter_name="x"),
                 "transformer_lora_adapter_metadata": cfg.to_dict()}
    type(ref).save_lora_weights(d / "diffusers", **save)
    files = {"diffusers": d / "diffusers" / "pytorch_lora_weights.safetensors", "kohya": d / "kohya.safetensors"}
    write_kohya(family, loras, files["kohya"])
    if family == "sd3":  # T5 in the Diffusers layout too (Diffusers' own loader leaves it out)
        files["diffusers+t5"] = d / "diffusers_t5.safetensors"
        add_diffusers_keys(files["diffusers"], files["diffusers+t5"], "text_encoder_3", *loras["text_encoder_3"][1:])
    # Diffusers' loader on fresh copies of the parts it changes
    fresh = type(ref)(**{**ref.components, **{c: copy.deepcopy(getattr(ref, c)) for c in clips},
                         "transformer": copy.deepcopy(ref.transformer)})
    fresh.load_lora_weights(str(files["diffusers"]), adapter_name="x")
    clip_oracle = type(ref)(**{**ref.components, **{c: m for c, (m, _, _) in clips.items()}})
    return {"folder": folder, "files": files, "fresh": fresh, "base": encode(ref, family),
            "oracle": encode(oracle, family), "clip_oracle": encode(clip_oracle, family),
            "diffusers": encode(fresh, family)}


@pytest.fixture(scope="module", autouse=True)
def one_thread_here():
    """conftest's `one_thread` for the whole module, its fixtures included (5 s instead of 15 on a busy CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return build("flux", tmp_path_factory.mktemp("flux_te_lora"))


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return build("sd3", tmp_path_factory.mktemp("sd3_te_lora"))


def ours(case, file: str, **kw):
    pipe = load_pipeline(case["folder"], max_sequence_length=T5_LEN)
    name = load_pipeline_lora(pipe, case["files"][file], **kw)
    return pipe, name


def test_flux_diffusers_layout_matches_diffusers(flux):
    assert close(flux["diffusers"], flux["clip_oracle"])  # Diffusers' loader = PEFT on its CLIP
    pipe, name = ours(flux, "diffusers")
    assert name == "pytorch_lora_weights"
    assert adapter_names(pipe.transformer) == adapter_names(pipe.encoders["clip_l"]) == [name]
    got = pipe.encode_prompt(PROMPTS)
    assert close(got, flux["diffusers"])
    assert rel_err(got[1], flux["base"][1]) > 1e-2  # the LoRA changes CLIP's pooled vector
    # the transformer part too: one sampling step against Diffusers' pipeline with the LoRA loaded
    noise = flux_noise(2, 32, 32, seed=3)
    expected = flux["fresh"](PROMPTS, height=32, width=32, guidance_scale=3.5, num_inference_steps=1,
                             max_sequence_length=T5_LEN, latents=pack(noise), output_type="latent").images
    expected = unpack(expected, 4, 4)
    latents = pipe.generate(PROMPTS, height=32, width=32, steps=1, guidance=3.5, noise=noise, output="latent")
    assert rel_err(latents, expected) <= TOL


def test_flux_kohya_layout_with_t5(flux):
    pipe, _ = ours(flux, "kohya")
    assert adapter_names(pipe.transformer) == [] and adapter_names(pipe.encoders["t5"]) == ["kohya"]
    got = pipe.encode_prompt(PROMPTS)
    assert close(got, flux["oracle"])
    assert rel_err(got[0], flux["base"][0]) > 1e-2 and rel_err(got[1], flux["base"][1]) > 1e-2


def test_sd3_diffusers_layout_matches_diffusers(sd3):
    assert close(sd3["diffusers"], sd3["clip_oracle"])
    pipe, _ = ours(sd3, "diffusers")
    assert pipe.encoders["t5"] is not None and adapter_names(pipe.encoders["t5"]) == []
    got = pipe.encode_prompt(PROMPTS)
    assert close(got, sd3["diffusers"])
    assert rel_err(got[0][:, :77], sd3["base"][0][:, :77]) > 1e-2 and rel_err(got[1], sd3["base"][1]) > 1e-2


@pytest.mark.parametrize("file", ["diffusers+t5", "kohya"])
def test_sd3_all_three_encoders(sd3, file):
    pipe, name = ours(sd3, file)
    assert all(adapter_names(e) == [name] for e in pipe.encoders.values())
    assert adapter_names(pipe.transformer) == []
    got = pipe.encode_prompt(PROMPTS)
    assert close(got, sd3["oracle"])
    assert rel_err(got[0][:, 77:], sd3["base"][0][:, 77:]) > 1e-2  # T5's part changes too


def test_strength_switch_merge_on_an_encoder(sd3):
    pipe = load_pipeline(sd3["folder"], max_sequence_length=T5_LEN)
    clip = pipe.encoders["clip_l"]
    w0 = clip.text_model.encoder.layers[0].self_attn.q_proj.weight.clone()
    base = pipe.encode_prompt(PROMPTS)
    name = load_text_encoder_lora(clip, sd3["files"]["kohya"], "clip_l", "sd3", scale=0.0)
    assert all(torch.equal(a, b) for a, b in zip(pipe.encode_prompt(PROMPTS), base))  # strength 0
    set_lora_scale(clip, name, 1.0)
    load_text_encoder_lora(pipe.encoders["clip_g"], sd3["files"]["diffusers"], "clip_g", "sd3", name="g")
    unmerged = pipe.encode_prompt(PROMPTS)
    assert close(unmerged, sd3["clip_oracle"])
    with lora_enabled(clip, False):
        assert torch.equal(pipe.encode_prompt(PROMPTS)[0][..., :32], base[0][..., :32])  # CLIP-L's columns
    merge_lora(clip)
    assert close(pipe.encode_prompt(PROMPTS), unmerged)
    assert rel_err(clip.text_model.encoder.layers[0].self_attn.q_proj.weight, w0) > 1e-3
    unmerge_lora(clip)
    assert rel_err(clip.text_model.encoder.layers[0].self_attn.q_proj.weight, w0) <= 1e-6
    assert close(pipe.encode_prompt(PROMPTS), unmerged)


def test_missing_encoder_is_named(sd3, tmp_path):
    _, folder = built("sd3-no-t5")
    pipe = load_pipeline(folder, max_sequence_length=T5_LEN)
    with pytest.raises(CheckpointError, match=r"LoRA key\(s\) for the t5 text encoder, which this pipeline does not"
                                               r" have, first: 'lora_te3_encoder_block_0"):
        load_pipeline_lora(pipe, sd3["files"]["kohya"])
    assert all(adapter_names(m) == [] for m in (pipe.transformer, pipe.encoders["clip_l"], pipe.encoders["clip_g"]))
    with pytest.warns(UserWarning, match="t5 text encoder.*not applied"):
        load_pipeline_lora(pipe, sd3["files"]["kohya"], strict=False)
    assert adapter_names(pipe.encoders["clip_g"]) == ["kohya"]
    # CLIP-bigG weights (kohya te2) or a third Diffusers encoder in a FLUX file
    flux = load_pipeline(built("flux")[1], max_sequence_length=T5_LEN)
    for key, message in [("lora_te2_text_model_encoder_layers_0_mlp_fc1", "for the clip_g text encoder"),
                         ("text_encoder_3.encoder.block.0.layer.0.SelfAttention.q", "for no text encoder of a flux")]:
        up, down = ("lora_up", "lora_down") if key.startswith("lora_") else ("lora_B", "lora_A")
        save_file({f"{key}.{down}.weight": torch.ones(2, 32), f"{key}.{up}.weight": torch.ones(64, 2)},
                  tmp_path / "x.safetensors")
        with pytest.raises(CheckpointError, match=message):
            load_pipeline_lora(flux, tmp_path / "x.safetensors")


def test_bad_keys_and_shapes(flux, sd3, tmp_path):
    pipe = load_pipeline(flux["folder"], max_sequence_length=T5_LEN)
    sd, meta = read(flux["files"]["diffusers"])
    # a CLIP layer the encoder does not have: an error naming the key, nothing half-loaded
    extra = {k.replace("layers.0.", "layers.9."): v.clone() for k, v in sd.items()
             if k.startswith("text_encoder.encoder.layers.0.")}
    save_file(sd | extra, tmp_path / "deep.safetensors", meta)
    with pytest.raises(CheckpointError, match=r"match no layer of the clip_l text encoder.*'text_encoder\.encoder\."
                                               r"layers\.9\..*pass strict=False"):
        load_pipeline_lora(pipe, tmp_path / "deep.safetensors")
    assert adapter_names(pipe.transformer) == adapter_names(pipe.encoders["clip_l"]) == []  # rolled back
    with pytest.warns(UserWarning, match=r"match nothing and are not applied.*layers\.9\."):
        load_pipeline_lora(pipe, tmp_path / "deep.safetensors", strict=False)
    assert close(pipe.encode_prompt(PROMPTS), flux["diffusers"])
    with pytest.raises(ValueError, match="already has a LoRA adapter 'deep'"):
        load_pipeline_lora(pipe, tmp_path / "deep.safetensors")
    # the transformer alone warns that the text-encoder part needs the pipeline loader
    with pytest.warns(UserWarning, match="text-encoder LoRA key.*load_pipeline_lora"):
        convert.load_lora(load_pipeline(flux["folder"]).transformer, flux["files"]["diffusers"])

    # SD3's CLIP-bigG LoRA (width 48) as CLIP-L's (width 32): shapes are checked
    clip_l = load_pipeline(sd3["folder"], max_sequence_length=T5_LEN).encoders["clip_l"]
    g_as_l = {k.replace("lora_te2_", "lora_te1_"): v for k, v in read(sd3["files"]["kohya"])[0].items()
              if k.startswith("lora_te2_")}
    save_file(g_as_l, tmp_path / "g_as_l.safetensors")
    with pytest.raises(CheckpointError, match=r"has down \[\d, 48\].*of the clip_l text encoder takes 32 inputs"):
        load_text_encoder_lora(clip_l, tmp_path / "g_as_l.safetensors", "clip_l", "sd3")
    with pytest.raises(CheckpointError, match="no t5 text-encoder LoRA weights"):
        load_text_encoder_lora(clip_l, sd3["files"]["diffusers"], "t5", "sd3")
    with pytest.raises(ValueError, match="role 'clip_x'"):
        load_text_encoder_lora(clip_l, sd3["files"]["diffusers"], "clip_x", "sd3")
    assert adapter_names(clip_l) == []
