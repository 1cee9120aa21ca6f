"""The safetensors layer every loader shares: lazy, strict, never unpickling, never half-writing."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from convert.files import (
    Checkpoint,
    CheckpointError,
    Shapes,
    load_state_dict_strict,
    read_config,
    read_header,
    save_safetensors_atomic,
    write_atomic,
)


@pytest.fixture
def ckpt_path(tmp_path):
    tensors = {
        "model.diffusion_model.a.weight": torch.arange(12.0).reshape(3, 4),
        "model.diffusion_model.b": torch.ones(5, dtype=torch.bfloat16),
        "vae.c": torch.zeros(2, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "m.safetensors", metadata={"note": "x"})
    return tmp_path / "m.safetensors"


def test_lazy_view_and_prefixes(ckpt_path, monkeypatch):
    ckpt = Checkpoint.open(ckpt_path)
    assert ckpt.metadata == {"note": "x"} and len(ckpt) == 3
    import convert.files as files

    monkeypatch.setattr(files, "_read", None)  # membership, shapes and dtypes must not read tensors
    assert "vae.c" in ckpt and "nope" not in ckpt
    assert ckpt.shape("model.diffusion_model.a.weight") == [3, 4] and ckpt.dtype("vae.c") == torch.float16
    monkeypatch.undo()
    view = ckpt.with_prefix("model.diffusion_model.")
    assert sorted(view) == ["a.weight", "b"]
    assert sorted(ckpt.part(["diffusion_model.", "model.diffusion_model."])) == ["a.weight", "b"]  # first found
    assert ckpt.part(["first_stage_model."]) is None
    assert sorted(ckpt.without_prefixes(["vae."])) == ["model.diffusion_model.a.weight", "model.diffusion_model.b"]
    assert torch.equal(view.load("a.weight"), torch.arange(12.0).reshape(3, 4))
    assert view.load("b", torch.float32).dtype == torch.float32
    assert ckpt.storage_dtype() == torch.float32  # 12 fp32 values outnumber 5 bf16 and 2 fp16


def test_loaded_tensors_are_copy_on_write(ckpt_path):
    before = ckpt_path.read_bytes()
    t = Checkpoint.open(ckpt_path).load("model.diffusion_model.a.weight")
    t.add_(100)  # e.g. a LoRA merged in place
    assert ckpt_path.read_bytes() == before
    assert torch.equal(Checkpoint.open(ckpt_path).load("model.diffusion_model.a.weight"), torch.arange(12.0).reshape(3, 4))


def test_refuses_what_is_not_safetensors(tmp_path):
    import pickle

    (tmp_path / "p.ckpt").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="not a safetensors file .pickled"):
        read_header(tmp_path / "p.ckpt")
    (tmp_path / "weights").write_bytes(pickle.dumps({"a": 1}))  # known by its first byte, whatever its name
    with pytest.raises(CheckpointError, match="not a safetensors file .pickled"):
        read_header(tmp_path / "weights")
    (tmp_path / "config.json").write_text('{"_class_name": "FluxTransformer2DModel", "num_layers": 19}')
    with pytest.raises(CheckpointError, match=r"config.json: not a safetensors file \(no safetensors header"):
        read_header(tmp_path / "config.json")  # not told to convert a pickle it is not
    (tmp_path / "j.safetensors").write_bytes(len(b"[1]").to_bytes(8, "little") + b"[1]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_header(tmp_path / "j.safetensors")


def test_truncated_and_sharded(tmp_path, ckpt_path):
    data = ckpt_path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-20])
    with pytest.raises(CheckpointError, match="truncated"):
        Checkpoint.open(tmp_path / "t.safetensors").load("vae.c", torch.float32)
    index = {"weight_map": {"x": "s-1.safetensors", "y": "s-2.safetensors"}}
    (tmp_path / "i.safetensors.index.json").write_text(json.dumps(index))
    save_file({"x": torch.ones(1)}, tmp_path / "s-1.safetensors")
    with pytest.raises(CheckpointError, match="shard file.*s-2.safetensors"):
        Checkpoint.open(tmp_path / "i.safetensors.index.json")
    save_file({"y": torch.zeros(1), "x": torch.ones(1)}, tmp_path / "s-2.safetensors")
    with pytest.raises(CheckpointError, match="'x' also appears"):
        Checkpoint.open(tmp_path / "i.safetensors.index.json")


def test_strict_load_names_keys_and_leaves_module_untouched():
    m = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(CheckpointError, match="missing 1 key.*bias"):
        load_state_dict_strict(m, {"weight": torch.zeros(2, 3)}, "linear", "src")
    with pytest.raises(CheckpointError, match=r"'weight' has shape \[3, 3\].*expects \[2, 3\]"):
        load_state_dict_strict(m, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "linear", "src")
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_atomic_save_leaves_no_partial_file(tmp_path, monkeypatch):
    import convert.files as files

    save_safetensors_atomic({"a": torch.ones(2)}, tmp_path / "out.safetensors")
    good = (tmp_path / "out.safetensors").read_bytes()

    def broken(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(files, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == good
    assert os.listdir(tmp_path) == ["out.safetensors"]


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "new" / "notes.txt"  # the folder is created

    def write(text):
        def to(tmp):
            assert os.path.dirname(tmp) == str(target.parent) and tmp != str(target)  # beside, never in place
            with open(tmp, "w") as f:
                f.write(text)
        return to

    write_atomic(target, write("first"))
    assert target.read_text() == "first"

    def fails(tmp):
        write("half")(tmp)
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        write_atomic(target, fails)
    assert target.read_text() == "first" and os.listdir(target.parent) == ["notes.txt"]
    write_atomic(target, write("second"))
    assert target.read_text() == "second" and os.listdir(target.parent) == ["notes.txt"]


def test_read_config_names_the_file(tmp_path):
    assert read_config(tmp_path / "config.json") is None  # absent: None, for the optional config.json
    (tmp_path / "config.json").write_text('{"num_layers": 2}')
    assert read_config(tmp_path / "config.json") == {"num_layers": 2}
    (tmp_path / "bad.json").write_text('{"num_layers": 2,')
    with pytest.raises(CheckpointError, match=r"bad\.json: not valid JSON"):
        read_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"list\.json: not a JSON object"):
        read_config(tmp_path / "list.json")


def test_shapes_name_what_lacks_a_key_or_a_block():
    shape = Shapes({"blocks.0.w": [2], "blocks.1.w": [2], "blocks.3.w": [2], "other.w": [3]}, "my.safetensors")
    assert shape["other.w"] == [3] and "nope" not in shape and shape.get("nope") is None
    with pytest.raises(CheckpointError, match="my.safetensors lacks key 'nope'"):
        shape["nope"]
    assert shape.block_indices(r"blocks\.(\d+)\.") == {0, 1, 3}
    assert Shapes({"b.0.w": [1], "b.1.w": [1]}, "x").count_blocks(r"b\.(\d+)\.") == 2
    with pytest.raises(CheckpointError, match=r"my.safetensors: block indices are not contiguous: \[0, 1, 3\]"):
        shape.count_blocks(r"blocks\.(\d+)\.")


def test_float8_files_load_as_bfloat16(tmp_path):
    save_file({"w": torch.ones(4, 4).to(torch.float8_e4m3fn), "b": torch.ones(4)}, tmp_path / "f8.safetensors")
    ckpt = Checkpoint.open(tmp_path / "f8.safetensors")
    assert ckpt.storage_dtype() == torch.float8_e4m3fn and ckpt.load_dtype() == torch.bfloat16
    save_file({"w": torch.ones(4, 4, dtype=torch.float16)}, tmp_path / "f16.safetensors")
    assert Checkpoint.open(tmp_path / "f16.safetensors").load_dtype() == torch.float16
