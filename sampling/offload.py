"""Running a part of a pipeline on the GPU while its weights live on the CPU.

A model's weights do not change while it samples, so nothing needs to come back: `borrowed` puts a
device copy of every weight in place of the CPU tensor for the duration and puts the CPU tensor back
after (half the traffic of `module.to(device)` then `module.to("cpu")`). `streamed` does the same one
block at a time, so the device holds the weights outside the blocks and one block: for T5-XXL in
bf16, its 0.26 GB embedding and one 0.39 GB block, against 9.5 GB for the whole encoder. What a
run writes into a borrowed weight is lost with the copy: merge a LoRA before sampling, not during.

Offload modes of a pipeline (`OFFLOAD`), FLUX.1-dev bf16 at 1024x1024 for scale:
- None: every part on the device (transformer 23.8 GB + T5 9.5 GB + CLIP 0.25 GB + VAE 0.17 GB).
- "encoders": the text encoders borrowed whole while they encode; peak about transformer + T5.
- "stream-encoders": the text encoders streamed block by block; peak about transformer + one block.
- "model": every part borrowed whole for its phase (encode, denoise, decode); peak about the
  largest part, at the cost of copying it in once per `generate` call.
- "stream": every part streamed block by block, in every step: the least memory, the most traffic.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

OFFLOAD = (None, "encoders", "stream-encoders", "model", "stream")
EVERY_PART = ("model", "stream")  # the modes that keep the transformer and autoencoder off the device too


def check_offload(mode: str | None) -> str | None:
    if mode not in OFFLOAD:
        raise ValueError(f"offload must be one of {', '.join(map(str, OFFLOAD))}; got {mode!r}")
    return mode


def _own_tensors(module: nn.Module) -> list[tuple[dict, str]]:
    """(dict, name) slots of the module's own parameters and buffers (not its children's)."""
    return [(d, k) for d in (module._parameters, module._buffers) for k, t in d.items() if t is not None]


def _swap_in(slots: list[tuple[dict, str]], device: torch.device) -> list[Tensor]:
    """Put device copies in the slots; returns the tensors they held, to put back."""
    kept = []
    for d, k in slots:
        t = d[k]
        kept.append(t)
        copy = t.detach().to(device, non_blocking=True)  # asynchronous from pinned memory (see `pin`)
        d[k] = nn.Parameter(copy, t.requires_grad) if isinstance(t, nn.Parameter) else copy
    return kept


def _swap_out(slots: list[tuple[dict, str]], kept: list[Tensor]) -> None:
    for (d, k), t in zip(slots, kept):
        d[k] = t


@contextmanager
def borrowed(module: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """`module` with a copy of every weight on `device` inside the block, its own tensors again after."""
    device = torch.device(device)
    slots = [s for m in module.modules() for s in _own_tensors(m)]
    kept = _swap_in(slots, device)
    try:
        yield module
    finally:
        _swap_out(slots, kept)


def blocks_of(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks: the members of the outermost `nn.ModuleList`s (T5 and CLIP layers, FLUX
    double and single blocks, SD3 joint blocks, the autoencoder's resolution levels)."""
    out = []
    for child in module.children():
        out.extend(child if isinstance(child, nn.ModuleList) else blocks_of(child))
    return out


@contextmanager
def streamed(module: nn.Module, device: str | torch.device) -> Iterator[nn.Module]:
    """`module` with each block's weights on `device` only while that block runs (a forward pre-hook
    borrows them, a forward hook gives them back); the weights outside the blocks (embeddings, final
    norms and projections) are borrowed for the whole call. A block must not be given weights of
    another block, true of the models in mmdit/."""
    device = torch.device(device)
    blocks = blocks_of(module)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    rest = [s for m in module.modules() if id(m) not in in_blocks for s in _own_tensors(m)]
    with ExitStack() as stack:
        for b in blocks:
            slots = [s for m in b.modules() for s in _own_tensors(m)]
            kept: list[list[Tensor]] = []  # a stack: a block may run again inside its own call

            def enter(_m, _args, slots=slots, kept=kept):
                kept.append(_swap_in(slots, device))

            def leave(_m, _args, _out, slots=slots, kept=kept):
                _swap_out(slots, kept.pop())

            stack.enter_context(b.register_forward_pre_hook(enter))
            stack.enter_context(b.register_forward_hook(leave, always_call=True))
        kept_rest = _swap_in(rest, device)
        stack.callback(_swap_out, rest, kept_rest)
        yield module


def pin(module: nn.Module) -> nn.Module:
    """Page-locked copies of the module's CPU weights, so that copies to a CUDA device are asynchronous
    and about twice as fast. A no-op without CUDA. Costs a copy of the weights in host memory."""
    if not torch.cuda.is_available():
        return module
    for m in module.modules():
        for d, k in _own_tensors(m):
            t = d[k]
            if t.device.type != "cpu" or t.is_pinned():
                continue
            if isinstance(t, nn.Parameter):
                t.data = t.data.pin_memory()
            else:
                d[k] = t.pin_memory()
    return module
