"""The attention probe: how much attention image queries pay to text keys, per layer and per model call.

This is the measure behind TACA's motivation (arXiv 2506.07986, the suppression of cross-modal
attention): in the joint softmax over `[text | image]` keys, an image query's weights on the text
keys sum to its *text mass*; with 4096 image keys against 512 text keys that mass tends to be small.

The mass is computed without the `[L, L]` attention matrix: a second fused SDPA call on the image
queries whose values are an indicator (1 for text keys, 0 for image keys) outputs, for each query,
exactly `sum_{j text} softmax(logits)[i, j]`. The keys get the same temperature as the model's own
call (mmdit/attention.py), so with TACA the probe measures the attention actually used.

`probe_attention(model)` watches every joint attention of one forward or of a whole sampling run
from outside: a forward pre-hook on each block's `JointAttention` (a module without weights that
calls `mmdit.attention.attention`) sees its q, k, n_txt and temperature. It records, per model call
(`step`) and per block (`double_blocks.3`, `single_blocks.10`, `joint_blocks.5`), the mean text mass
over image queries, per sample and head. Attention without text keys (SD3.5 Medium's image-only
`attn2`, which calls the function directly) is not recorded.
Deviation: the mass is computed in the attention's dtype (bf16 on GPU: about 3 significant digits).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import JointAttention, Temperature, as_temperature_matrix, key_scales


@torch.no_grad()
def text_attention_mass(q: Tensor, k: Tensor, n_txt: int, temperature: Temperature = None) -> Tensor:
    """Per image query, the attention weight summed over the text keys. q, k: (B, H, L, D) -> (B, H, L - n_txt)."""
    T = as_temperature_matrix(temperature, k.device)
    if T is not None:  # the keys image queries see in the model's own call (row 1 of T)
        k = k * key_scales(T.to(k.dtype), n_txt, k.shape[2])[:, :, 1, :, None]
    indicator = torch.zeros_like(k)  # values as wide as the keys, so every fused kernel applies
    indicator[:, :, :n_txt] = 1
    return F.scaled_dot_product_attention(q[:, :, n_txt:], k, indicator)[..., 0].float()


@dataclass
class Record:
    """One joint attention of one model call."""

    step: int  # index of the model call since the probe started (one per sampler step)
    t: float  # the noise level of that call (its first sample's)
    layer: str  # the block: "double_blocks.3", "single_blocks.10", "joint_blocks.5"
    n_txt: int
    n_img: int
    text_mass: Tensor  # (B, H): mean over image queries of their attention mass on text keys


@dataclass
class AttentionProbe:
    """What `probe_attention` collects; its hooks keep `step` and `t` current while the model runs."""

    records: list[Record] = field(default_factory=list)
    step: int = -1  # the last model call (so step + 1 calls so far)
    t: float = float("nan")

    def observe(self, layer: str, q: Tensor, k: Tensor, n_txt: int, temperature: Temperature = None) -> None:
        """Record one attention call of block `layer`; q, k: (B, H, L, D), text first."""
        n_img = q.shape[2] - n_txt
        if n_txt == 0 or n_img == 0:  # no cross-modal attention in this call
            return
        mass = text_attention_mass(q, k, n_txt, temperature).mean(-1).cpu()  # (B, H)
        self.records.append(Record(self.step, self.t, layer, n_txt, n_img, mass))

    def layers(self) -> list[str]:
        """Block names in the order the model runs them."""
        return list(dict.fromkeys(r.layer for r in self.records))

    def table(self, sample: int = -1) -> Tensor:
        """(steps, layers) text mass of one sample, mean over heads; NaN where nothing was recorded.

        The default sample is the last one: with classifier-free guidance the batch is [negative | positive].
        """
        layers = self.layers()
        out = torch.full((self.step + 1, len(layers)), float("nan"))
        for r in self.records:
            out[r.step, layers.index(r.layer)] = r.text_mass[sample].mean()
        return out


def joint_attentions(model: nn.Module) -> Iterator[tuple[str, JointAttention]]:
    """(block name, its JointAttention) for every block: `double_blocks.3`, `single_blocks.10`, `joint_blocks.5`."""
    for name, module in model.named_modules():
        if isinstance(module, JointAttention):
            yield name.rpartition(".")[0], module


@contextmanager
def probe_attention(model: nn.Module) -> Iterator[AttentionProbe]:
    """`with probe_attention(model) as probe: ...` records every joint attention the model runs inside the block.

    The hooks (one on the model for `step` and `t`, one per block's `JointAttention`) are removed on exit."""
    probe = AttentionProbe()

    def on_call(module, args, kwargs):
        t = kwargs["t"] if "t" in kwargs else args[1]
        probe.step += 1
        probe.t = float(t.flatten()[0])

    def observer(layer: str):
        def hook(module, args):  # args: (q, k, v, n_txt[, temperature]), as the block passes them
            q, k, _, *rest = args
            probe.observe(layer, q, k, *rest)

        return hook

    handles = [model.register_forward_pre_hook(on_call, with_kwargs=True)]
    handles += [module.register_forward_pre_hook(observer(layer)) for layer, module in joint_attentions(model)]
    try:
        yield probe
    finally:
        for h in handles:
            h.remove()
