"""`mmdit sample --prompts FILE --outdir DIR`: the items, the files, resuming, torchrun's processes, bad input.

The shipped tiny model (assets/tiny-flux, 32x32) at 2-4 steps; processes are spawned only where the
feature is about processes (torchrun, a killed run).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from pipeline_builders import built
from test_outputs import unwritable_folder

from sampling import TacaSchedule, default_model, load_pipeline
from sampling.cli import main, version
from sampling.outdir import MANIFEST, PARTS

ROOT = Path(__file__).parent.parent
PROMPTS = ["a red circle", "a blue square to the left of a green circle", "a yellow triangle"]
QUICK = ["--steps", "2", "--upscale", "1", "--device", "cpu"]


def prompt_file(tmp_path: Path, lines: list[str], name: str = "prompts.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return path


def manifest(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / MANIFEST).read_text().splitlines()]


def pngs(outdir: Path) -> dict[str, bytes]:
    """Every file under `outdir` but the manifest: {relative path: bytes}."""
    return {str(p.relative_to(outdir)): p.read_bytes() for p in sorted(outdir.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.int16)


def test_one_png_per_prompt_and_seed_with_its_settings(tmp_path, one_thread):
    """Prompt-major indices, PNG text and manifest lines; each image is `generate([prompt], seed=s)`."""
    source = prompt_file(tmp_path, ["# a comment", PROMPTS[0], "", PROMPTS[1]])
    out = tmp_path / "out"
    assert main(["sample", "--prompts", str(source), "--outdir", str(out), "--seeds", "4", "7-8", *QUICK,
                 "--taca", "1.2"]) == 0
    lines = manifest(out)
    assert [(r["index"], r["prompt"], r["seed"], r["file"]) for r in lines] == [
        (0, PROMPTS[0], 4, "000000.png"), (1, PROMPTS[0], 7, "000001.png"), (2, PROMPTS[0], 8, "000002.png"),
        (3, PROMPTS[1], 4, "000003.png"), (4, PROMPTS[1], 7, "000004.png"), (5, PROMPTS[1], 8, "000005.png")]
    assert set(pngs(out)) == {r["file"] for r in lines}
    pipe = load_pipeline(default_model(), dtype=torch.float32)  # as `mmdit sample` on the CPU
    for r in lines:
        image = Image.open(out / r["file"])
        assert image.text == {
            "prompt": r["prompt"], "model": str(default_model()), "variant": pipe.variant, "steps": "2",
            "seed": str(r["seed"]), "taca": "gamma=1.2 until t=0.97", "size": "32x32",
            "version": f"taca-mmdit {version()}", "negative": "", "true_cfg": "4.5"}  # the model's own true CFG
        assert r == {"index": r["index"], "prompt": r["prompt"], "seed": r["seed"], "file": r["file"],
                     **{k: v for k, v in image.text.items() if k not in ("prompt", "seed")},
                     "layout": "index", "batch_size": 1}
        (expected,) = pipe.generate([r["prompt"]], steps=2, seed=r["seed"], temperature=TacaSchedule(1.2))
        assert torch.equal(pixels(image), pixels(expected)), r


def test_jsonl_seeds_negatives_and_the_batch_size(tmp_path, one_thread):
    """A JSONL line's seed and negative prompt (SD3's CFG); another batch size draws the same noise, so the
    pixels agree within one level of 255 (batched kernels round differently)."""
    _, folder = built("sd3")
    source = prompt_file(tmp_path, [json.dumps({"prompt": "a photo of a cat", "negative": "blurry", "seed": 3}),
                                    json.dumps({"prompt": "a red dog", "seed": 5}),
                                    json.dumps({"prompt": "a photo of a dog on the table"})], "p.jsonl")
    run = ["sample", "--prompts", str(source), "--model", str(folder), "--steps", "2", "--size", "32x32",
           "--negative", "ugly", *QUICK[2:]]
    assert main([*run, "--outdir", str(tmp_path / "b1")]) == 0
    assert main([*run, "--outdir", str(tmp_path / "b3"), "--batch-size", "3"]) == 0
    lines = manifest(tmp_path / "b1")
    assert [(r["seed"], r["negative"]) for r in lines] == [(3, "blurry"), (5, "ugly"), (0, "ugly")]
    pipe = load_pipeline(folder)
    for r in lines:
        (expected,) = pipe.generate([r["prompt"]], height=32, width=32, steps=2, seed=r["seed"],
                                    negative_prompt=r["negative"])
        one, three = (pixels(Image.open(tmp_path / b / r["file"])) for b in ("b1", "b3"))
        assert torch.equal(one, pixels(expected)) and (one - three).abs().max() <= 1
    assert [{**r, "batch_size": 1} for r in manifest(tmp_path / "b3")] == lines


def test_generate_draws_each_seed_alone():
    """`generate(seed=[...])`: item i's noise is `torch.randn` of one image from seed i, whatever its batch."""
    pipe = load_pipeline(default_model(), dtype=torch.float32)  # as `mmdit sample` on the CPU
    noise = torch.cat([torch.randn((1, 12, 16, 16), generator=torch.Generator().manual_seed(s)) for s in (9, 2)])
    kw = dict(steps=1, output="latent")
    assert torch.equal(pipe.generate(PROMPTS[:2], seed=[9, 2], **kw), pipe.generate(PROMPTS[:2], noise=noise, **kw))
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        pipe.generate(PROMPTS, seed=[1, 2], **kw)


