"""`mmdit train` on a FLUX.2 base (BFL recommends the undistilled [klein] for LoRA training), on CPU.

Checked: a tiny [klein]-like BFL file trains a TACA LoRA with stand-in encoders (32-channel latents, no pooled
vector); a run cut by Ctrl-C and resumed repeats the uninterrupted one exactly; the saved LoRA gives the trained
model's outputs in ours and in Diffusers' `Flux2Transformer2DModel`; the objective with TACA equals Diffusers'
model with explicit TACA logits; a [dev]-like base gets its distilled guidance. On a tiny Diffusers
`Flux2KleinPipeline` folder, the cache holds what Diffusers' FLUX.2 [klein] LoRA training script
(`examples/dreambooth/train_dreambooth_lora_flux2_klein.py`) trains on: the autoencoder's mode, patchified and
normalized by its batch-norm statistics, and the pipeline's prompt embeddings; the LoRA file loads with the
pipeline's own `load_lora_weights`; a full fine-tune writes a model folder that loads as a FLUX.2 pipeline.
"""

import dataclasses
import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from builders import rel_err
from diffusers import Flux2KleinPipeline
from flux2_builders import klein_pipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_flux2 import bfl_state, diffusers_forward, explicit_taca_in_diffusers, reference
from training_builders import config_dict, standin_encoders, tiny_config, write_dataset

import convert
from mmdit.flux2 import PRESETS
from sampling import load_pipeline
from training import Encoders, TrainConfig, train
from training.checkpoint import list_checkpoints
from training.data import load_image, scan
from training.loss import batch_temperature, flow_matching_loss

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(context_in_dim=48, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(8, 8, 8, 8))
KLEIN = dataclasses.replace(PRESETS["flux2-klein-4b"], **SMALL)
DEV = dataclasses.replace(PRESETS["flux2-dev"], **SMALL)


