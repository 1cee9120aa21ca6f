"""Tiny training fixtures: a generated image-caption folder (with one corrupt file), a tiny FLUX file,
stand-in encoders (fixed random maps, no pipeline), and the worker of the 2-process test."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from builders import TINY_FLUX, flux_state
from PIL import Image
from safetensors.torch import save_file

import convert
from sampling.offload import blocks_of
from training import Encoders, TrainConfig, train

CORRUPT = "broken.png"


def write_dataset(folder: Path, n: int = 2, size: tuple[int, int] = (16, 16), seed: int = 0) -> Path:
    """n smooth random RGB images `i.png` with captions `i.txt`, plus a captioned file that is not an image."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    w, h = size
    for i in range(n):
        low = torch.rand(3, 4, 4, generator=g)
        pixels = F.interpolate(low[None], size=(h, w), mode="bilinear", align_corners=True)[0]  # (3, h, w)
        arr = (pixels.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"pattern number {i} in color")
    (folder / CORRUPT).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / CORRUPT).with_suffix(".txt").write_text("a broken file")
    return folder


def write_tiny_flux(path: Path) -> Path:
    save_file(flux_state(TINY_FLUX), str(path))
    return path


def standin_encoders(context_dim: int = TINY_FLUX.context_in_dim, pooled_dim: int = TINY_FLUX.vec_in_dim,
                     seq: int = 6, seed: int = 0) -> Encoders:
    """Captions -> fixed random byte embeddings; images -> pixel-unshuffle and a fixed 12 -> 16 map (2x down)."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(256, context_dim, generator=g)
    to_pooled = torch.randn(context_dim, pooled_dim, generator=g) / 8
    to_latent = torch.randn(16, 12, generator=g) / 3

    def prompts(captions: list[str]):
        ids = torch.tensor([list(c.encode()[:seq].ljust(seq, b" ")) for c in captions])  # (B, seq)
        context = table[ids]  # (B, seq, D)
        return context, context.mean(1) @ to_pooled

    def images(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,dc->bdhw", F.pixel_unshuffle(x, 2), to_latent)  # (B, 16, H/2, W/2)

    return Encoders(prompts, images)


def tiny_config(model: Path, data: Path, output: Path, **kw) -> TrainConfig:
    """CPU, float32, no autocast: runs that can be compared exactly."""
    base = dict(model=str(model), data=str(data), output=str(output), resolution=16, rank=4, alpha=8.0,
                lr=2e-3, steps=4, batch_size=2, dtype="float32", mixed_precision="no", device="cpu", progress=False)
    return TrainConfig(**{**base, **kw})


def ddp_worker(rank: int, port: int, config: dict) -> None:
    """One of the processes of the 2-process test (gloo, 127.0.0.1); the cache is already written."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        train(TrainConfig(**config))
    finally:
        dist.destroy_process_group()


def ddp_stop_worker(rank: int, port: int, config: dict, signal_at: dict[int, int]) -> None:
    """A process of the 2-process stop test: `stop_at_step_2` in a gloo group (127.0.0.1)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        stop_at_step_2(rank, config, signal_at)
    finally:
        dist.destroy_process_group()


def stop_at_step_2(rank: int, config: dict, signal_at: dict[int, int]) -> None:
    """Train `config` in this process of a process group, sending itself SIGTERM at its block forward number
    `signal_at[rank]` (none if absent): every process must end interrupted at step 2."""
    model = convert.load_transformer(config["model"])
    count = [0]

    def on_forward(module, args, output):
        count[0] += 1
        if count[0] == signal_at.get(rank):
            os.kill(os.getpid(), signal.SIGTERM)

    for block in blocks_of(model):
        block.register_forward_hook(on_forward)
    result = train(TrainConfig(**config), model=model)
    assert result.interrupted and result.step == 2, (rank, result.step)


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
