"""Multi-resolution training (`native_size`: each image at its own size, one size per batch) and caption
dropout (`caption_dropout`: the empty caption's embeddings in place of some captions, for true CFG): the
loss of a step equals the flow-matching loss computed by hand from the same draws."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from training_builders import standin_encoders, tiny_config, write_dataset, write_tiny_flux

import convert
from sampling import TacaSchedule
from training import TrainConfig, train
from training.data import BatchSampler, generator, load_image, target_size
from training.loss import batch_temperature, flow_matching_loss, sample_t


def test_native_size_keeps_each_size_cropped_to_multiples_of_16(tmp_path):
    assert target_size(40, 24, 1024, buckets=False, native=True) == (16, 32)  # (H, W)
    assert target_size(64, 32, 16, buckets=True, native=True) == (32, 64)  # resolution and buckets unused
    with pytest.raises(ValueError, match="smaller than 16 px"):
        target_size(40, 12, 32, buckets=False, native=True)
    image = torch.arange(24 * 40 * 3, dtype=torch.uint8).view(24, 40, 3)
    Image.fromarray(image.numpy()).save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png", 32, buckets=False, native=True)  # center crop, no resize
    assert torch.equal(x, image[4:20, 4:36].permute(2, 0, 1).float() / 127.5 - 1)
    with pytest.raises(ValueError, match="caption_dropout must lie in"):
        TrainConfig(model="m", data="d", output="o", caption_dropout=1.0)


def test_step_losses_with_native_sizes_and_caption_dropout(tmp_path):
    base = write_tiny_flux(tmp_path / "tiny-flux.safetensors")
    data = tmp_path / "data"
    write_dataset(data / "small", n=3, size=(16, 16), seed=1)
    write_dataset(data / "wide", n=3, size=(40, 16), seed=2)  # cropped to 32x16
    Image.new("RGB", (12, 12)).save(data / "tiny.png")  # under 16 px: skipped, named
    (data / "tiny.txt").write_text("too small")
    encoders = standin_encoders()
    cfg = tiny_config(base, data, tmp_path / "out", steps=6, native_size=True, caption_dropout=0.5, lr=0.0)
    with pytest.warns(UserWarning) as warned:
        result = train(cfg, encoders=encoders)
    assert any("skipping unreadable image" in str(w.message) and "tiny.png: 12x12 is smaller than 16 px" in str(w.message)
               for w in warned)
    assert sorted(set(result.data.sizes)) == [(8, 8), (8, 16)]  # latents (h, w): 2x down
    empty_context, empty_pooled = encoders.encode_prompts([""])
    model = convert.load_transformer(base)  # lr 0: every step sees the initial weights (the LoRA adds B A = 0)
    sampler, dropped_any, kept_any = BatchSampler(result.data.sizes, 2, cfg.seed), False, False
    for step in range(cfg.steps):
        batch = sampler(step)
        assert len({result.data.sizes[i] for i in batch}) == 1  # one size per batch
        x0, context, pooled = result.data.load(batch)
        gens = [generator(cfg.seed, "sample", step, j) for j in range(2)]
        t = torch.cat([sample_t(cfg.timesteps, cfg.t_min, g) for g in gens])
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens])
        for j in range(2):
            if torch.rand(1, generator=generator(cfg.seed, "caption", step, j)).item() < cfg.caption_dropout:
                context[j], pooled[j], dropped_any = empty_context[0], empty_pooled[0], True
            else:
                kept_any = True
        with torch.no_grad():
            temperature = batch_temperature(TacaSchedule(cfg.taca_gamma, cfg.t_min), t)
            expected = flow_matching_loss(model, x0, noise, t, context, pooled, torch.full((2,), cfg.guidance),
                                          temperature)
        assert result.losses[step] == pytest.approx(expected.item(), rel=1e-5)
    assert dropped_any and kept_any  # both kinds of rows were checked
