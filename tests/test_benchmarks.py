"""The step-time harness (benchmarks/step_time.py) at tiny size on the CPU, and its cost model (step_cost.py).

What the harness measures must be like with like (ours equals Diffusers in float32 on the benchmark inputs,
with and without TACA), its table complete, its RESULTS.md section written without touching the other
sections, and the models free of graph breaks. No timing thresholds: the figures of issue 7 need a GPU."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import zipfile
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import mmdit.flux
from benchmarks import memory_cost as mc
from benchmarks import step_time as st
from benchmarks.step_cost import step_cost

CPU = torch.device("cpu")
LOADING = "## Loading (CPU)\n\nthe other helper's table\n"


def test_tiny_harness_on_cpu(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text(f"# Benchmark results\n\n{LOADING}")
    argv = ["--tiny", "--device", "cpu", "--warmup", "1", "--steps", "1", "--no-graph-breaks",
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
    "flux2-klein-4b": r"norm_out\.linear\..*",
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
    rope_cos_sin, model_params = mmdit.flux.rope_cos_sin, st.model_params

    def breaking(*args):
        torch._dynamo.graph_break()
        return rope_cos_sin(*args)

    monkeypatch.setattr(mmdit.flux, "rope_cos_sin", breaking)
    # the counter, not the model, is under test: one block of each kind traces in half the time
    def one_block_each(*args, **kwargs):
        return replace(model_params(*args, **kwargs), depth=1, depth_single_blocks=1)

    monkeypatch.setattr(st, "model_params", one_block_each)
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


def test_compiled_rows_equal_diffusers():
    """The compiled rows, whole model (the eager backend: the plumbing, not the codegen); block by block
    (--compile-blocks): test_gpu_suite_tiny's flux-compiled block, with the same checks."""
    argv = ["--tiny", "--device", "cpu", "--models", "flux-dev", "--warmup", "1", "--steps", "1", "--no-graph-breaks",
            "--compile", "--compile-backend", "eager", "--out", "-"]
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


# ---- benchmarks/gpu_suite.sh at tiny size on the CPU: the GPU run's script, flags and files ----

SUITE = st.ROOT / "benchmarks" / "gpu_suite.sh"
SUITE_TITLES = ["flux-dev", "flux-dev: one eager step, top kernels (torch.profiler)", "flux-dev (compiled, blocks)",
                "sd3.5-large", "sd3.5-medium", "FLUX.1-dev pipeline memory (computed, meta device)",
                "FLUX.1-dev pipeline memory (measured)", "flux2-klein-4b"]


def probe_wheel(folder) -> str:
    """A one-module wheel, so that the suite's install lines (pip --no-index --no-deps --target) run without
    a network; with a Diffusers wheel in the repository's .whl/ (benchmarks/README.md), that one too."""
    folder.mkdir()
    with zipfile.ZipFile(folder / "suite_probe-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("suite_probe.py", "INSTALLED = True\n")
        whl.writestr("suite_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: suite_probe\nVersion: 1.0\n")
        whl.writestr("suite_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                     "Tag: py3-none-any\n")
        whl.writestr("suite_probe-1.0.dist-info/RECORD", "")
    for real in (st.ROOT / ".whl").glob("diffusers-0.42.1-*.whl"):
        (folder / real.name).write_bytes(real.read_bytes())
        return str(folder / real.name)
    return ""


def run_suite(tmp_path, *flags, **env):
    env = {**os.environ, "PYTHON": sys.executable, "SITE": str(tmp_path / "site"), **env}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SUITE), *flags, str(tmp_path / "run" / "gpu_suite.md")], env=env,
                          capture_output=True, text=True, timeout=900)


def table_rows(block: str, first: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()
            if line.startswith(f"| {first} |")]


