"""Offloading (sampling/offload.py): what is on the device at every moment, and that nothing changes.

The device in the residency tests is `meta`: a copy there has no values, so a run on it shows exactly
which weights were on the device when each module ran, the way a GPU would, without one.
"""

from dataclasses import replace

import pytest
import torch
from torch import nn

import mmdit
from mmdit.autoencoder import AutoEncoder
from mmdit.autoencoder import preset as ae_preset
from mmdit.clip import CLIP_PRESETS, CLIPTextEncoder
from mmdit.flux import PRESETS
from mmdit.t5 import T5_PRESETS, T5Encoder
from sampling.offload import OFFLOAD, blocks_of, borrowed, check_offload, streamed
from sampling.pipeline import FluxPipeline

META = torch.device("meta")


def tiny_parts(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    params = replace(PRESETS["flux-dev"], hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2,
                     context_in_dim=32, vec_in_dim=24, axes_dim=(8, 12, 12))
    t5 = replace(T5_PRESETS["t5-v1.1-xxl"], vocab_size=64, d_model=32, num_heads=2, d_kv=8, d_ff=48, num_layers=3)
    clip = replace(CLIP_PRESETS["clip-l"], vocab_size=64, width=24, layers=2, heads=2, mlp_dim=48, max_positions=8)
    return {
        "transformer": mmdit.build_model(params).eval(),
        "t5": T5Encoder(t5).eval(),
        "clip_l": CLIPTextEncoder(clip).eval(),
        "ae": AutoEncoder(ae_preset("flux", ch=32, ch_mult=(1, 1), num_res_blocks=1)).eval(),
    }


class Tokens:
    def __init__(self, length: int):
        self.length = length

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.arange(len(prompts) * self.length).reshape(len(prompts), self.length) % 63
        ids[:, -1] = 63  # the highest id last: CLIP pools there
        return ids


def pipeline(parts: dict[str, nn.Module], offload, device) -> FluxPipeline:
    tokenizers = {"t5": Tokens(6), "clip_l": Tokens(8)}
    encoders = {"t5": parts["t5"], "clip_l": parts["clip_l"]}
    return FluxPipeline(parts["transformer"], parts["ae"], encoders, tokenizers, offload=offload, device=device)


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def weights(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def storages(module: nn.Module) -> list[int]:
    return [t.untyped_storage().data_ptr() for t in weights(module)]


def record_device_bytes(parts: dict[str, nn.Module], seen: list[int]):
    """Pre-hooks on every module of every part: the bytes of all weights on the meta device at that moment."""

    def hook(_m, _args):
        seen.append(nbytes(t for p in parts.values() for t in weights(p) if t.device == META))

    return [m.register_forward_pre_hook(hook) for p in parts.values() for m in p.modules()]


def streamed_peak(module: nn.Module) -> int:
    """The weights outside the blocks plus the largest block."""
    blocks = blocks_of(module)
    in_blocks = nbytes(t for b in blocks for t in weights(b))
    return nbytes(weights(module)) - in_blocks + max(nbytes(weights(b)) for b in blocks)


@pytest.mark.parametrize("offload", OFFLOAD)
def test_what_is_on_the_device_while_each_module_runs(offload):
    parts = tiny_parts()
    lives_on_cpu = {"t5", "clip_l"} if offload else set()
    if offload in ("model", "stream"):
        lives_on_cpu |= {"transformer", "ae"}
    for name, part in parts.items():
        if name not in lives_on_cpu:
            part.to(META)  # resident on the device
    before = {name: storages(parts[name]) for name in lives_on_cpu}
    pipe = pipeline(parts, offload, META)
    seen: list[int] = []
    handles = record_device_bytes(parts, seen)
    out = pipe.generate(["a cat", "a dog"], height=32, width=48, steps=2, guidance=3.5, seed=0, output="tensor")
    for h in handles:
        h.remove()
    assert out.device == META and out.shape == (2, 3, 32, 48)

    size = {name: nbytes(weights(p)) for name, p in parts.items()}
    resident = sum(size[n] for n in parts if n not in lives_on_cpu)
    expected = {
        None: sum(size.values()),
        "encoders": resident + max(size["t5"], size["clip_l"]),
        "stream-encoders": resident + max(streamed_peak(parts["t5"]), streamed_peak(parts["clip_l"])),
        "model": max(size.values()),
        "stream": max(streamed_peak(p) for p in parts.values()),
    }[offload]
    assert max(seen) == expected
    assert len(seen) > 20  # every module of every part ran
    for name in lives_on_cpu:  # afterwards: the same CPU tensors as before, nothing left on the device
        assert storages(parts[name]) == before[name], name
        assert {t.device.type for t in weights(parts[name])} == {"cpu"}


def test_offload_modes_give_the_same_images():
    parts = tiny_parts(seed=1)
    ref = pipeline(parts, None, "cpu").generate(["a cat"], height=32, width=32, steps=3, seed=3, output="tensor")
    for mode in OFFLOAD[1:]:
        got = pipeline(parts, mode, "cpu").generate(["a cat"], height=32, width=32, steps=3, seed=3, output="tensor")
        assert torch.equal(got, ref), mode


def test_borrowed_gives_the_weights_back_after_an_error():
    t5 = tiny_parts()["t5"]
    before = storages(t5)
    with pytest.raises(RuntimeError, match="inside"), borrowed(t5, META):
        assert {t.device for t in weights(t5)} == {META}
        raise RuntimeError("inside")
    assert storages(t5) == before


def test_streamed_moves_one_block_at_a_time_and_gives_it_back_after_an_error():
    t5 = tiny_parts()["t5"]
    blocks = list(t5.encoder.block)
    assert blocks_of(t5) == blocks  # the outermost ModuleList, not each block's inner one
    on_device = []

    def record(_m, _args):  # which blocks have their weights on the device as a block starts
        on_device.append([i for i, b in enumerate(blocks) if b.layer[1].DenseReluDense.wo.weight.device == META])

    before = storages(t5)
    with streamed(t5, META):
        for b in blocks:  # after streamed's own hooks, so they see what it did
            b.register_forward_pre_hook(record)
        assert t5.shared.weight.device == META and t5.encoder.block[0].layer[0].layer_norm.weight.device.type == "cpu"
        t5(torch.zeros(1, 5, dtype=torch.long, device=META))
        blocks[1].layer[1].register_forward_hook(lambda m, a, o: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            t5(torch.zeros(1, 5, dtype=torch.long, device=META))
    assert on_device[:3] == [[0], [1], [2]] and on_device[3:] == [[0], [1]]
    assert storages(t5) == before and {t.device.type for t in weights(t5)} == {"cpu"}


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="'gpu'"):
        check_offload("gpu")