def flux2_encoders(context_dim: int = 48, seed: int = 0) -> Encoders:
    """Captions -> FLUX.1's stand-in byte embeddings, no pooled vector; images -> pixel-unshuffle and a fixed
    12 -> 32 map (2x down, 32 channels as FLUX.2's latents)."""
    text = standin_encoders(context_dim=context_dim, pooled_dim=1, seed=seed)
    to_latent = torch.randn(32, 12, generator=torch.Generator().manual_seed(seed + 1)) / 3

    def images(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,dc->bdhw", F.pixel_unshuffle(x, 2), to_latent)  # (B, 32, H/2, W/2)

    return Encoders(lambda captions: (text.encode_prompts(captions)[0], None), images)


def write_base(p, path):
    sd = bfl_state(p, seed=6)
    save_file(sd, str(path))
    return sd


def ckpt_names(output) -> list[str]:
    return [p.name for p in list_checkpoints(output / "checkpoints")]


def test_klein_trains_resumes_and_loads_in_diffusers(tmp_path, monkeypatch):
    sd = write_base(KLEIN, tmp_path / "klein.safetensors")
    data = write_dataset(tmp_path / "data", n=3)
    kw = dict(steps=4, batch_size=2, grad_accum=2, taca_gamma=1.25, t_min=0.9, checkpoint_every=2,
              targets=["attn", "mlp"], cache=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the dataset's corrupt file
        full = train(tiny_config(tmp_path / "klein.safetensors", data, tmp_path / "full", **kw),
                     encoders=flux2_encoders())
    assert len(full.losses) == 4 and all(0 < v < 100 for v in full.losses)
    x0, context, pooled = full.data.load([0, 1])
    assert x0.shape == (2, 32, 8, 8) and context.shape == (2, 6, 48) and pooled is None

    def ctrl_c(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    cfg = tiny_config(tmp_path / "klein.safetensors", data, tmp_path / "cut", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = train(cfg, on_step=ctrl_c)  # the cache is there: no encoders needed
        assert first.interrupted and ckpt_names(tmp_path / "cut") == ["step-0000002.safetensors"]
        second = train(TrainConfig(**{**config_dict(cfg), "resume": "latest"}))
    assert first.losses + second.losses == full.losses  # exactly
    a, b = load_file(tmp_path / "full" / "lora.safetensors"), load_file(tmp_path / "cut" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lora = tmp_path / "full" / "lora.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert (meta["mmdit.family"], meta["taca.gamma"], meta["train.steps"]) == ("flux2", "1.25", "4")

    # the trained model, ours with the file, Diffusers with the file
    g = torch.Generator().manual_seed(5)
    x = dict(x=torch.randn(x0.shape, generator=g), t=torch.tensor([0.95, 0.5]), context=context)
    ref = reference(KLEIN, sd)
    sd_lora, metadata = Flux2KleinPipeline.lora_state_dict(str(lora), return_lora_metadata=True)
    Flux2KleinPipeline.load_lora_into_transformer(sd_lora, transformer=ref, adapter_name="taca", metadata=metadata)
    with torch.no_grad():
        trained = full.model(**x)
        mine = convert.load_transformer(tmp_path / "klein.safetensors")
        plain = mine(**x)
        convert.load_lora(mine, lora)
        assert rel_err(mine(**x), trained) <= 1e-4
        assert rel_err(plain, trained) > 1e-4  # the LoRA matters
        assert rel_err(diffusers_forward(ref, **x), trained) <= 1e-4

        # the objective with TACA (every sample at t >= t_min) equals Diffusers' with explicit TACA logits
        noise = torch.randn(x0.shape, generator=g)
        t = torch.tensor([0.97, 0.93])
        temperature = batch_temperature(lambda s: 1.25 if s >= 0.9 else None, t)
        loss = flow_matching_loss(full.model, x0, noise, t, context, None, None, temperature)
        explicit_taca_in_diffusers(monkeypatch, 1.25, n_txt=context.shape[1])
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = diffusers_forward(ref, x_t, t, context)
        assert rel_err(loss, F.mse_loss(v, noise - x0)) <= 1e-4
        plain_loss = flow_matching_loss(full.model, x0, noise, t, context, None, None, None)
        assert rel_err(plain_loss, loss) > 1e-6  # TACA changed the forward


def test_dev_base_gets_distilled_guidance(tmp_path):
    write_base(DEV, tmp_path / "dev.safetensors")
    data = write_dataset(tmp_path / "data", n=2)
    seen = []

    def losses(guidance):
        cfg = tiny_config(tmp_path / "dev.safetensors", data, tmp_path / f"g{guidance}", steps=1, guidance=guidance,
                          cache=str(tmp_path / "cache"))
        model = convert.load_transformer(tmp_path / "dev.safetensors", dtype=torch.float32)
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["guidance"]), with_kwargs=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return train(cfg, model=model, encoders=flux2_encoders()).losses

    assert losses(3.5) != losses(1.0)
    assert [g.tolist() for g in seen] == [[3.5, 3.5], [1.0, 1.0]]


def test_klein_folder_caches_what_diffusers_trains_on(tmp_path):
    pipe, folder, _ = klein_pipeline(tmp_path)
    data = write_dataset(tmp_path / "data", n=1, size=(64, 64))
    kw = dict(resolution=64, batch_size=1, cache=str(tmp_path / "cache"))
    cfg = tiny_config(folder, data, tmp_path / "out", steps=2, targets=["attn", "mod"], **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg)  # the encoders of our FLUX.2 pipeline, loaded from the folder
    x0, context, pooled = result.data.load([0])
    item = scan(data)[0]
    pixels = load_image(item.image, 64, False)[None]  # (1, 3, 64, 64)
    with torch.no_grad():
        expected = pipe._encode_vae_image(pixels, generator=None)  # (1, 128, 4, 4): mode, patchified, normalized
        embeds = pipe.encode_prompt([item.caption])[0]
    assert rel_err(Flux2KleinPipeline._patchify_latents(x0), expected) <= 1e-4
    assert pooled is None and rel_err(context, embeds) <= 1e-4

    pipe.load_lora_weights(str(tmp_path / "out" / "lora.safetensors"), adapter_name="taca")
    g = torch.Generator().manual_seed(1)
    x = dict(x=torch.randn(x0.shape, generator=g), t=torch.tensor([0.8]), context=context)
    with torch.no_grad():
        assert rel_err(diffusers_forward(pipe.transformer, **x), result.model(**x)) <= 1e-4

    # train="full": OUTPUT/model is the base folder with the trained transformer, and samples as one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = train(tiny_config(folder, data, tmp_path / "full", steps=1, train="full", **kw))
    again = load_pipeline(tmp_path / "full" / "model")
    assert again.family == "flux2" and again.variant == "flux2-klein-base-like (custom size)"
    trained = full.model.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in again.transformer.state_dict().items())