def test_gpu_suite_tiny(tmp_path):
    """The whole GPU script at tiny size: it installs the wheels, runs every block in priority order, appends each
    block to the results file as it finishes, fills the RESULTS.md copy beside it, and its figures are right."""
    real_diffusers = probe_wheel(tmp_path / "wheels")
    done = run_suite(tmp_path, "--tiny", WHEELS=str(tmp_path / "wheels"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "suite_probe.py").exists()  # the install lines ran
    results = (tmp_path / "run" / "gpu_suite.md").read_text()
    assert (tmp_path / "run" / "gpu_suite.log").read_text().count("== flux-eager") == 1
    if real_diffusers:
        assert f"diffusers 0.42.1 from {tmp_path / 'site'}" in results
    assert "failed none" in results and "skipped none" in results

    blocks = {b.split("\n", 1)[0]: b for b in results.split("### ")[1:]}
    assert [t for t in blocks if t in SUITE_TITLES] == SUITE_TITLES  # all there, most important first
    for title in ["flux-dev", "flux-dev (compiled, blocks)", "sd3.5-large", "sd3.5-medium", "flux2-klein-4b"]:
        name = title.split()[0]
        rows = table_rows(blocks[title], name)
        ours = [r for r in rows if r[1] == "ours"]
        assert len(rows) == (3 if "compiled" in title else 4) and len(ours) == 2
        assert all(float(r[-1]) <= 1e-4 for r in ours), rows  # ours equals Diffusers (float32)
        assert ("batch 2 (one CFG step" in blocks[title]) == name.startswith("sd3")
    compiled = table_rows(blocks["flux-dev (compiled, blocks)"], "flux-dev")
    assert {(r[1], r[2], r[3]) for r in compiled} == {("ours", "compiled", "-"), ("ours", "compiled", "1.2"),
                                                      ("diffusers", "compiled", "-")}
    assert all(float(r[-1]) <= 1e-4 for r in compiled), compiled  # Diffusers compiled equals Diffusers eager too
    frames = blocks["flux-dev (compiled, blocks)"].split("- Compiled by dynamo")[1].split("\n")[0]
    assert frames.count("mmdit/flux.py") == 4  # one compile per block class and TACA variant, not per block
    profile = blocks[SUITE_TITLES[1]]
    assert profile.count("| 1 | `aten::") == 2 and "TACA 1.2:" in profile

    for mode in ["none", "encoders", "stream-encoders"]:  # the measured peaks beside the computed ones
        (computed,) = table_rows(blocks[SUITE_TITLES[5]], mode)
        (measured,) = table_rows(blocks[SUITE_TITLES[6]], mode)
        assert measured[3] == computed[1] and measured[1] == "-" and float(measured[6]) > 0  # no peak off CUDA
        assert measured[7] == ("-" if mode == "none" else "0.0e+00")  # offloading does not change the image

    copy = (tmp_path / "run" / "RESULTS.md").read_text()  # benchmarks/RESULTS.md with the blocks put in place
    assert copy.count(st.SECTION) == 1 and "## Loading (CPU)" in copy
    for title in SUITE_TITLES:
        assert copy.count(f"### {title}\n") == 1


STUB_PYTHON = """#!/usr/bin/env bash
# python3 as the GPU machine's, for the suite's plumbing: records each benchmark call, runs none
if [[ "$1" == -m && "$2" == benchmarks.* ]]; then
    echo "${*:2}" >> "$STUB_CALLS"
    [[ "$2" == "${STUB_FAIL:-}" ]] && { echo "stub: failing on purpose"; exit 3; }
    [[ "$2" == "${STUB_SLEEP:-}" ]] && sleep 60
elif [[ "$1" == -c && "$2" == *diffusers.__version__* ]]; then
    echo "Python 3.12.3, torch 2.11.0+cu130 (${STUB_GPU:-NVIDIA H200}), diffusers 0.42.1 from /tmp/site/diffusers"
elif [[ "$1" == -c && -z "${STUB_PROBES:-}" ]]; then
    exec REAL_PYTHON "$@"  # the suite's other probes (FLUX2_PROBE) run for real
fi
exit 0  # STUB_PROBES=yes: says yes to every probe, printing nothing
"""


def stub_python(tmp_path) -> str:
    stub = tmp_path / "python3"
    stub.write_text(STUB_PYTHON.replace("REAL_PYTHON", shlex.quote(sys.executable)))
    stub.chmod(0o755)
    return str(stub)


def test_gpu_suite_full_size_command_lines(tmp_path):
    """The full-size path (no --tiny), which the CPU cannot run: with a stand-in python3, every block's command line
    is parsed by the real parsers and asks for what issue 17 measures; a failing block is recorded, the rest run."""
    calls = tmp_path / "calls"
    done = run_suite(tmp_path, PYTHON=stub_python(tmp_path), STUB_CALLS=str(calls), STUB_FAIL="benchmarks.memory_cost",
                     WHEELS=str(tmp_path / "none"))
    assert done.returncode == 1, done.stdout[-3000:]
    results = (tmp_path / "run" / "gpu_suite.md").read_text()
    assert "- Python 3.12.3, torch 2.11.0+cu130 (NVIDIA H200), diffusers 0.42.1" in results and "full sizes" in results
    assert "### Failed: pipeline-memory\n\nexit status 3" in results and "stub: failing on purpose" in results
    assert "done flux-eager flux-compiled sd3 flux2-klein; skipped none; failed pipeline-memory" in results

    run = tmp_path / "run"
    lines = [shlex.split(line) for line in calls.read_text().splitlines()]
    st_call, mc_call = "benchmarks.step_time", "benchmarks.memory_cost"
    assert [line[0] for line in lines] == [st_call, st_call, st_call, mc_call, st_call]
    eager, compiled, sd3, flux2 = (st.parse_args(line[1:]) for line in [*lines[:3], lines[4]])
    for args in (eager, compiled, sd3, flux2):
        assert not args.tiny and args.dtype is None and args.steps == 20 and not args.graph_breaks
        assert (args.out, args.append) == (run / "RESULTS.md", run / "gpu_suite.md")
    assert (eager.models, st.timed_modes(eager), eager.batch, eager.profile) == (["flux-dev"], ["eager"], 1, True)
    assert (compiled.models, st.timed_modes(compiled), compiled.compile_blocks) == (["flux-dev"], ["compiled"], True)
    assert compiled.compile_backend == "inductor" and compiled.compile_mode is None and compiled.warmup >= 1
    assert (sd3.models, st.timed_modes(sd3), sd3.batch) == (["sd3.5-large", "sd3.5-medium"], ["eager"], 2)
    assert (flux2.models, st.timed_modes(flux2), flux2.batch) == (["flux2-klein-4b"], ["eager"], 1)
    assert not flux2.profile and not flux2.compile
    memory = mc.parse_args(lines[3][1:])
    assert memory.measure and not memory.tiny and memory.offload == ["none", "encoders", "stream-encoders"]
    assert (memory.out, memory.append) == (run / "RESULTS.md", run / "gpu_suite.md")


def test_gpu_suite_stops_a_block_at_the_end_of_the_budget(tmp_path):
    """A block still running when the budget runs out is stopped (`timeout`) and recorded as such."""
    done = run_suite(tmp_path, "--tiny", PYTHON=stub_python(tmp_path), STUB_CALLS=str(tmp_path / "calls"),
                     STUB_SLEEP="benchmarks.step_time", BUDGET_S="4", EST_S="1", BLOCKS="flux-eager",
                     WHEELS=str(tmp_path / "none"))
    assert done.returncode == 1
    results = (tmp_path / "run" / "gpu_suite.md").read_text()
    assert "### Failed: flux-eager\n\nstopped at the end of the budget (timeout, exit 124)" in results


def test_gpu_suite_skips_what_does_not_fit(tmp_path):
    """A block whose estimate exceeds what is left of the budget is skipped and said so; an unknown block fails."""
    done = run_suite(tmp_path, "--tiny", PYTHON=stub_python(tmp_path), STUB_CALLS=str(tmp_path / "calls"),
                     WHEELS=str(tmp_path / "none"), BUDGET_S="5", BLOCKS="flux-eager bogus")
    assert done.returncode == 1
    results = (tmp_path / "run" / "gpu_suite.md").read_text()
    assert "### Skipped: flux-eager\n\nNot run: estimated 10 s" in results and "### Unknown block: bogus" in results
    assert "done none; skipped flux-eager; failed bogus" in results and not (tmp_path / "calls").exists()


def test_gpu_suite_flux2_block_needs_the_real_probe(tmp_path):
    """The flux2-klein block runs on what its probe prints (Diffusers builds the twin), not on an exit status:
    a python that says yes to everything gets the block recorded as failed, and no benchmark is started."""
    done = run_suite(tmp_path, "--tiny", PYTHON=stub_python(tmp_path), STUB_CALLS=str(tmp_path / "calls"),
                     STUB_PROBES="yes", BLOCKS="flux2-klein", WHEELS=str(tmp_path / "none"))
    assert done.returncode == 1
    results = (tmp_path / "run" / "gpu_suite.md").read_text()
    why = "Not run: the FLUX.2 probe (FLUX2_PROBE) ended with: nothing printed"
    assert f"### Failed: flux2-klein\n\n{why}" in results
    assert "done none; skipped none; failed flux2-klein" in results and not (tmp_path / "calls").exists()


def test_gpu_suite_needs_a_gpu_at_full_size(tmp_path):
    done = run_suite(tmp_path, PYTHON=stub_python(tmp_path), STUB_CALLS=str(tmp_path / "calls"),
                     STUB_GPU="no CUDA device", WHEELS=str(tmp_path / "none"))
    assert done.returncode == 1 and "gpu_suite: no CUDA device" in done.stdout and not (tmp_path / "calls").exists()
