#!/usr/bin/env bash
# Issue 17's GPU figures in one go: at most BUDGET_S seconds (default 540 = 9 minutes) on an H100/H200.
#
#   bash benchmarks/gpu_suite.sh [--tiny] [RESULTS]
#
# RESULTS (or the env var RESULTS; default $OUT/gpu_suite.md where OUT is set, else /tmp/gpu_suite/gpu_suite.md):
# the file each block is appended to as soon as it is measured, so a run cut short keeps what it measured.
# Beside it: RESULTS.md (a copy of benchmarks/RESULTS.md with each block put in its section, ready to copy
# back) and gpu_suite.log (everything the run printed).
#
# The blocks, most important first (random bf16 weights made on the GPU, nothing loaded from files):
#   flux-eager       FLUX.1-dev transformer, 1024x1024, batch 1, eager: ours plain and TACA 1.2, Diffusers
#                    plain and with the authors' TACA (explicit logits); median of 20 steps, CUDA events;
#                    then one step of ours, plain and TACA, under torch.profiler: the top kernels
#   flux-compiled    the same compiled block by block (--compile-blocks, ours and Diffusers alike)
#   sd3              SD3.5-Large, then SD3.5-Medium transformers, eager, a CFG step (batch 2): plain and TACA
#   pipeline-memory  FLUX.1-dev pipeline peak memory per offload mode (none, encoders, stream-encoders):
#                    max_memory_allocated and reserved, beside benchmarks/memory_cost.py's computed figures
#   flux2-klein      FLUX.2 [klein] 4B transformer, 1024x1024 (4096 image tokens, 512 text), batch 1, eager: ours
#                    plain and TACA 1.2, Diffusers' Flux2Transformer2DModel plain and with explicit-logits TACA;
#                    first a probe (FLUX2_PROBE) that the Diffusers in use builds the twin, else the block fails
#                    with the probe's last line (the FLUX.1 and SD3 blocks run with an older Diffusers)
#
# Each block runs in its own process (a crash or out-of-memory stops that block only) under `timeout`
# with what is left of the budget; a block whose GPU estimate (EST below: estimates, not measurements)
# does not fit in what is left is skipped, and the results file says so.
#
# Environment:
#   TINY=1 (or --tiny)  every block at tiny size on the CPU, compiled with the eager backend: the same
#                       code paths, install lines and results file in a minute or two (tests/test_benchmarks.py)
#   BUDGET_S=540        wall-time budget of the whole run, seconds
#   BLOCKS="..."        the blocks to run, in this order (default: all of the above), e.g. for a rerun
#   EST_S=60            one estimate, seconds, for every block instead of EST below (a machine of other speed)
#   WHEELS=.whl         folder of wheels for what the machine lacks (Diffusers 0.42.1), installed with
#                       pip --no-index --no-deps --target SITE and put first on PYTHONPATH
#   SITE=/tmp/gpu_suite_site   where they are installed
#   PYTHON=python3      the interpreter (the device image's python3 holds PyTorch)
set -uo pipefail  # not -e: a failed block is recorded and the next one runs

cd "$(dirname "$0")/.."
TINY=${TINY:-0}
if [[ "${1:-}" == "--tiny" ]]; then TINY=1; shift; fi
RESULTS=${1:-${RESULTS:-${OUT:-/tmp/gpu_suite}/gpu_suite.md}}
BUDGET_S=${BUDGET_S:-540}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/gpu_suite_site}
PYTHON=${PYTHON:-python3}
ALL_BLOCKS="flux-eager flux-compiled sd3 pipeline-memory flux2-klein"
BLOCKS=${BLOCKS:-$ALL_BLOCKS}

# Estimated GPU wall time of each block on an H100/H200, seconds: estimates, not measurements (see
# benchmarks/README.md, "The GPU suite", for how each is made). Each includes its process's start
# (imports, CUDA context: ~15 s) and building the random-weight models on the GPU.
declare -A EST=([flux-eager]=70 [flux-compiled]=150 [sd3]=80 [pipeline-memory]=60 [flux2-klein]=40)

