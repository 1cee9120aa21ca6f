"""`python -m convert inspect` describes every kind of file the project loads (values read off the files
written here), and refuses anything else by name."""

import json
import re
from pathlib import Path

import torch
from builders import TINY_FLUX, flux_state
from safetensors.torch import save_file
from test_bad_files import nf4_file

from convert.__main__ import main
from mmdit.autoencoder import AutoEncoder, preset
from mmdit.clip import CLIPConfig, CLIPTextEncoder
from mmdit.t5 import T5Config, T5Encoder

H = TINY_FLUX.hidden_size
T5 = T5Config(vocab_size=24, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2, num_buckets=8)


def state(module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def field(out: str, name: str, value) -> bool:
    """`  name: value` in the output (any alignment)."""
    return re.search(rf"^  {re.escape(name)}:\s+{re.escape(str(value))}$", out, re.M) is not None


def inspect(path, capsys) -> str:
    assert main(["inspect", str(path)]) == 0
    return capsys.readouterr().out


def test_encoders_autoencoders_and_bundles(tmp_path, capsys):
    save_file(state(T5Encoder(T5)), tmp_path / "t5xxl.safetensors")
    out = inspect(tmp_path / "t5xxl.safetensors", capsys)
    assert "t5xxl.safetensors: T5 encoder" in out and field(out, "d_model", "32") and field(out, "num_layers", "2")

    clip = tmp_path / "text_encoder"
    clip.mkdir()
    save_file(state(CLIPTextEncoder(CLIPConfig(vocab_size=20, max_positions=8, width=64, layers=3, heads=2, mlp_dim=96,
                                               act="gelu"))), clip / "model.safetensors")
    (clip / "config.json").write_text(json.dumps({"hidden_act": "gelu", "num_attention_heads": 2}))
    out = inspect(clip, capsys)
    assert "CLIP text encoder" in out and field(out, "width", "64") and field(out, "heads", "2") and field(out, "layers", "3")

    vae = tmp_path / "vae"
    vae.mkdir()
    ae = state(AutoEncoder(preset("flux", ch=32, ch_mult=(1, 2), num_res_blocks=1)))
    save_file(ae, vae / "diffusion_pytorch_model.safetensors")
    out = inspect(vae, capsys)
    assert "an autoencoder" in out and field(out, "ch_mult", "[1, 2]") and field(out, "latent channels", "16")

    bundle = {f"model.diffusion_model.{k}": v for k, v in flux_state().items()}
    bundle |= {f"text_encoders.t5xxl.transformer.{k}": v for k, v in state(T5Encoder(T5)).items()}
    bundle |= {f"vae.{k}": v for k, v in ae.items()}
    save_file(bundle, tmp_path / "all.safetensors")
    out = inspect(tmp_path / "all.safetensors", capsys)
    assert "a transformer" in out and "family:     flux" in out and "depth = 2" in out
    assert "T5 encoder" in out and field(out, "prefix", "text_encoders.t5xxl.transformer.") and "an autoencoder" in out


def test_lora_and_quantized_files(tmp_path, capsys):
    lora = {}
    for i, (mod, rank) in enumerate([("double_blocks_0_img_attn_qkv", 4), ("double_blocks_1_txt_attn_proj", 4),
                                     ("single_blocks_0_linear1", 8)]):
        rows = {"double_blocks_0_img_attn_qkv": 3 * H, "single_blocks_0_linear1": 7 * H}.get(mod, H)
        lora |= {f"lora_unet_{mod}.lora_down.weight": torch.zeros(rank, H),
                 f"lora_unet_{mod}.lora_up.weight": torch.zeros(rows, rank),
                 f"lora_unet_{mod}.alpha": torch.tensor(float(rank if i else 0))}
    lora["lora_unet_double_blocks_0_img_attn_proj.diff_b"] = torch.zeros(H)
    lora["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 8)
    lora["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(8, 2)
    save_file(lora, tmp_path / "style.safetensors", {"ss_network_dim": "4"})
    out = inspect(tmp_path / "style.safetensors", capsys)
    assert "style.safetensors: a LoRA file" in out and field(out, "format", "kohya")
    assert field(out, "targets", "flux: 4 of 4 module(s) match flux-dev's layout")
    assert field(out, "rank", "4 (x2), 8 (x1)") and field(out, "alpha", "0 (x1), 4 (x1), 8 (x1) (0 reads as the rank: kohya)")
    assert field(out, "full-weight deltas", "1 .diff_b") and field(out, "text encoders", "clip_l: 1 module(s)")
    assert "ss_network_dim=4" in out

    out = inspect(nf4_file(tmp_path / "nf4.safetensors"), capsys)
    assert "nf4.safetensors: a quantized file" in out and field(out, "quantization", "bitsandbytes NF4: not read")

    save_file({"model.layers.0.mlp.weight": torch.zeros(2, 2)}, tmp_path / "llm.safetensors")
    assert main(["inspect", str(tmp_path / "llm.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "llm.safetensors: not a file this project loads" in err and "model.layers.0.mlp.weight" in err


def test_the_shipped_tiny_model_folders(capsys):
    """Each folder of assets/tiny-flux that `inspect` names inside the pipeline folder is described alone too;
    a JSON file is refused as not safetensors, not as a pickle, in one line that names the command."""
    root = Path(__file__).resolve().parents[1] / "assets" / "tiny-flux"
    whole = inspect(root, capsys)
    assert f"{root / 'vae'}: no weights (PixelCodec)" in whole
    assert inspect(root / "vae", capsys).strip() == f"{root / 'vae'}: no weights (PixelCodec)"
    assert field(inspect(root / "transformer", capsys), "family", "flux")
    assert main(["inspect", str(root / "model_index.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m convert inspect: ") and "no safetensors header" in err and "pickled" not in err
