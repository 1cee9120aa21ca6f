"""`mmdit train` as a new user meets it, and the faults it must survive (issue 14: B1, B5, B6, C8, C9).

Checked: numpy is a declared runtime dependency (safetensors' writer needs it); a run without a model
says what to pass; the image size comes from the model (the tiny model's 32 px) and enlarging is
warned of; a resumed run takes every setting from its checkpoint (`--output` and `--resume` only,
no re-encoding, the losses of an uninterrupted run), refuses changes to what the checkpoint is and
prints the others' old and new values; Ctrl-C / SIGTERM during a step's forward or backward stops
at the next block, keeps the last complete step and resumes exactly; a training checkpoint given as
a LoRA says what to pass; `--train full` writes a model folder the sampler reads; 16-bit, float,
integer, transparent and CMYK images are scaled right; a caption that is not UTF-8 is skipped
with a warning naming it; stale temporary files are removed at start, a torn last log line is
dropped; a full disk during a checkpoint or the caching pass gives one line and exit code 3.
"""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import tomllib
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from builders import rel_err
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file
from training_builders import ddp_stop_worker, standin_encoders, tiny_config, write_dataset, write_tiny_flux

import convert
import convert.files
from convert.files import CheckpointError
from sampling import load_pipeline
from sampling.cli import main as sample_main
from sampling.loading import DEFAULT_MODEL
from sampling.offload import blocks_of
from training import TrainConfig, train
from training.checkpoint import list_checkpoints
from training.cli import main
from training.config import native_resolution
from training.data import load_image, scan
from training.interrupt import StopOnSignal

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("model") / "tiny-flux.safetensors")


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def logged_losses(output: Path) -> list[float]:
    return [json.loads(s)["loss"] for s in open(output / "log.jsonl")]


# ---- B1: numpy ----