mkdir -p "$(dirname "$RESULTS")"
RESULTS=$(cd "$(dirname "$RESULTS")" && pwd)/$(basename "$RESULTS")
RESULTS_MD=${RESULTS_MD:-$(dirname "$RESULTS")/RESULTS.md}
LOG=${RESULTS%.md}.log
exec > >(tee -a "$LOG") 2>&1  # everything printed also goes to the log beside the results

note() { printf '%s\n' "$@" | tee -a "$RESULTS"; }  # a line of the results file, printed as well

# ---- what the machine lacks: the wheels in $WHEELS (Diffusers), installed without an index ----
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    echo "installing $(ls "$WHEELS"/*.whl | xargs -n1 basename | tr '\n' ' ')into $SITE"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl || { echo "gpu_suite: pip could not install the wheels in $WHEELS"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
# The flux2-klein rows can run here: benchmarks/step_time.py has them, and the Diffusers in use builds the
# twin (Flux2Transformer2DModel holding our tiny model's tensors, strict keys, on the meta device: no memory).
# It passes on the exact last line it prints, not on an exit status alone. It only imports and builds on the
# meta device, so it runs beside the version check below, and is waited for before any block is timed.
FLUX2_PROBE='import torch
from benchmarks.step_time import MODELS, build_ours, diffusers_twin, model_params
name = "flux2-klein-4b"
assert name in MODELS, f"{name} is not in benchmarks.step_time.MODELS"
ours = build_ours(model_params(name, tiny=True), torch.device("meta"), torch.bfloat16)
twin = diffusers_twin(ours)
assert type(twin).__name__ == "Flux2Transformer2DModel", type(twin).__name__
print(f"{name}: ok")'
FLUX2_OUT=$(mktemp) FLUX2_PID="" FLUX2_WHY=""
# on exit, a probe still running goes with its process group (timeout leads one), and its output file
trap '[[ -n "$FLUX2_PID" ]] && { kill -- -"$FLUX2_PID" || kill "$FLUX2_PID"; } 2>/dev/null; rm -f "$FLUX2_OUT"' EXIT
if [[ " $BLOCKS " == *" flux2-klein "* ]]; then
    timeout --kill-after=5 120 "$PYTHON" -c "$FLUX2_PROBE" >"$FLUX2_OUT" 2>&1 &
    FLUX2_PID=$!
fi
flux2_known() {  # the probe's answer: true on its "ok" line, else FLUX2_WHY is its last line
    FLUX2_WHY=$(tail -n 1 "$FLUX2_OUT")
    [[ "$FLUX2_WHY" == "flux2-klein-4b: ok" ]]
}
VERSIONS=$("$PYTHON" -c 'import sys, torch, diffusers
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # what the blocks use, imported up front
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"Python {sys.version.split()[0]}, torch {torch.__version__} ({cuda}),",
      f"diffusers {diffusers.__version__} from {diffusers.__file__}")') \
    || { echo "gpu_suite: torch or Diffusers does not import (the Diffusers 0.42.1 wheel goes in $WHEELS:" \
              "benchmarks/README.md)"; exit 1; }

if [[ "$TINY" == 1 ]]; then
    COMMON=(--tiny --device cpu)
    WARMUP=1 STEPS=1
    BACKEND=(--compile-backend eager)
    PIPELINE_STEPS=1
    for b in $ALL_BLOCKS; do EST[$b]=10; done  # the budget logic runs as on the GPU, with CPU-sized estimates
else
    [[ "$VERSIONS" != *"no CUDA device"* ]] \
        || { echo "gpu_suite: no CUDA device (TINY=1 runs the tiny sizes on the CPU)"; exit 1; }
    COMMON=()
    WARMUP=2 STEPS=20
    BACKEND=()
    PIPELINE_STEPS=4
fi
if [[ -n "$FLUX2_PID" ]]; then wait "$FLUX2_PID"; FLUX2_PID=""; fi  # nothing runs beside a timed block
if [[ -n "${EST_S:-}" ]]; then
    [[ "$EST_S" =~ ^[0-9]+$ ]] || { echo "gpu_suite: EST_S must be whole seconds, got '$EST_S'"; exit 2; }
    for b in $ALL_BLOCKS; do EST[$b]=$EST_S; done
fi
[[ -f "$RESULTS_MD" ]] || cp benchmarks/RESULTS.md "$RESULTS_MD"
OUTS=(--out "$RESULTS_MD" --append "$RESULTS")

SIZES=$([[ $TINY == 1 ]] && echo 'TINY=1: tiny sizes on the CPU, a smoke run' || echo 'full sizes')
GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null \
      || echo 'none (no nvidia-smi)')
