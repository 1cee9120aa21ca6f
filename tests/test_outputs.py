"""Where outputs go: `write_atomic` leaves what a plain `open()` would (its mode, the umask, a FIFO or a
device written through), and `mmdit sample` / `mmdit probe` check the destination before any work."""

from __future__ import annotations

import errno
import os
import stat
import threading

import pytest
import torch
from PIL import Image

from convert.files import save_safetensors_atomic, write_atomic
from sampling.cli import main

PROMPT = "a red circle"


@pytest.fixture
def umask():
    """Set the process umask for the test; restored after."""
    before = os.umask(0o022)
    yield os.umask
    os.umask(before)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def write_text(text: str):
    def to(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    return to


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_the_mode_open_gives(umask, tmp_path, mask, expected):
    umask(mask)
    write_atomic(tmp_path / "notes.txt", write_text("a"))
    save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: a plain open()
        f.write("a")
    assert mode(tmp_path / "plain.txt") == expected
    assert mode(tmp_path / "notes.txt") == mode(tmp_path / "w.safetensors") == expected


def test_a_replaced_file_keeps_its_mode(umask, tmp_path):
    target = tmp_path / "out.png"
    target.write_text("old")
    os.chmod(target, 0o644)
    umask(0o077)
    write_atomic(target, write_text("new"))
    assert target.read_text() == "new" and mode(target) == 0o644  # as open(target, "w") would leave it
    os.chmod(target, 0o640)
    save_safetensors_atomic({"a": torch.zeros(2)}, target)
    assert mode(target) == 0o640 and os.listdir(tmp_path) == ["out.png"]


def test_a_symlink_is_followed_and_kept(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    write_atomic(link, write_text("new"))
    assert link.is_symlink() and real.read_text() == "new"


def test_a_fifo_is_written_through_not_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    write_atomic(fifo, lambda name: open(name, "wb").write(b"through"))
    reader.join(10)
    assert got == [b"through"] and stat.S_ISFIFO(os.stat(fifo).st_mode) and os.listdir(tmp_path) == ["pipe"]


def test_a_device_is_written_through(tmp_path):
    null = tmp_path / "null"
    try:
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # /dev/null's numbers, in a scratch folder
    except OSError:
        pytest.skip("cannot make a device node here")
    write_atomic(null, write_text("gone"))
    assert stat.S_ISCHR(os.stat(null).st_mode) and os.listdir(tmp_path) == ["null"]


def test_errors_name_the_file_not_the_temporary_one(tmp_path):
    def full(tmp: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match=rf"No space left on device: '{tmp_path / 'out.png'}'") as error:
        write_atomic(tmp_path / "out.png", full)
    assert ".tmp" not in str(error.value) and os.listdir(tmp_path) == []
    with pytest.raises(NotADirectoryError, match=r"/dev/null/x.png: /dev/null is not a folder"):
        write_atomic("/dev/null/x.png", write_text("a"))
    with pytest.raises(IsADirectoryError, match="is a folder"):
        write_atomic(tmp_path, write_text("a"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_file_open_could_not_write_is_refused(tmp_path):
    target = tmp_path / "locked.txt"
    target.write_text("keep")
    os.chmod(target, 0o444)
    with pytest.raises(PermissionError, match="not writable"):
        write_atomic(target, write_text("new"))
    assert target.read_text() == "keep"


# ---- the CLI: the destination is checked before any work ----


@pytest.fixture
def never_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr("sampling.cli.load_pipeline", refuse)


def unwritable_folder(tmp_path):
    """A folder no file can be created in: read-only for a user; for root, sysfs's top."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        os.chmod(folder, 0o555)
        return folder
    try:
        os.close(os.open("/sys/.taca-mmdit-check", os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    except OSError:
        return "/sys"
    os.unlink("/sys/.taca-mmdit-check")
    pytest.skip("no unwritable folder for root here")


@pytest.mark.parametrize("output,message", [
    ("bad.jpg", "the output is written as PNG: name it *.png"),
    ("noext", "name it *.png"),
    ("/dev/null/x.png", "/dev/null/x.png: /dev/null is not a folder"),
    (".", "is a folder"),
])
def test_sample_refuses_a_bad_output_before_loading(output, message, never_loads, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sample", PROMPT, "-o", output]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmdit sample: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert os.listdir(tmp_path) == []


def test_an_unwritable_folder_is_found_before_the_work(never_loads, tmp_path, capsys):
    folder = unwritable_folder(tmp_path)
    for command, name in (("sample", "x.png"), ("probe", "x.csv")):
        assert main([command, PROMPT, "-o", f"{folder}/{name}"]) == 2
        err = capsys.readouterr().err
        assert f"{folder}/{name}: cannot write a file in {folder}" in err and ".check" not in err


def test_probe_needs_a_csv_name(never_loads, tmp_path, capsys):
    assert main(["probe", PROMPT, "-o", str(tmp_path / "x.png")]) == 2  # the heat map would overwrite the CSV
    assert "name it *.csv" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe")
    assert main(["probe", PROMPT, "-o", str(tmp_path / "pipe")]) == 2
    assert "not a regular file; name a .csv file" in capsys.readouterr().err


def test_sample_writes_through_a_fifo_and_keeps_a_files_mode(umask, tmp_path, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    reader.start()
    assert main(["sample", PROMPT, "--steps", "1", "--seed", "0", "-o", str(fifo)]) == 0
    reader.join(30)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and got and got[0].startswith(b"\x89PNG")
    assert f"wrote {fifo}" in capsys.readouterr().err  # the report goes to stderr, not into the stream
    target = tmp_path / "out.png"
    target.write_bytes(b"")
    os.chmod(target, 0o644)
    umask(0o077)
    assert main(["sample", PROMPT, "--steps", "1", "--seed", "0", "-o", str(target)]) == 0
    assert mode(target) == 0o644 and Image.open(target).text["seed"] == "0"
    fresh = tmp_path / "fresh.png"
    assert main(["sample", PROMPT, "--steps", "1", "--seed", "0", "-o", str(fresh)]) == 0
    assert mode(fresh) == 0o600 and sorted(os.listdir(tmp_path)) == ["fresh.png", "out.png", "pipe"]