def test_numpy_is_a_runtime_dependency(tmp_path):
    """safetensors' writer imports numpy: the README's plain install (runtime dependencies only) must bring it."""
    code = ("import sys; sys.modules['numpy'] = None\nimport torch\nfrom safetensors.torch import save_file\n"
            "save_file({'a': torch.zeros(1)}, sys.argv[1])")
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.safetensors")], capture_output=True, text=True)
    assert run.returncode != 0 and "numpy" in run.stderr  # without numpy, no safetensors file can be written
    with open(ROOT / "pyproject.toml", "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    assert "numpy" in [re.split(r"[<>=!~\[; ]", d)[0] for d in deps]


# ---- B5: defaults from the model, resume from the checkpoint, stopping mid-step ----


def test_no_model_says_what_to_pass(tmp_path, capsys):
    assert main(["--data", str(tmp_path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no model given: pass --model SOURCE" in err and "assets/tiny-flux" in err and "hub repo id" in err
    assert main(["--output", str(tmp_path / "out"), "--resume"]) == 2  # nothing to resume: what is missing
    err = capsys.readouterr().err
    assert "no model, data given (and no checkpoint to resume from)" in err and "--data FOLDER" in err


def test_resolution_is_the_models_own(tmp_path, base, caplog):
    """No --resolution: the tiny model's 32 px (its sampling_defaults), not an upscaled 512; smaller images warn."""
    assert native_resolution(str(DEFAULT_MODEL)) == 32
    assert native_resolution(str(base)) == 1024  # FLUX.1's sampling size
    data = write_dataset(tmp_path / "data", n=2, size=(32, 32))
    Image.new("RGB", (16, 8), "red").save(data / "small.png")
    (data / "small.txt").write_text("a small red picture")
    cfg = TrainConfig(model=str(DEFAULT_MODEL), data=str(data), output=str(tmp_path / "out"), steps=1, rank=2,
                      dtype="float32", mixed_precision="no", device="cpu", progress=False)
    assert cfg.resolution is None
    caplog.set_level("INFO")
    with pytest.warns(UserWarning) as record:
        result = train(cfg)
    enlarged = [str(w.message) for w in record if "enlarged" in str(w.message)]
    assert len(enlarged) == 1 and "1 of 3 images" in enlarged[0] and "4x" in enlarged[0] and "small.png" in enlarged[0]
    assert "resolution 32: the model's own size" in caplog.text
    assert result.data.load([0]).latents.shape == (1, 12, 16, 16)  # PixelCodec: 32x32x3 -> 12x16x16
    meta = convert.files.read_header(tmp_path / "out" / "lora.safetensors")["__metadata__"]
    assert json.loads(meta["train.config"])["resolution"] == 32


@pytest.fixture
def cut_run(tmp_path, base):
    """An uninterrupted run and the same run stopped (Ctrl-C) after step 2, settings far from the defaults."""
    data = write_dataset(tmp_path / "data", n=3)
    kw = dict(steps=5, batch_size=2, grad_accum=2, dropout=0.1, warmup_steps=2, checkpoint_every=10, lr=3e-3,
              seed=7, t_min=0.9, taca_gamma=1.3)
    full = quiet(train, tiny_config(base, data, tmp_path / "full", **kw), encoders=standin_encoders())

    def ctrl_c(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    first = quiet(train, tiny_config(base, data, tmp_path / "cut", **kw), encoders=standin_encoders(), on_step=ctrl_c)
    assert first.interrupted
    return full, first, tmp_path / "cut"


def test_resume_takes_the_runs_settings(cut_run, caplog):
    """`--output` and `--resume` only: every setting from the checkpoint, nothing re-encoded (no encoders
    could be loaded from the bare transformer file), the losses and LoRA of the uninterrupted run."""
    full, first, out = cut_run
    caplog.set_level("INFO")
    assert quiet(main, ["--output", str(out), "--resume"]) == 0
    assert "(0 encoded now" in caplog.text and "changed settings" not in caplog.text
    assert logged_losses(out) == full.losses  # exactly
    a, b = load_file(out.parent / "full" / "lora.safetensors"), load_file(out / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = convert.files.read_header(out / "lora.safetensors")["__metadata__"]
    saved = json.loads(meta["train.config"])
    assert (saved["seed"], saved["resolution"], saved["rank"], saved["taca_gamma"]) == (7, 16, 4, 1.3)


def test_resume_refuses_or_reports_changed_settings(cut_run, caplog, capsys):
    full, first, out = cut_run
    assert main(["--output", str(out), "--resume", "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "step-0000002.safetensors: a resumed run keeps its model" in err and "--rank 8 (the run's: 4)" in err
    assert main(["--output", str(out), "--resume", "--steps", "1"]) == 2
    assert "the run is at step 2: --steps must be at least that, got 1" in capsys.readouterr().err
    caplog.set_level("INFO")
    assert quiet(main, ["--output", str(out), "--resume", "--lr", "0.01", "--steps", "3", "--no-progress"]) == 0
    assert "--lr 0.003 -> 0.01" in caplog.text and "--steps 5 -> 3" in caplog.text
    assert "will not repeat an uninterrupted one (lr changed)" in caplog.text
    assert [json.loads(s)["lr"] for s in open(out / "log.jsonl")][2] == 0.01


@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_signal_mid_step_stops_at_the_next_block(tmp_path, base, phase):
    """SIGTERM in the middle of step 3 (its forward, or its backward): no further block runs, the partial
    step is discarded, the checkpoint is step 2's, and resuming repeats the uninterrupted run exactly."""
    data = write_dataset(tmp_path / "data", n=2)
    kw = dict(steps=4, checkpoint_every=10, cache=str(tmp_path / "cache"))
    full = quiet(train, tiny_config(base, data, tmp_path / "full", **kw), encoders=standin_encoders())

    model = convert.load_transformer(base)
    blocks = blocks_of(model)
    calls = {"forward": 0, "backward": 0, "after_signal": 0, "sent": False}
    target = len(blocks) * 2 + len(blocks) // 2  # the middle block of step 3

    def send():
        os.kill(os.getpid(), signal.SIGTERM)
        calls["sent"] = True

    def on_forward(module, args, output):
        calls["forward"] += 1
        if calls["sent"]:
            calls["after_signal"] += 1
        if phase == "forward" and calls["forward"] == target:
            send()
        elif phase == "backward":
            out = output[0] if isinstance(output, tuple) else output

            def on_backward(grad, n=calls["forward"]):
                calls["backward"] += 1
                if calls["sent"]:
                    calls["after_signal"] += 1
                elif calls["backward"] == target:
                    send()

            out.register_hook(on_backward)

    for block in blocks:
        block.register_forward_hook(on_forward)
    cfg = tiny_config(base, data, tmp_path / "cut", **kw)
    first = quiet(train, cfg, model=model)
    assert calls["sent"] and calls["after_signal"] == 0  # the next block did not run
    assert first.interrupted and first.step == 2 and first.losses == full.losses[:2]
    assert [p.name for p in list_checkpoints(tmp_path / "cut" / "checkpoints")] == ["step-0000002.safetensors"]
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handlers are put back
    second = quiet(train, TrainConfig(**{**asdict(cfg), "resume": "latest"}))
    assert first.losses + second.losses == full.losses
    assert logged_losses(tmp_path / "cut") == full.losses


def test_two_processes_stop_together_when_one_is_signalled(tmp_path, base):
    """gloo, 2 processes: one is signalled in the middle of step 3's forward, the other never; both discard
    the step (no collective call is left unmatched), and the checkpoint is step 2's."""
    data = write_dataset(tmp_path / "data", n=4)
    kw = dict(steps=4, batch_size=4, checkpoint_every=10, cache=str(tmp_path / "cache"))
    quiet(train, tiny_config(base, data, tmp_path / "warm", steps=1, batch_size=4, cache=str(tmp_path / "cache")),
          encoders=standin_encoders())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    blocks = len(blocks_of(convert.load_transformer(base)))
    config = asdict(tiny_config(base, data, tmp_path / "two", **kw))
    mp.spawn(ddp_stop_worker, args=(port, config, {0: 2 * blocks + 2}), nprocs=2)
    assert [p.name for p in list_checkpoints(tmp_path / "two" / "checkpoints")] == ["step-0000002.safetensors"]
    assert len(logged_losses(tmp_path / "two")) == 2


def test_the_request_is_seen_while_the_main_thread_is_busy():
    """A CUDA backward keeps the main thread in C++, where Python runs no signal handler: the request must
    come from the wakeup byte the C-level handler writes (here the Python handler does nothing)."""
    with StopOnSignal() as stop:
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(500):
            if stop.requested:
                break
            time.sleep(0.01)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL and signal.set_wakeup_fd(-1) == -1


# ---- B6: what training writes, and what reads it ----


def test_a_checkpoint_given_as_lora_says_what_to_pass(cut_run, base):
    _, _, out = cut_run
    with pytest.raises(CheckpointError, match=r"step-0000002.safetensors: a training checkpoint of mmdit train "
                                              r"\(step 2\), not a LoRA file: pass the run's lora.safetensors"):
        convert.load_lora(convert.load_transformer(base), list_checkpoints(out / "checkpoints")[0])


def test_full_training_writes_a_model_folder_the_sampler_reads(tmp_path, base, caplog):
    data = write_dataset(tmp_path / "data", n=2, size=(32, 32))
    cfg = TrainConfig(model=str(DEFAULT_MODEL), data=str(data), output=str(tmp_path / "out"), steps=2, train="full",
                      dtype="float32", mixed_precision="no", device="cpu", progress=False, lr=1e-2)
    result = quiet(train, cfg)
    folder = tmp_path / "out" / "model"
    pipe = load_pipeline(folder)
    mine, trained = pipe.transformer.state_dict(), result.model.state_dict()
    assert mine.keys() == trained.keys() and all(torch.equal(mine[k], trained[k]) for k in mine)
    base_pipe = load_pipeline(DEFAULT_MODEL)
    assert pipe.defaults == base_pipe.defaults  # the base's sampling_defaults (32 px) came along
    assert any(not torch.equal(v, base_pipe.transformer.state_dict()[k]) for k, v in mine.items())
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]
    assert sample_main(["sample", "a red circle", "--model", str(folder), "--steps", "2", "-o",
                        str(tmp_path / "x.png")]) == 0
    assert Image.open(tmp_path / "x.png").size == (256, 256)  # 32 px, shown 8x: the tiny model's defaults

    # a single-file base without its parts beside it: no folder, and the message says how to sample
    caplog.set_level("INFO")
    quiet(train, tiny_config(base, data, tmp_path / "bare", train="full", steps=1), encoders=standin_encoders())
    assert not (tmp_path / "bare" / "model").exists() and (tmp_path / "bare" / "transformer.safetensors").is_file()
    assert "no model folder written: the base" in caplog.text and "has no vae beside it" in caplog.text
    assert "pipe.transformer = convert.load_transformer(" in caplog.text


# ---- C8: training data ----


def _saved(tmp_path, name: str, image: Image.Image) -> Path:
    image.save(tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("kind", ["png-16", "tiff-I", "tiff-F"])
def test_high_bit_depth_greyscale_is_scaled_from_its_range(tmp_path, kind):
    """A 0..65535 gradient (16-bit PNG, 32-bit integer TIFF) or a 0..1 float TIFF spans [-1, 1] (it used to
    be clipped: 98% white)."""
    ramp = np.tile(np.linspace(0, 1, 64), (64, 1))  # (64, 64), columns 0 -> 1
    if kind == "png-16":
        im, name = Image.fromarray(np.round(ramp * 65535).astype(np.uint16)), "g.png"
    elif kind == "tiff-I":
        im, name = Image.fromarray(np.round(ramp * 65535).astype(np.int32)), "g.tif"
    else:
        im, name = Image.fromarray(ramp.astype(np.float32)), "g.tif"
    path = _saved(tmp_path, name, im)
    assert Image.open(path).mode == {"png-16": "I;16", "tiff-I": "I", "tiff-F": "F"}[kind]
    x = load_image(path, 64, buckets=False)  # (3, 64, 64): no resize
    expected = torch.from_numpy(ramp).float() * 2 - 1
    assert x.shape == (3, 64, 64) and all(rel_err(x[c], expected) <= 1e-4 for c in range(3))
    assert (x > 0.99).float().mean() < 0.03  # not clipped to white


def test_transparent_and_cmyk_images(tmp_path):
    """Transparency is composited over white (LA, RGBA, P with a transparent index); CMYK as Pillow converts it."""
    la = Image.new("LA", (16, 16), (0, 0))  # black, fully transparent
    la.paste((0, 255), (0, 0, 8, 16))  # left half: black, opaque
    x = load_image(_saved(tmp_path, "la.png", la), 16, buckets=False)
    assert torch.equal(x[:, :, :8], -torch.ones(3, 16, 8)) and torch.equal(x[:, :, 8:], torch.ones(3, 16, 8))
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 128))  # red at half opacity over white: (255, 127, 127)
    x = load_image(_saved(tmp_path, "rgba.png", rgba), 16, buckets=False)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 127 / 127.5 - 1, 127 / 127.5 - 1]), atol=1 / 127.5)
    p = Image.new("P", (16, 16), 0)
    p.putpalette([0, 0, 0, 0, 0, 255])
    p.paste(1, (0, 0, 16, 8))  # top half blue, bottom half index 0: transparent
    p.info["transparency"] = 0
    x = load_image(_saved(tmp_path, "p.png", p), 16, buckets=False)
    assert torch.equal(x[:, :8], torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1).expand(3, 8, 16))
    assert torch.equal(x[:, 8:], torch.ones(3, 8, 16))
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    x = load_image(_saved(tmp_path, "c.jpg", cmyk), 16, buckets=False)
    assert torch.allclose(x[:, 8, 8], torch.tensor([1.0, -1.0, -1.0]), atol=0.05)


def test_a_caption_that_is_not_utf8_is_skipped_with_its_name(tmp_path):
    data = write_dataset(tmp_path / "data", n=3)
    (data / "1.txt").write_bytes("un caf\xe9 noir".encode("latin-1"))
    (data / "2.txt").write_bytes("\ufeffa caption with a BOM".encode("utf-8"))
    with pytest.warns(UserWarning, match=r"skipping .*1.png: its caption .*1.txt cannot be read as UTF-8"):
        items = scan(data)
    assert [(i.image.name, i.caption) for i in items if i.image.name != "broken.png"] == [
        ("0.png", "pattern number 0 in color"), ("2.png", "a caption with a BOM")]


# ---- C9: after a crash or a full disk ----


def test_stale_temporaries_are_removed_and_a_torn_log_line_dropped(cut_run, caplog):
    full, first, out = cut_run
    stale = [out / "checkpoints" / ".step-0000004.safetensors.k2j4x_9a.tmp", out / ".lora.safetensors.abcdefgh.tmp",
             out / "cache" / ".0123abcd.safetensors.zzzzzzzz.tmp"]
    kept = [out / "notes.tmp", out / ".hidden.tmp", out / "checkpoints" / "step-x.tmp"]
    for p in stale + kept:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * 100)
    (out / ".model.q1w2e3r4.tmp").mkdir()  # a model folder being built
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.4')  # killed while writing: no newline
    caplog.set_level("INFO")
    assert quiet(main, ["--output", str(out), "--resume"]) == 0
    assert not any(p.exists() for p in stale) and not (out / ".model.q1w2e3r4.tmp").exists()
    assert all(p.exists() for p in kept)
    assert "log.jsonl: its last line is incomplete" in caplog.text
    assert logged_losses(out) == full.losses


def test_a_bad_log_line_before_the_last_names_the_log(cut_run, capsys):
    _, _, out = cut_run
    lines = (out / "log.jsonl").read_text().splitlines()
    (out / "log.jsonl").write_text("\n".join([lines[0], "garbage", lines[1]]) + "\n")
    assert quiet(main, ["--output", str(out), "--resume"]) == 2
    assert re.search(r"log.jsonl:2: not a line of mmdit train's log \('garbage'\)", capsys.readouterr().err)


def _full_disk(monkeypatch, where: str, error: Exception):
    """Writes of files whose path contains `where` fail as on a full disk."""
    save_file = convert.files.save_file

    def failing(tensors, path, metadata=None):
        if where in str(path):
            raise error
        return save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(convert.files, "save_file", failing)


@pytest.mark.parametrize("when", ["checkpoint", "caching", "log"])
def test_a_full_disk_gives_one_line_and_exit_code_3(tmp_path, monkeypatch, capsys, when):
    data = write_dataset(tmp_path / "data", n=2, size=(32, 32))
    out = tmp_path / "out"
    if when == "checkpoint":  # safetensors' own error, as it raises it
        _full_disk(monkeypatch, "checkpoints", SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"))
    elif when == "caching":
        _full_disk(monkeypatch, "cache", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    else:
        real_open = open

        def failing_open(path, mode="r", *args, **kw):
            if str(path).endswith("log.jsonl") and "a" in mode:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_open(path, mode, *args, **kw)

        monkeypatch.setattr("builtins.open", failing_open)
    args = ["--model", str(DEFAULT_MODEL), "--data", str(data), "--output", str(out), "--steps", "3", "--rank", "2",
            "--dtype", "float32", "--mixed-precision", "no", "--device", "cpu", "--no-progress", "--checkpoint-every", "1"]
    assert quiet(main, args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    named = {"checkpoint": "checkpoints/step-0000001.safetensors", "caching": "/cache/", "log": "log.jsonl"}[when]
    assert err[0].startswith("mmdit train: ") and named in err[0] and ": cannot write: " in err[0]
    assert not [p for p in out.rglob("*.tmp")]  # nothing half-written is left