def test_t2i_compbench_layout(tmp_path, one_thread):
    """The names the official scripts read: samples/{prompt}_{index:06d}.png, index prompt-major (Karine-Huang/
    T2I-CompBench `Readme.md`; `BLIPvqa_eval/BLIP_vqa.py` sorts by the digits after the last "_" and reads
    the prompt up to the first)."""
    source = prompt_file(tmp_path, PROMPTS[:2])
    out = tmp_path / "examples"
    assert main(["sample", "--prompts", str(source), "--outdir", str(out), "--seeds", "0-2", "--layout",
                 "t2i-compbench", *QUICK]) == 0
    names = sorted(os.listdir(out / "samples"), key=lambda x: int(x.split("_")[-1].split(".")[0]))
    assert names == [f"{p}_{i:06d}.png" for i, p in enumerate([PROMPTS[0]] * 3 + [PROMPTS[1]] * 3)]
    assert [n.split("_")[0] for n in names] == [r["prompt"] for r in manifest(out)]
    assert [r["file"] for r in manifest(out)] == [f"samples/{n}" for n in names]
    bad = prompt_file(tmp_path, ["a red_circle"], "bad.txt")
    assert main(["sample", "--prompts", str(bad), "--outdir", str(tmp_path / "b"), "--layout", "t2i-compbench"]) == 2
    assert not (tmp_path / "b").exists()


def run_and_kill(command: list[str], outdir: Path, after: int, delay: float) -> None:
    """Start `command`, SIGKILL it `delay` s after `after` images are recorded in its part file."""
    part = outdir / PARTS / "rank-00000.jsonl"
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (part.is_file() and part.read_bytes().count(b"\n") >= after):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no image recorded in 120 s"
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_killed_run_resumes_with_each_image_once(tmp_path, one_thread):
    """SIGKILL at a random moment, then the same command: every image exactly once, the same pixels and
    manifest as a run never killed, no temporary file or part left."""
    source = prompt_file(tmp_path, PROMPTS)
    run = ["sample", "--prompts", str(source), "--seeds", "0-2", "--steps", "6", "--batch-size", "2", *QUICK[2:]]
    assert main([*run, "--outdir", str(tmp_path / "whole")]) == 0
    out = tmp_path / "killed"
    after, delay = random.randint(1, 4), random.uniform(0, 0.1)  # of 9 images: at least 5 left to draw
    run_and_kill([sys.executable, "-m", "sampling", *run, "--outdir", str(out)], out, after, delay)
    where = f"killed after {after} images + {delay:.3f} s"
    assert (out / PARTS).is_dir() and not (out / MANIFEST).exists(), where  # killed mid-way
    assert main([*run, "--outdir", str(out)]) == 0
    assert pngs(out) == pngs(tmp_path / "whole"), where
    assert manifest(out) == manifest(tmp_path / "whole"), where
    assert sorted(os.listdir(out)) == sorted([MANIFEST, *(f"{i:06d}.png" for i in range(9))]), where


