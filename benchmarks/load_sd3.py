"""Loading benchmark (CPU): a full-size SD3.5-Medium SAI single file, ours against Diffusers.

    python -m benchmarks.load_sd3 [--dir DIR] [--repeats N] [--tiny]

Writes a random-weight `sd3.5_medium`-shaped checkpoint (bf16, ~4.9 GB, SAI layout) into a
temporary folder under DIR, then loads it in fresh subprocesses, alternating:
- ours: `convert.load_transformer(path, dtype=torch.bfloat16)`;
- Diffusers: `SD3Transformer2DModel.from_single_file(path, config=<local folder>, torch_dtype=bf16)`.
Each child reports its load time and its peak RSS (VmHWM), and its RSS after imports. The figures go to
the "Loading (CPU)" section of benchmarks/RESULTS.md (other sections are kept). The file is deleted.

The child processes run this module too: torch, our loader and Diffusers are imported inside the
functions that use them, so each child imports only the loader it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.results import machine, write_section

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Loading (CPU)"
PRESET = "sd3.5-medium"


def rss_kib(field: str) -> int:
    """VmHWM (peak) or VmRSS (now) of this process, in KiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M)[1])


def diffusers_config(params) -> dict:
    return {
        "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": params.patch_size,
        "in_channels": params.in_channels, "num_layers": params.depth, "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads, "joint_attention_dim": params.context_in_dim,
        "caption_projection_dim": params.hidden_size, "pooled_projection_dim": params.adm_in_channels,
        "out_channels": params.out_channels, "pos_embed_max_size": params.pos_embed_max_size,
        "dual_attention_layers": list(params.x_block_self_attn_layers), "qk_norm": "rms_norm" if params.qk_norm else None,
    }


def child(which: str, path: str, config_dir: str) -> None:
    """Runs in a fresh process: import, load once, print the figures as JSON."""
    import torch

    if which == "ours":
        from convert import load_transformer

        def load():
            return load_transformer(path, dtype=torch.bfloat16)
    else:
        from diffusers import SD3Transformer2DModel
        from diffusers.utils import logging

        logging.set_verbosity_error()

        def load():
            return SD3Transformer2DModel.from_single_file(
                path, config=config_dir, subfolder="transformer", torch_dtype=torch.bfloat16, local_files_only=True
            )

    base = rss_kib("VmRSS")
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    after = {"peak_kib": rss_kib("VmHWM"), "anon_kib": rss_kib("RssAnon"), "file_kib": rss_kib("RssFile")}
    # Read one value per 1 KiB of every weight, so memory-mapped weights are really in memory.
    tensors = list(model.state_dict().values())
    with torch.no_grad():
        for t in tensors:
            t.reshape(-1)[:: 1024 // t.element_size()].float().sum()
    touched = time.perf_counter() - t0
    n = sum(t.numel() for t in tensors)
    print(json.dumps({"seconds": seconds, "touched_s": touched, **after, "touched_peak_kib": rss_kib("VmHWM"),
                      "base_kib": base, "numel": n}))


def run_child(which: str, path: Path, config_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.load_sd3", "--child", which, str(path), str(config_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.load_sd3", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=tempfile.gettempdir(),
                    help="where the temporary checkpoint goes (default: the system's temporary folder)")
    ap.add_argument("--repeats", type=int, default=2, help="loads per loader, alternating (default 2)")
    ap.add_argument("--tiny", action="store_true",
                    help="a tiny model of the same layout (smoke test, RESULTS.md untouched)")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)

    import torch

    from convert.synthetic import random_checkpoint

    work = Path(tempfile.mkdtemp(prefix="load_sd3.", dir=args.dir))
    try:
        path = work / "sd3.5_medium.safetensors"
        t0 = time.perf_counter()
        params = random_checkpoint(PRESET, path, dtype=torch.bfloat16, tiny_size=args.tiny)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s", flush=True)
        (work / "config" / "transformer").mkdir(parents=True)
        (work / "config" / "transformer" / "config.json").write_text(json.dumps(diffusers_config(params)))

        load_avg = os.getloadavg()[0]
        runs: dict[str, list[dict]] = {"ours": [], "diffusers": []}
        for _ in range(args.repeats):
            for which in runs:
                r = run_child(which, path, work / "config")
                runs[which].append(r)
                print(f"{which:9s} {r['seconds']:6.1f} s, {r['touched_s']:6.1f} s with every weight read; peak RSS "
                      f"{r['peak_kib'] / 2**20:5.2f} GiB, {r['touched_peak_kib'] / 2**20:5.2f} GiB", flush=True)
        size = path.stat().st_size
    finally:
        shutil.rmtree(work)

    n_params = {r["numel"] for rs in runs.values() for r in rs}
    assert len(n_params) == 1, f"the two loaders built models of different sizes: {n_params}"
    gib = 2**30
    rows = [
        f"| loader | load, s (best, worst of {args.repeats}) | load + read every weight, s (best) | peak RSS after load, GiB "
        "(file-backed) | peak RSS after reading every weight, GiB | that / file size | RSS after imports, GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, which in (("ours: `convert.load_transformer`", "ours"), ("Diffusers: `from_single_file`", "diffusers")):
        rs = runs[which]
        touched = max(r["touched_peak_kib"] for r in rs) * 1024
        rows.append(
            f"| {name} | {min(r['seconds'] for r in rs):.1f}, {max(r['seconds'] for r in rs):.1f} "
            f"| {min(r['touched_s'] for r in rs):.1f} "
            f"| {max(r['peak_kib'] for r in rs) * 1024 / gib:.2f} ({max(r['file_kib'] for r in rs) * 1024 / gib:.2f}) "
            f"| {touched / gib:.2f} | {touched / size:.2f} | {max(r['base_kib'] for r in rs) * 1024 / gib:.2f} |"
        )
    table = "\n".join(rows)
    print(table)
    if args.tiny:
        return

    import diffusers

    text = "\n".join([
        SECTION,
        "",
        f"SD3.5-Medium-shaped SAI single file (random bf16 weights, {next(iter(n_params)) / 1e9:.3f} B values, "
        f"{size / 1e9:.2f} GB = {size / 2**30:.2f} GiB), loaded into bf16 on the CPU, each load in a fresh process.",
        "Peak RSS is the child's VmHWM (imports included); file-backed: its RssFile after the load (memory-mapped "
        "weights count only once their pages are read, hence the second pass that reads one value per KiB of every "
        "weight). The file was just written, so it is in the page cache for both.",
        "",
        table,
        "",
        f"- Machine: {machine()}; load average {load_avg:.1f} when the loads began (other jobs share it: "
        "times vary from run to run)",
        f"- torch {torch.__version__}, diffusers {diffusers.__version__}, Python {platform.python_version()}",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- Command: `{' '.join(['python -m benchmarks.load_sd3', *sys.argv[1:]])}`",
        "",
    ])
    write_section(text)


if __name__ == "__main__":
    main()
