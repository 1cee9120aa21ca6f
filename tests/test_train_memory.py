"""The computed training memory (benchmarks/train_memory.py): the fused kernels' stand-ins with a backward,
the formulas of the modes, and the parts of the tiny FLUX layout against sizes counted here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import train_memory as tm
from mmdit.lora import lora_parameters
from sampling.offload import blocks_of

META = torch.device("meta")


def test_flash_attention_keeps_no_logits_in_the_backward():
    B, H, L, D = 1, 2, 1024, 64
    q, k, v = (torch.empty(B, H, L, D, device=META, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def step():
        F.scaled_dot_product_attention(q, k, v).sum().backward()

    peak = tm.tracked_peak(step)
    kept = q.nbytes + B * H * L * 4  # the output, the float32 log-sum-exp
    grads = 3 * q.nbytes  # dq, dk, dv, kept in .grad
    assert kept + grads <= peak <= kept + grads + 64  # + the loss and its gradient, a few bytes
    assert peak < B * H * L * L * 2  # no L x L logits
    assert F.scaled_dot_product_attention is not tm.FlashAttention.apply  # put back


def test_fused_rms_norm_keeps_its_input_and_one_scale_a_row():
    x = torch.empty(3, 5, 8, device=META, dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(8, device=META, dtype=torch.bfloat16, requires_grad=True)
    peak = tm.tracked_peak(lambda: F.rms_norm(x, (8,), w, 1e-6).sum().backward())
    backward = 3 * 5 * 4 + x.nbytes + w.nbytes  # float32 scales (kept), dx, dw; the output died with the sum
    assert backward <= peak <= backward + 64


def test_mode_formulas():
    s = tm.Sizes(weights=100, state=20, gradients=10, adamw_temporaries=10, outside_blocks=3, largest_block=4,
                 largest_block_trained=0, step_peak={False: 50, True: 15}, activations={False: 48, True: 13})
    assert s.one_gpu(False) == 100 + 20 + 50 and s.one_gpu(True) == 100 + 20 + 20  # the AdamW step's peak wins
    assert s.fsdp(2, True) == 60 + 13 + 5 + 3 + 2 * 4
    assert s.fsdp(4, False) == 30 + 48 + 2 + 3 + 2 * 4


def test_tiny_flux_parts():
    params = tm.MODELS["FLUX.1-dev"].tiny()
    lora = tm.sizes(params, "lora", tiny=True)
    model = tm.setup(params, "lora", False, tiny=True).model
    adapter = list(lora_parameters(model))
    n_lora = sum(p.numel() for p in adapter)
    base = sum(p.numel() for p in model.parameters()) - n_lora
    buffers = sum(b.nbytes for b in model.buffers())
    assert lora.weights == 2 * base + 4 * n_lora + buffers  # bf16 base, float32 LoRA
    assert (lora.state, lora.gradients) == (8 * n_lora, 4 * n_lora)
    in_blocks = sum(p.numel() for b in blocks_of(model) for p in b.parameters())
    assert lora.outside_blocks == 2 * (base + n_lora - in_blocks)  # bf16 (the LoRA is in the blocks)
    assert 0 < lora.activations[True] < lora.activations[False]  # checkpointing keeps the blocks' inputs only
    assert lora.fsdp(8, True) < lora.fsdp(2, True)  # the shards shrink with N