def test_a_torn_manifest_line_is_ignored_and_its_image_redrawn(tmp_path, one_thread):
    """A part whose last line was cut mid-write, an image written but not recorded, a write_atomic
    temporary file: the rerun redraws what is not recorded and ends with whole lines only."""
    source = prompt_file(tmp_path, PROMPTS)
    run = ["sample", "--prompts", str(source), "--outdir", str(tmp_path / "out"), *QUICK]
    assert main(run) == 0
    out = tmp_path / "out"
    whole, lines = pngs(out), (out / MANIFEST).read_text().splitlines(keepends=True)
    (out / MANIFEST).unlink()
    (out / PARTS).mkdir()
    (out / PARTS / "rank-00001.jsonl").write_text(lines[0] + lines[1][:25])  # item 1: torn, its PNG present
    (out / "000002.png").unlink()
    (out / ".000002.png.0123456789ab.tmp").write_bytes(whole["000002.png"][:100])
    assert main(run) == 0
    assert pngs(out) == whole and (out / MANIFEST).read_text().splitlines(keepends=True) == lines
    assert not (out / PARTS).exists()


def test_one_and_two_torchrun_processes_give_the_same_files(tmp_path, one_thread):
    """2 gloo processes on the CPU, 5 images in batches of 2 (one process idle in the last round): the
    same PNG bytes and manifest as one process."""
    source = prompt_file(tmp_path, PROMPTS[:1] + PROMPTS[2:])
    run = ["sample", "--prompts", str(source), "--seeds", "0", "1", "3-4", "--batch-size", "2", *QUICK[:4]]
    assert main([*run, "--outdir", str(tmp_path / "one")]) == 0
    assert len(pngs(tmp_path / "one")) == 8
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "sampling", *run, "--outdir", str(tmp_path / "two")]
    done = subprocess.run(torchrun, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "wrote 8 images" in done.stdout and "2 processes" in done.stdout
    assert pngs(tmp_path / "two") == pngs(tmp_path / "one")
    assert manifest(tmp_path / "two") == manifest(tmp_path / "one")


# ---- bad input: one line, exit 2, nothing written, the model never loaded ----


@pytest.fixture
def never_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr("sampling.cli.load_pipeline", refuse)


@pytest.mark.parametrize("name,lines,message", [
    ("empty.txt", [], "empty.txt: no prompts (the file is empty, or holds only blank lines and # comments)"),
    ("comments.txt", ["# only", ""], "comments.txt: no prompts"),
    ("bad.jsonl", ['{"prompt": "a"}', "", '{"prompt": "b",}'], "bad.jsonl line 3: not valid JSON"),
    ("list.jsonl", ['["a"]'], "list.jsonl line 1: expected a JSON object"),
    ("typo.jsonl", ['{"promt": "a"}'], "typo.jsonl line 1: unknown field 'promt'"),
    ("seed.jsonl", ['{"prompt": "a", "seed": -1}'], 'seed.jsonl line 1: "seed" must be an integer in 0..2**64 - 1'),
])
def test_a_bad_prompt_file_is_one_line(name, lines, message, tmp_path, never_loads, capsys):
    source = prompt_file(tmp_path, lines, name)
    assert main(["sample", "--prompts", str(source), "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdit sample: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(os.listdir(tmp_path)) == [name]


def test_a_bad_outdir_or_flag_is_one_line(tmp_path, never_loads, capsys):
    source = prompt_file(tmp_path, PROMPTS)
    folder = unwritable_folder(tmp_path)
    (tmp_path / "file").write_text("")
    before = sorted(os.listdir(tmp_path))
    for argv, message in [
        (["--outdir", f"{folder}/out"], f"{folder}/out: cannot write a file in {folder}"),
        (["--outdir", str(tmp_path / "file" / "out")], f"{tmp_path / 'file'} is not a folder"),
        ([], "name the folder for the images, --outdir DIR"),
        (["--outdir", "o", "--seed", "1"], "with --prompts give --seeds"),
        (["--outdir", "o", "--seeds", "1", "0-2"], "seed 1 is given twice"),
        (["a prompt", "--outdir", "o"], "give a PROMPT or --prompts"),
        (["--outdir", "o", "--device", "cuda"], None),  # refused at parse time on a machine without CUDA
    ]:
        if argv[-2:] == ["--device", "cuda"] and torch.cuda.is_available():
            continue
        code = None
        try:
            code = main(["sample", "--prompts", str(source), *argv])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and (message is None or message in err), (argv, err)
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("mmdit sample: error: ")
    assert sorted(os.listdir(tmp_path)) == before and not Path("o").exists()


@pytest.mark.parametrize("seeds,message", [
    ("3-1", "an empty range of seeds: '3-1'"), ("a-b", "not a seed or a range of seeds"),
    ("0-18446744073709551616", "seeds lie in 0..2**64 - 1"), ("-1", "not a seed or a range of seeds"),
])
def test_a_seed_range_that_does_not_parse(seeds, message, tmp_path, never_loads, capsys):
    source = prompt_file(tmp_path, PROMPTS)
    with pytest.raises(SystemExit) as exit:
        main(["sample", "--prompts", str(source), "--outdir", str(tmp_path / "out"), f"--seeds={seeds}"])
    assert exit.value.code == 2 and f"argument --seeds: {message}" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["prompts.txt"]


def test_a_folder_of_another_run_is_refused(tmp_path, one_thread, capsys):
    """Other settings at a recorded index, or a folder of other files: an error before anything is written."""
    source = prompt_file(tmp_path, PROMPTS[:1])
    out = tmp_path / "out"
    assert main(["sample", "--prompts", str(source), "--outdir", str(out), *QUICK]) == 0
    before = pngs(out)
    capsys.readouterr()
    assert main(["sample", "--prompts", str(source), "--outdir", str(out), *QUICK[:1], "3", *QUICK[2:]]) == 2
    assert "image 0 was made with steps='2', this run gives it steps='3'" in capsys.readouterr().err
    assert main(["sample", "--prompts", str(source), "--outdir", str(out), "--seeds", "1", *QUICK]) == 2
    err = capsys.readouterr().err  # the seed that moved is named, with why it moved
    assert "image 0 was made with seed=0, this run gives it seed=1 (images are numbered prompt-major" in err
    assert pngs(out) == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_text("")
    assert main(["sample", "--prompts", str(source), "--outdir", str(tmp_path / "other"), *QUICK]) == 2
    assert "not a folder of `mmdit sample --prompts`" in capsys.readouterr().err


def test_t2i_compbench_refuses_an_empty_prompt(tmp_path, never_loads, capsys):
    """The benchmark reads the prompt back from the file name: an empty one cannot be named."""
    source = prompt_file(tmp_path, ['{"prompt": "a red cube"}', '{"prompt": " "}'], "empty.jsonl")
    argv = ["sample", "--prompts", str(source), "--outdir", str(tmp_path / "out"), "--layout", "t2i-compbench"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "empty.jsonl line 2: --layout t2i-compbench names each image after its prompt, and this prompt is empty" in err
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl"]