note "## GPU suite run (benchmarks/gpu_suite.sh)" "" \
     "- Started: $(date -u '+%Y-%m-%d %H:%M:%S') UTC on ${HOSTNAME:-?}; $SIZES" \
     "- $VERSIONS" \
     "- GPU: $GPU" \
     "- Budget: ${BUDGET_S} s; blocks: ${BLOCKS}" \
     "- Estimated s per block (estimates, not measurements): $(for b in $BLOCKS; do printf '%s %s; ' "$b" "${EST[$b]:-?}"
                                                                done)" ""

# ---- the blocks ----
DONE=() SKIPPED=() FAILED=()

block() {  # block NAME COMMAND...: run it if its estimate fits in what is left of the budget
    local name=$1; shift
    local left=$((BUDGET_S - SECONDS)) est=${EST[$name]:-60}
    if ((est > left)); then
        note "### Skipped: $name" "" "Not run: estimated ${est} s, ${left} s left of the ${BUDGET_S} s budget." ""
        SKIPPED+=("$name")
        return
    fi
    echo "== $name (estimated ${est} s, ${left} s left): $*"
    local t0=$SECONDS blog
    blog=$(mktemp)
    timeout --kill-after=10 "$left" "$@" 2>&1 | tee "$blog"
    local rc=${PIPESTATUS[0]}
    if ((rc != 0)); then
        local why="exit status $rc"
        ((rc == 124 || rc == 137)) && why="stopped at the end of the budget (timeout, exit $rc)"
        note "### Failed: $name" "" "$why after $((SECONDS - t0)) s; the last lines it printed:" "" '```'
        tail -n 40 "$blog" | tee -a "$RESULTS"
        note '```' ""
        FAILED+=("$name")
    else
        note "- $name: $((SECONDS - t0)) s (estimated ${est} s)" ""
        DONE+=("$name")
    fi
    rm -f "$blog"
}

ST=("$PYTHON" -m benchmarks.step_time "${COMMON[@]}" "${OUTS[@]}")


for name in $BLOCKS; do
    case $name in
        flux-eager)
            block "$name" "${ST[@]}" --models flux-dev --warmup "$WARMUP" --steps "$STEPS" --no-graph-breaks \
                --profile ;;
        flux-compiled)  # the block lists the frames dynamo compiled (a graph break shows as a resume frame)
            block "$name" env TORCH_LOGS=recompiles "${ST[@]}" --models flux-dev --modes compiled --compile-blocks \
                "${BACKEND[@]}" --warmup 3 --steps "$STEPS" --no-graph-breaks ;;
        sd3)  # a CFG step: batch 2; each model's block is appended as soon as it is measured
            block "$name" "${ST[@]}" --models sd3.5-large sd3.5-medium --batch 2 --warmup "$WARMUP" --steps "$STEPS" \
                --no-graph-breaks ;;
        pipeline-memory)
            block "$name" "$PYTHON" -m benchmarks.memory_cost --measure "${COMMON[@]}" "${OUTS[@]}" \
                --offload none encoders stream-encoders --pipeline-steps "$PIPELINE_STEPS" ;;
        flux2-klein)  # FLUX.2 [klein] 4B, once the probe says the Diffusers in use builds its twin
            if flux2_known; then
                block "$name" "${ST[@]}" --models flux2-klein-4b --warmup "$WARMUP" --steps "$STEPS" --no-graph-breaks
            else
                note "### Failed: $name" "" \
                     "Not run: the FLUX.2 probe (FLUX2_PROBE) ended with: ${FLUX2_WHY:-nothing printed}" ""
                FAILED+=("$name")
            fi ;;
        *)
            note "### Unknown block: $name" "" "Known: $ALL_BLOCKS" ""
            FAILED+=("$name") ;;
    esac
done

SUMMARY="done ${DONE[*]:-none}; skipped ${SKIPPED[*]:-none}; failed ${FAILED[*]:-none}"
note "- Suite finished in ${SECONDS} s of ${BUDGET_S}: $SUMMARY" ""
((${#FAILED[@]} == 0))
