"""The computed memory model (benchmarks/memory_cost.py): the live-bytes tracker, and the pipeline table at tiny size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks import memory_cost as mc

META = torch.device("meta")
N = 1000 * 4  # bytes of torch.empty(1000) in fp32


def test_freed_tensors_leave_the_count():
    def fn():
        a = torch.empty(1000, device=META)  # N
        b = a * 2  # 2N
        c = b + 1  # 3N: the peak
        del b  # 2N
        d = c * 3  # 3N again
        return d  # a and c die with the frame: N left

    assert mc.live_bytes_peak(fn) == mc.MemoryPeak(peak_bytes=3 * N, end_bytes=N)


def test_views_and_in_place_ops_add_nothing():
    def fn():
        a = torch.empty(1000, device=META)
        v = a.view(10, 100)
        v.add_(1)
        a.mul_(2)
        parts = a.split(250)
        return v.t(), parts[0][:10]  # views keep a's storage alive after `a` dies

    assert mc.live_bytes_peak(fn) == mc.MemoryPeak(N, N)


def test_tensors_made_before_the_call_count_zero():
    w = torch.empty(1000, device=META)
    assert mc.live_bytes_peak(lambda: (w.add_(1), w.view(10, 100)[:2], w.detach())) == mc.MemoryPeak(0, 0)
    assert mc.live_bytes_peak(lambda: w * 2) == mc.MemoryPeak(N, N)


def test_linear_counts_its_output_once():
    """F.linear on a 3-d input is view, mm, _unsafe_view: one new storage of the output's size."""
    x, w = torch.empty(2, 3, 4, device=META), torch.empty(5, 4, device=META)
    out = 2 * 3 * 5 * 4
    assert mc.live_bytes_peak(lambda: F.linear(x, w)) == mc.MemoryPeak(out, out)
    assert mc.live_bytes_peak(lambda: F.linear(x * 1, w)) == mc.MemoryPeak(x.nbytes + out, out)


def test_attention_is_flash_sized():
    L, D = 4096, 64
    q = torch.empty(1, 8, L, D, device=META, dtype=torch.bfloat16)
    peak = mc.live_bytes_peak(lambda: F.scaled_dot_product_attention(q, q, q))
    assert peak == mc.MemoryPeak(q.nbytes, q.nbytes)  # the output only: no L x L logits
    assert peak.peak_bytes < L * L * 2


def test_rms_norm_is_fused():
    x = torch.empty(4096, 3072, device=META, dtype=torch.bfloat16)
    assert mc.live_bytes_peak(lambda: F.rms_norm(x, (3072,))) == mc.MemoryPeak(x.nbytes, x.nbytes)


def test_tiny_pipeline_table(tmp_path):
    out = tmp_path / "R.md"
    parts = mc.main(["--tiny", "--out", str(out)])
    text = out.read_text()
    assert "## Step time (GPU)" in text and f"### {mc.TITLE}" in text
    assert "--tiny --out" in text and "| stream-encoders |" in text

    assert [p.name for p in parts] == ["t5", "clip_l", "transformer", "autoencoder"]
    for p in parts:
        tensors = [*p.module.parameters(), *p.module.buffers()]
        assert p.weights == sum(t.numel() * t.element_size() for t in tensors) > 0
        assert 0 < p.streamed <= p.weights
        assert 0 < p.activations.end_bytes <= p.activations.peak_bytes

    peak = {mode: mc.mode_peak(parts, mode) for mode in mc.MODES}
    assert peak["stream"] <= peak["model"] <= peak[None]
    assert peak["stream-encoders"] <= peak["encoders"] <= peak[None]
    everything = sum(p.weights for p in parts) + max(p.activations.peak_bytes for p in parts)
    assert peak[None] == everything

    mc.main(["--tiny", "--out", str(out)])  # a second run replaces its block
    assert out.read_text().count(f"### {mc.TITLE}") == 1
