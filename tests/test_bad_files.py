"""Bad files, each refused with one error naming the file (and the key or field): broken safetensors
structure (at least what the safetensors library refuses), quantized formats we do not read (detected
before any shape is read), integer tensors where weights are floats, malformed or mistyped JSON configs.
ComfyUI's newer fp8 layout (`comfy_quant` + `weight_scale`) is read: W = W_fp8 * weight_scale."""

import json
import struct

import pytest
import torch
from builders import TINY_FLUX, flux_state, rel_err
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import convert
from convert import CheckpointError, load_autoencoder, load_text_encoder, load_tokenizer, load_transformer
from convert.errors import UnsupportedQuantization
from convert.files import Checkpoint
from mmdit.autoencoder import AutoEncoder, preset
from mmdit.clip import CLIPConfig, CLIPTextEncoder
from mmdit.flux import Flux
from mmdit.t5 import T5Config, T5Encoder

H = TINY_FLUX.hidden_size


def raw_file(path, header: dict, data: bytes, header_bytes: bytes | None = None):
    h = header_bytes if header_bytes is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
BROKEN = {  # name -> (header, data, what the error names)
    "entry-not-object": ({"w": 5}, b"\0" * 8, r"the entry of key 'w' is not a JSON object"),
    "no-data-offsets": ({"w": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, r"key 'w' has no data_offsets"),
    "no-dtype": ({"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, r"key 'w' has no dtype"),
    "no-shape": ({"w": {"dtype": "F32", "data_offsets": [0, 8]}}, b"\0" * 8, r"key 'w' has no shape"),
    "float-shape": ({"w": {**F32, "shape": [2.0]}}, b"\0" * 8, r"key 'w' has shape \[2\.0\]"),
    "negative-offsets": ({"w": {**F32, "data_offsets": [-8, 0]}}, b"\0" * 8, r"key 'w' has data_offsets \[-8, 0\]"),
    "shared-bytes": ({"a": F32, "b": F32}, b"\0" * 8, r"keys 'a' and 'b' share bytes \[0, 8\)"),
    "gap": ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, r"bytes \[0, 4\) before key 'w'"),
    "trailing-bytes": ({"w": F32}, b"\0" * 12, r"its last 4 bytes belong to no tensor"),
    "size-mismatch": ({"w": {**F32, "shape": [3]}}, b"\0" * 8, r"key 'w' has data_offsets \[0, 8\] \(8 bytes\), but its shape"),
    "unknown-dtype": ({"w": {**F32, "dtype": "Q4"}}, b"\0" * 8, r"key 'w' has dtype 'Q4'"),
    "metadata-not-strings": ({"__metadata__": {"x": 1}, "w": F32}, b"\0" * 8, r"its __metadata__ is not a map of strings"),
    "truncated": ({"w": {**F32, "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, r"truncated file: key 'w' ends"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_structure_is_refused_like_the_library_does(tmp_path, name):
    header, data, message = BROKEN[name]
    path = raw_file(tmp_path / f"{name}.safetensors", header, data)
    with pytest.raises(SafetensorError):  # the library refuses it too: we validate at least what it validates
        with safe_open(path, "pt"):
            pass
    with pytest.raises(CheckpointError, match=rf"{name}\.safetensors: .*{message}"):
        Checkpoint.open(path)


def test_duplicate_keys_and_zero_copy_kept(tmp_path):
    h = b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    with pytest.raises(CheckpointError, match=r"dup\.safetensors: .*key 'w' appears twice"):
        Checkpoint.open(raw_file(tmp_path / "dup.safetensors", {}, b"\0" * 8, h))
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}, tmp_path / "ok.safetensors")
    t = Checkpoint.open(tmp_path / "ok.safetensors").load("a")
    assert torch.equal(t, torch.arange(6.0).reshape(2, 3)) and t.untyped_storage().nbytes() < 4096  # a mapped view


# ---- quantized files ----


def nf4_file(path, fmt="nf4"):
    """A bitsandbytes 4-bit FLUX file as `Linear4bit._save_to_state_dict` writes it (bitsandbytes `nn/modules.py`)."""
    sd = flux_state()
    w = "double_blocks.0.img_attn.qkv.weight"
    sd[w] = torch.zeros(sd[w].numel() // 2, 1, dtype=torch.uint8)
    sd |= {f"{w}.absmax": torch.ones(8), f"{w}.quant_map": torch.ones(16),
           f"{w}.quant_state.bitsandbytes__{fmt}": torch.zeros(10, dtype=torch.uint8)}
    sd["img_in.weight"] = torch.zeros(sd["img_in.weight"].numel() // 2, 1, dtype=torch.uint8)  # packed: 32 "channels"
    save_file(sd, path)
    return path


QUANTIZED = {  # name -> (extra tensors on a FLUX file, the format the error names)
    "bnb-int8": ({"double_blocks.0.img_attn.qkv.SCB": torch.ones(3 * H),
                  "double_blocks.0.img_attn.qkv.weight_format": torch.tensor(0, dtype=torch.uint8)}, "bitsandbytes int8"),
    "quanto": ({"double_blocks.0.img_attn.qkv.weight._data": torch.zeros(2, dtype=torch.int8),
                "double_blocks.0.img_attn.qkv.weight._scale": torch.ones(1)}, "optimum-quanto"),
    "torchao": ({"double_blocks.0.img_attn.qkv._weight_qdata": torch.zeros(2, dtype=torch.int8)}, "torchao"),
    "gptq": ({"double_blocks.0.img_attn.qkv.qweight": torch.zeros(2, dtype=torch.int32)}, "GPTQ/AWQ"),
    "fp8-block": ({"double_blocks.0.img_attn.qkv.weight_scale_inv": torch.ones(2, 2)}, r"block-scaled fp8"),
    "weight-scale": ({"double_blocks.0.img_attn.qkv.weight_scale": torch.ones(())}, r"an fp8 `weight_scale` without a `comfy_quant`"),
    "nvfp4": ({"double_blocks.0.img_attn.qkv.comfy_quant": torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8),
               "double_blocks.0.img_attn.qkv.weight_scale": torch.ones(())}, r"ComfyUI mixed precision 'nvfp4'"),
}


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_bitsandbytes_4bit_is_named_before_any_shape_is_read(tmp_path, fmt):
    path = nf4_file(tmp_path / f"flux-{fmt}.safetensors", fmt)
    for load in (load_transformer, load_text_encoder, load_autoencoder):
        with pytest.raises(UnsupportedQuantization, match=rf"flux-{fmt}\.safetensors: quantized with bitsandbytes "
                           rf"{fmt.upper()} \(key '.*bitsandbytes__{fmt}'\).*reads bf16/fp16/fp32 weights, float8_e4m3fn"):
            load(path)
    model = Flux(TINY_FLUX)
    model.family, model.params = "flux", TINY_FLUX
    with pytest.raises(UnsupportedQuantization, match="bitsandbytes"):
        convert.load_lora(model, path)


@pytest.mark.parametrize("name", list(QUANTIZED))
def test_other_quantizations_are_named(tmp_path, name):
    extra, message = QUANTIZED[name]
    save_file(flux_state() | extra, tmp_path / f"{name}.safetensors")
    with pytest.raises(UnsupportedQuantization, match=rf"{name}\.safetensors: quantized with {message}"):
        load_transformer(tmp_path / f"{name}.safetensors")


def test_gguf_is_recognized(tmp_path):
    (tmp_path / "flux1-dev-Q4_K_S.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    with pytest.raises(UnsupportedQuantization, match=r"Q4_K_S\.gguf: quantized with GGUF .*a GGUF file, not safetensors"):
        load_transformer(tmp_path / "flux1-dev-Q4_K_S.gguf")


@pytest.mark.parametrize("where", ["markers", "header"])
def test_comfy_quant_fp8_is_dequantized(tmp_path, where):
    """ComfyUI `comfy/ops.py` mixed precision: `<layer>.comfy_quant` {"format": "float8_e4m3fn"} (or the
    header's `_quantization_metadata`) + one `weight_scale`: W = W_fp8 * weight_scale (`TensorCoreFP8Layout`)."""
    sd = flux_state()
    layers = ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear2"]
    quant, expected, metadata = {}, dict(sd), {}
    for i, layer in enumerate(layers):
        w = sd[f"{layer}.weight"]
        scale = w.abs().max() / 448
        w8 = (w / scale).to(torch.float8_e4m3fn)
        quant |= {f"{layer}.weight": w8, f"{layer}.weight_scale": scale.reshape(()), f"{layer}.input_scale": torch.ones(())}
        if where == "markers":
            quant[f"{layer}.comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
        expected[f"{layer}.weight"] = w8.float() * scale
    if where == "header":
        metadata = {"_quantization_metadata": json.dumps({"layers": {k: {"format": "float8_e4m3fn"} for k in layers}})}
    save_file(sd | quant, tmp_path / "q.safetensors", metadata)
    ckpt = Checkpoint.open(tmp_path / "q.safetensors")
    assert ckpt.quantization == "ComfyUI mixed precision (float8_e4m3fn)"
    assert "double_blocks.0.img_attn.qkv.comfy_quant" not in ckpt and "single_blocks.1.linear2.weight_scale" not in ckpt
    model = load_transformer(tmp_path / "q.safetensors", dtype=torch.float32)
    got = model.state_dict()
    assert all(rel_err(got[k], expected[k]) == 0 for k in expected)


# ---- integer tensors where weights are floats ----


def test_integer_weights_are_named(tmp_path):
    sd = flux_state()
    sd["double_blocks.1.txt_mlp.0.weight"] = sd["double_blocks.1.txt_mlp.0.weight"].to(torch.int32)
    save_file(sd, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match=r"int\.safetensors: key 'double_blocks\.1\.txt_mlp\.0\.weight' is stored as int32"):
        load_transformer(tmp_path / "int.safetensors")

    t5 = {k: v.clone() for k, v in T5Encoder(T5Config(vocab_size=16, d_model=16, d_kv=4, num_heads=4, d_ff=32,
                                                       num_layers=1, num_buckets=8)).state_dict().items()}
    t5["encoder.block.0.layer.0.SelfAttention.q.weight"] = torch.ones(16, 16, dtype=torch.int8)
    save_file(t5, tmp_path / "t5.safetensors")
    message = r"t5\.safetensors: key 'encoder\.block\.0\.layer\.0\.SelfAttention\.q\.weight' is stored as int8"
    with pytest.raises(CheckpointError, match=message):
        load_text_encoder(tmp_path / "t5.safetensors")

    ae = {k: v.clone() for k, v in AutoEncoder(preset("flux", ch=32, ch_mult=(1, 2), num_res_blocks=1)).state_dict().items()}
    ae["decoder.conv_in.bias"] = ae["decoder.conv_in.bias"].to(torch.int64)
    save_file(ae, tmp_path / "ae.safetensors")
    with pytest.raises(CheckpointError, match=r"ae\.safetensors: key 'decoder\.conv_in\.bias' is stored as int64"):
        load_autoencoder(tmp_path / "ae.safetensors")


# ---- configs ----


def test_transformer_config_errors_name_file_and_field(tmp_path):
    folder = tmp_path / "transformer"
    folder.mkdir()
    from builders import flux_bfl_to_diffusers

    save_file(flux_bfl_to_diffusers(flux_state(), TINY_FLUX), folder / "diffusion_pytorch_model.safetensors")
    config = {"_class_name": "FluxTransformer2DModel", "num_attention_heads": "4", "attention_head_dim": 64}
    for value, message in [
        ('{"num_layers": 2,', r"config\.json: not valid JSON"),
        ("[]", r"config\.json: not a JSON object"),
        (json.dumps(config), r"config\.json: field 'num_attention_heads' is '4', expected an integer"),
        (json.dumps({**config, "num_attention_heads": 4, "axes_dims_rope": "16,24,24"}), r"field 'axes_dims_rope' is '16,24,24'"),
        (json.dumps({**config, "num_attention_heads": 4, "guidance_embeds": "yes"}),
         r"field 'guidance_embeds' is 'yes', expected true or false"),
    ]:
        (folder / "config.json").write_text(value)
        with pytest.raises(CheckpointError, match=message):
            load_transformer(tmp_path)
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3}))  # 3 * 64 is not FLUX's head layout
    with pytest.raises(CheckpointError, match=r"transformer: its shapes and config give an invalid model"):
        load_transformer(tmp_path)


def test_component_config_errors_name_file_and_field(tmp_path):
    clip = tmp_path / "text_encoder"
    clip.mkdir()
    enc = CLIPTextEncoder(CLIPConfig(vocab_size=20, max_positions=8, width=32, layers=1, heads=2, mlp_dim=64))
    save_file({k: v.clone() for k, v in enc.state_dict().items()}, clip / "model.safetensors")
    (clip / "config.json").write_text(json.dumps({"hidden_act": "quick_gelu", "num_attention_heads": [2]}))
    with pytest.raises(CheckpointError, match=r"text_encoder/config\.json: field 'num_attention_heads' is \[2\]"):
        load_text_encoder(clip)

    vae = tmp_path / "vae"
    vae.mkdir()
    ae = AutoEncoder(preset("flux", ch=32, ch_mult=(1, 2), num_res_blocks=1))
    save_file({k: v.clone() for k, v in ae.state_dict().items()}, vae / "diffusion_pytorch_model.safetensors")
    (vae / "config.json").write_text(json.dumps({"scaling_factor": "0.3611"}))
    with pytest.raises(CheckpointError, match=r"vae/config\.json: field 'scaling_factor' is '0\.3611', expected a number"):
        load_autoencoder(vae)

    tok = tmp_path / "tokenizer"
    tok.mkdir()
    (tok / "vocab.json").write_text(json.dumps({"a</w>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": "77"}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: field 'model_max_length' is '77'"):
        load_tokenizer(tok)
    (tok / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": ["!"]}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: field 'pad_token' is \['!'\]"):
        load_tokenizer(tok)

    index = {"weight_map": ["model-1.safetensors"]}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: field 'weight_map' is \["):
        Checkpoint.open(tmp_path / "model.safetensors.index.json")


def test_model_index_errors_name_the_file(tmp_path):
    from sampling.parts import model_index

    (tmp_path / "model_index.json").write_text('{"transformer": ')
    with pytest.raises(CheckpointError, match=r"model_index\.json: not valid JSON"):
        model_index(tmp_path)
