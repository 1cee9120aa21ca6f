"""The step-time harness (benchmarks/step_time.py) at tiny size on the CPU, and its cost model (step_cost.py).

What the harness measures must be like with like (ours equals Diffusers in float32 on the benchmark inputs,
with and without TACA), its table complete, its RESULTS.md section written without touching the other
sections, and the models free of graph breaks. No timing thresholds: the figures of issue 7 need a GPU."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import mmdit.flux
from benchmarks import step_time as st
from benchmarks.step_cost import step_cost

CPU = torch.device("cpu")
LOADING = "## Loading (CPU)\n\nthe other helper's table\n"


def test_tiny_harness_on_cpu(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Benchmark results\n\n{LOADING}")
    argv = ["--tiny", "--device", "cpu", "--warmup", "2", "--steps", "2", "--no-graph-breaks",
            "--pipeline", "--pipeline-steps", "2", "--pipeline-images", "1", "--out", str(out)]
    sdpa = F.scaled_dot_product_attention
    report = st.main(argv)
    assert F.scaled_dot_product_attention is sdpa  # the explicit-logits TACA swap is undone

    assert [r.name for r in report.models] == list(st.MODELS)
    for res in report.models:
        assert res.dtype == torch.float32
        assert res.taca_effect > 1e-3  # TACA changes the output, so its rel-err check below means something
        got = {(r.impl, r.mode, r.taca) for r in res.rows}
        assert got == {("ours", "eager", "-"), ("ours", "eager", "1.2"),
                       ("diffusers", "eager", "-"), ("diffusers", "eager", "1.2 explicit")}
        assert len(res.rows) == len(got) and all(r.seconds > 0 and r.model == res.name for r in res.rows)
        for r in res.rows:
            if r.impl == "ours":
                assert r.rel_err <= 1e-4, (res.name, r)
            else:
                assert r.rel_err is None  # Diffusers eager is the reference
    assert [r.offload for r in report.pipeline] == ["stream-encoders", "encoders", "model"]
    assert all(r.seconds > 0 and r.steps == 2 and r.peak_gb is None for r in report.pipeline)  # no peak off CUDA
    assert [r.rel_err for r in report.pipeline] == [None, 0.0, 0.0]  # offloading changes nothing

    text = out.read_text()
    assert text.startswith(f"# Benchmark results\n\n{LOADING}")  # the other section is kept as it was
    assert text.count(st.SECTION) == 1
    for name in [*st.MODELS, st.PIPELINE]:
        assert text.count(f"### {name}\n") == 1
    assert "- Device: CPU:" in text and f"torch {torch.__version__}" in text
    assert "- Command: `python -m benchmarks.step_time --tiny --device cpu" in text
    flux = text.split("### flux-dev\n")[1].split("### ")[0]
    rows = [line for line in flux.splitlines() if line.startswith("| flux-dev |")]
    assert len(rows) == 4 and "(reference)" in flux


def test_write_section_replaces_only_its_own_blocks(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text(
        f"# Benchmark results\n\n{st.SECTION}\n\nold intro\n\n### flux-dev\n\nold flux\n\n"
        f"### sd3.5-large\n\nold large\n\n{LOADING}"
    )
    st.write_section(out, {"flux-dev": "### flux-dev\n\nnew flux\n", st.PIPELINE: f"### {st.PIPELINE}\n\nNot run: x\n"})
    text = out.read_text()
    assert "old flux" not in text and "new flux" in text and "old large" in text and "old intro" not in text
    assert text.endswith(LOADING) and text.count(st.SECTION) == 1
    assert text.index("new flux") < text.index("old large") < text.index("Not run: x")  # models first, in order
    st.write_section(out, {"flux-dev": "### flux-dev\n\nnewer\n"})
    assert out.read_text().replace("newer", "new flux") == text


# what Diffusers' model may hold as its own copy: the swapped (scale, shift) adaLNs; for SD3 also the
# q, k, v projections, which Diffusers' single-file converter copies (`torch.cat([q])`)
OWN_COPIES = {
    "flux-dev": r"norm_out\.linear\..*",
    "sd3.5-medium": r"norm_out\.linear\..*|.*norm1_context.*|.*\.(to_[qkv]|add_[qkv]_proj)\..*",
}


@pytest.mark.parametrize("name", list(OWN_COPIES))
def test_twin_shares_our_weights(name):
    ours = st.build_ours(st.model_params(name, tiny=True), CPU, torch.float32)
    ref = st.diffusers_twin(ours)
    ours_storages = {t.untyped_storage().data_ptr() for t in ours.state_dict().values()}
    copied = [k for k, t in ref.state_dict().items() if t.untyped_storage().data_ptr() not in ours_storages]
    assert "norm_out.linear.weight" in copied
    assert all(re.fullmatch(OWN_COPIES[name], k) for k in copied), copied


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium"])
def test_models_compile_without_graph_breaks(name):
    breaks = st.graph_breaks(name, CPU, torch.float32)
    assert set(breaks) == {"plain", "TACA float", "TACA tensor"}
    assert breaks == {k: [] for k in breaks}


def test_graph_break_counter_sees_a_break(monkeypatch):
    rope_cos_sin = mmdit.flux.rope_cos_sin

    def breaking(*args):
        torch._dynamo.graph_break()
        return rope_cos_sin(*args)

    monkeypatch.setattr(mmdit.flux, "rope_cos_sin", breaking)
    breaks = st.graph_breaks("flux-dev", CPU, torch.float32, kinds=["plain"])
    assert len(breaks["plain"]) == 1 and "graph_break" in breaks["plain"][0]


def test_step_cost_counts_by_hand():
    meta = torch.device("meta")
    linear = torch.nn.Linear(8, 16, device=meta)
    x = torch.empty(4, 8, device=meta)
    q = torch.empty(1, 2, 5, 8, device=meta)

    def step():
        y = linear(x) + 1  # addmm: 2 * 4 * 8 * 16 FLOPs; add: reads and writes 4 x 16 floats
        return y, F.scaled_dot_product_attention(q, q, q)  # 4 * 2 * 5 * 5 * 8 FLOPs; q, k, v, out

    cost = step_cost(step)
    assert (cost.kernels, cost.gemm_flop, cost.attention_flop) == (3, 2 * 4 * 8 * 16, 4 * 2 * 5 * 5 * 8)
    assert cost.other_bytes == 2 * 4 * 16 * 4 + 4 * q.numel() * 4


@pytest.mark.parametrize("name", ["flux-dev", "sd3.5-medium"])
def test_cost_model_at_full_size(name):
    """On the meta device at full size: ours and Diffusers do the same matmul and attention work (like with like),
    FLUX-dev's step is the issue's 74 TFLOP, and TACA adds memory traffic, not FLOPs."""
    sdpa, rms_norm = F.scaled_dot_product_attention, F.rms_norm
    res = st.bench_cost(name, st.parse_args(["--cost"]))
    assert (F.scaled_dot_product_attention, F.rms_norm) == (sdpa, rms_norm)
    d, plain, taca = res.costs["diffusers", "-"], res.costs["ours", "-"], res.costs["ours", "1.2"]
    for c in (plain, taca):
        assert c.gemm_flop == d.gemm_flop and c.attention_flop == d.attention_flop
    if name == "flux-dev":
        assert 74e12 < d.gemm_flop + d.attention_flop < 75e12
    assert taca.other_bytes > plain.other_bytes > 0 and taca.kernels > plain.kernels > 0


def test_unknown_model_is_named():
    with pytest.raises(ValueError, match="unknown model 'flux-pro'"):
        st.parse_args(["--models", "flux-pro"])


@pytest.mark.parametrize("blocks", [False, True])
def test_compiled_rows_equal_diffusers(blocks):
    """The compiled rows, whole model or block by block (the eager backend: the plumbing, not the codegen)."""
    argv = ["--tiny", "--device", "cpu", "--models", "flux-dev", "--warmup", "1", "--steps", "1", "--no-graph-breaks",
            "--compile", "--compile-backend", "eager", "--out", "-", *(["--compile-blocks"] if blocks else [])]
    (res,) = st.main(argv).models
    compiled = [r for r in res.rows if r.mode == "compiled"]
    assert {(r.impl, r.taca) for r in compiled} == {("ours", "-"), ("ours", "1.2"), ("diffusers", "-")}
    assert all(r.rel_err <= 1e-4 for r in compiled), compiled


def test_compile_blocks_compiles_every_repeated_block_in_place():
    model = st.build_ours(st.model_params("flux-dev", True), CPU, torch.float32)
    args = st.parse_args(["--compile-blocks", "--compile-backend", "eager"])
    assert st.compile_model(model, args) is model
    blocks = [*model.double_blocks, *model.single_blocks]
    assert len(blocks) == 4 and all(b._compiled_call_impl is not None for b in blocks)
    assert model._compiled_call_impl is None  # the rest of the model stays eager
