"""Build and train the tiny FLUX-architecture model shipped in assets/tiny-flux (the default of `mmdit sample`).

    python -m scripts.train_tiny                # the recorded run: data, initial model, two stages, assets/tiny-flux

Every part is the project's own code at toy size, in a Diffusers-style folder that `load_pipeline` reads:
- `transformer/`: `mmdit.flux.Flux` (BFL keys), 48 input channels (2x2 patches of 12), no guidance
  embedding; trained from a seeded random init by `training.train` with `train="full"`, in two stages:
  1. `RECIPE`: 32x32 scenes only;
  2. `RECIPE_SIZES`: from stage 1's weights, scenes at the four `SIZES` (32x32, 64x64, 64x32, 32x64), each
     image at its own size (`native_size`), one caption in ten dropped to the empty one (`caption_dropout`)
     so that the model samples with true CFG against the empty caption (`SAMPLING_DEFAULTS`);
- `text_encoder_2/` + `tokenizer_2/`: a 2-layer T5 v1.1 encoder (`mmdit.t5`, Hugging Face keys), random
  and frozen, with a word-level sentencepiece model of the captions' 16 words. Its relative-position
  bias is drawn large so each word's state carries its neighbours (which color goes with which shape)
  and its place in the caption (which object comes first): FLUX gives every text token position 0;
- no CLIP (`model_index.json` marks `text_encoder` null): the pooled vector is zeros, so the text
  reaches the image through the joint attention only, exactly where TACA acts;
- `vae/`: the weightless `PixelCodec` (mmdit/pixel_codec.py): W x H images are 12 x H/2 x W/2 latents.

Data: scripts/scenes.py (the held-out layouts never appear). Everything is seeded; on another
machine the same command gives the same data and, up to floating-point summation order, the same model.
`--stage1 FOLDER` starts stage 2 from a finished stage-1 model folder (how the shipped weights were made:
from the previous version of assets/tiny-flux, stage 1's output).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
from safetensors.torch import load_file
from torch import nn

from convert.files import save_safetensors_atomic
from convert.flux import default_axes
from mmdit.flux import Flux, FluxParams
from mmdit.pixel_codec import PixelCodec
from mmdit.t5 import T5Config, T5Encoder

from scripts import scenes
from training import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets" / "tiny-flux"
# stage 1, 32x32: every weight trains from a random init, float32 on the CPU, uniform t, cosine learning rate
RECIPE = dict(train="full", resolution=scenes.SIZE, batch_size=64, steps=3000, lr=1e-3, warmup_steps=100,
              lr_schedule="cosine", weight_decay=0.0, timesteps="uniform", taca_gamma=1.0, dtype="float32",
              mixed_precision="no", device="cpu", checkpoint_every=500, seed=0)
# stage 2, several sizes: from stage 1's weights, each image at its own size (one size per batch), and one
# caption in ten dropped to the empty one so that the model also learns the unconditional velocity (true CFG)
RECIPE_SIZES = dict(train="full", native_size=True, batch_size=32, steps=3500, lr=5e-4, warmup_steps=50,
                    lr_schedule="cosine", weight_decay=0.0, timesteps="uniform", caption_dropout=0.1, taca_gamma=1.0,
                    dtype="float32", mixed_precision="no", device="cpu", checkpoint_every=250, seed=0)
# stage 2's scenes: (width, height) -> (placements per training caption, single objects per (color, shape));
# batches per epoch follow the counts: 60% of the batches at 32x32 (where the model is scored), 20% at 64x64
# (a batch costs about 10x one at 32x32 on the CPU), 10% at each of 64x32 and 32x64
SIZES = {(32, 32): (6, 30), (64, 64): (2, 10), (64, 32): (1, 5), (32, 64): (1, 5)}
# model_index.json's: `mmdit sample` draws 32x32 by default, shown 8x, with true CFG against the empty
# caption; sizes other than those trained at warn
STAGE1_DEFAULTS = {"steps": 20, "guidance": 0.0, "size": scenes.SIZE, "upscale": 8, "trained_sizes": ["32x32"]}
SAMPLING_DEFAULTS = {"steps": 20, "guidance": 0.0, "size": scenes.SIZE, "upscale": 8, "true_cfg": 4.5, "negative": "",
                     "trained_sizes": [f"{w}x{h}" for w, h in SIZES]}


@dataclass(frozen=True)
class TinySpec:
    """The sizes of the tiny model."""

    hidden: int = 128
    heads: int = 4
    depth: int = 3  # double-stream blocks
    depth_single: int = 3
    vec_in_dim: int = 16  # the pooled vector (zeros: no CLIP)
    t5_dim: int = 64
    t5_heads: int = 4
    t5_layers: int = 2
    t5_position_std: float = 3.0  # the random relative-position bias (see the module docstring)

    def flux(self) -> FluxParams:
        z = PixelCodec().params.z_channels
        return FluxParams(
            in_channels=4 * z, out_channels=4 * z, vec_in_dim=self.vec_in_dim, context_in_dim=self.t5_dim,
            hidden_size=self.hidden, num_heads=self.heads, depth=self.depth, depth_single_blocks=self.depth_single,
            axes_dim=default_axes(self.hidden // self.heads), guidance_embed=False,
        )

    def t5(self, vocab_size: int) -> T5Config:
        return T5Config(vocab_size=vocab_size, d_model=self.t5_dim, d_kv=self.t5_dim // self.t5_heads,
                        num_heads=self.t5_heads, d_ff=2 * self.t5_dim, num_layers=self.t5_layers)


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")


def all_captions() -> list[str]:
    """Every caption the grammar makes (held-out ones too: the tokenizer must know every word)."""
    singles = {scenes.Scene((scenes.Obj(*o),)).caption for o in scenes.objects()}
    pairs = {scenes.Scene((scenes.Obj(*a), scenes.Obj(*b)), rel).caption
             for lay in scenes.all_layouts() for a, rel, b in scenes.captions_of(lay)}
    return sorted(singles | pairs)


def write_tokenizer(folder: Path) -> int:
    """A word-level sentencepiece model of the caption vocabulary, T5's special ids (<pad> 0, </s> 1, <unk> 2);
    returns the vocabulary size."""
    captions = all_captions()
    words = {w for c in captions for w in c.split()}
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=proto, vocab_size=len(words) + 3, model_type="word",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(proto.getvalue())
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto.getvalue())
    length = max(len(sp.encode(c)) for c in captions) + 2  # + </s> and one <pad>
    # prompts are rewritten as the captions are written, unknown words named (mmdit/caption_tokenizer.py)
    write_json(folder / "tokenizer_config.json", {"model_max_length": length, "normalize_prompts": "captions"})
    return sp.get_piece_size()


def init_t5(cfg: T5Config, spec: TinySpec, seed: int) -> T5Encoder:
    """Random T5 weights at the scale of T5's own init (q: (d_model d_kv)^-1/2, no 1/sqrt(d) in its attention)."""
    g = torch.Generator().manual_seed(seed)
    enc = T5Encoder(cfg)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if name.endswith("relative_attention_bias.weight"):
                p.copy_(spec.t5_position_std * torch.randn(p.shape, generator=g))
            elif name == "shared.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            elif p.dim() == 2:
                fan_in = p.shape[1] * (cfg.d_kv if name.endswith("SelfAttention.q.weight") else 1)
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return enc


def init_flux(p: FluxParams, seed: int) -> Flux:
    """PyTorch's default init, then adaLN-Zero (as DiT): every modulation and the output layer start at zero,
    so each block starts as the identity and the model as v = 0."""
    torch.manual_seed(seed)
    model = Flux(p)
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("_mod.lin", "modulation.lin", "adaLN_modulation.1", "final_layer.linear")):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def t5_config_json(cfg: T5Config) -> dict:
    """The Hugging Face config.json of the encoder (what `convert.load_text_encoder` reads beside the shapes)."""
    return {"model_type": "t5", "architectures": ["T5EncoderModel"], "d_model": cfg.d_model, "d_kv": cfg.d_kv,
            "num_heads": cfg.num_heads, "d_ff": cfg.d_ff, "num_layers": cfg.num_layers, "vocab_size": cfg.vocab_size,
            "relative_attention_num_buckets": cfg.num_buckets, "relative_attention_max_distance": cfg.max_distance,
            "layer_norm_epsilon": cfg.eps, "feed_forward_proj": "gated-gelu"}


def model_index_json(defaults: dict) -> dict:
    """The model folder's Diffusers-style index, with `mmdit sample`'s `sampling_defaults`."""
    return {"_class_name": "FluxPipeline", "text_encoder": [None, None], "tokenizer": [None, None],
            "text_encoder_2": ["mmdit", "T5Encoder"], "tokenizer_2": ["sentencepiece", "spiece.model"],
            "transformer": ["mmdit", "Flux"], "vae": ["mmdit", "PixelCodec"], "sampling_defaults": defaults}


def write_model(folder: Path, spec: TinySpec, seed: int) -> Path:
    """The untrained model folder: tokenizer, frozen T5, codec, random transformer, model_index.json."""
    vocab = write_tokenizer(folder / "tokenizer_2")
    t5 = init_t5(spec.t5(vocab), spec, seed)
    save_safetensors_atomic(t5.state_dict(), folder / "text_encoder_2" / "model.safetensors")
    write_json(folder / "text_encoder_2" / "config.json", t5_config_json(t5.cfg))
    write_json(folder / "vae" / "config.json", PixelCodec().config())
    flux = init_flux(spec.flux(), seed + 1)
    save_safetensors_atomic(flux.state_dict(), folder / "transformer" / "tiny-flux.safetensors")
    write_json(folder / "model_index.json", model_index_json(STAGE1_DEFAULTS))
    return folder


def tiny_train_config(model: Path, data: Path, output: Path, **overrides) -> TrainConfig:
    """`RECIPE` on these folders, with `overrides`."""
    return TrainConfig(model=str(model), data=str(data), output=str(output), **{**RECIPE, **overrides})


def assemble(init: Path, trained: Path, out: Path, defaults: dict, dtype: torch.dtype = torch.float16) -> None:
    """A finished folder: `init`'s parts with the trained transformer (stored in `dtype`) in place of its own and
    `defaults` as its sampling defaults; `out`'s README.md is kept."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    weights = {k: v.to(dtype) for k, v in load_file(trained).items()}
    save_safetensors_atomic(weights, tmp / "transformer" / "tiny-flux.safetensors")
    write_json(tmp / "model_index.json", model_index_json(defaults))
    (tmp / "README.md").unlink(missing_ok=True)
    if out.exists():
        readme = out / "README.md"
        if readme.is_file():
            shutil.copy(readme, tmp / "README.md")
        shutil.rmtree(out)
    tmp.rename(out)


def write_sized_scenes(folder: Path, seed: int) -> Path:
    """Stage 2's data: `folder/WxH/NNNNN.png` + `.txt` for each size of `SIZES`; returns `folder`."""
    for (w, h), (per_layout, per_object) in SIZES.items():
        scenes.write_scenes(folder / f"{w}x{h}", scenes.training_scenes(per_layout, per_object, seed, w, h))
    return folder


def stage1(work: Path, args: argparse.Namespace) -> Path | None:
    """Stage 1 (32x32, from a random init) in `work`; its model folder, or None if interrupted."""
    if (work / "stage1" / "model_index.json").is_file():  # done by an earlier (resumed) run
        return work / "stage1"
    data = work / "scenes" / "train"
    if not data.is_dir():
        scenes.write_dataset(work / "scenes", seed=args.seed)
    init = work / "init"
    if not (init / "model_index.json").is_file():
        write_model(init, TinySpec(), args.seed)
    cfg = tiny_train_config(init, data, work / "train", steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, resume="latest" if args.resume else None)
    if train(cfg).interrupted:
        return None
    assemble(init, work / "train" / "transformer.safetensors", work / "stage1", STAGE1_DEFAULTS)
    return work / "stage1"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.train_tiny", description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "tiny",
                    help="folder of the data, cache, checkpoints and log (default runs/tiny)")
    ap.add_argument("--out", type=Path, default=ASSETS,
                    help="the model folder written at the end (default assets/tiny-flux)")
    ap.add_argument("--stage1", type=Path,
                    help="a finished stage-1 model folder to start stage 2 from (default: run stage 1 in --work)")
    ap.add_argument("--steps", type=int, default=RECIPE["steps"], help=f"stage 1's optimizer steps (default {RECIPE['steps']})")
    ap.add_argument("--batch-size", type=int, default=RECIPE["batch_size"], help=f"stage 1's global batch (default {RECIPE['batch_size']})")
    ap.add_argument("--lr", type=float, default=RECIPE["lr"], help=f"stage 1's peak learning rate (default {RECIPE['lr']:g})")
    ap.add_argument("--steps-sizes", type=int, default=RECIPE_SIZES["steps"],
                    help=f"stage 2's optimizer steps (default {RECIPE_SIZES['steps']})")
    ap.add_argument("--seed", type=int, default=RECIPE["seed"],
                    help=f"seed of the data, the initial model and the training (default {RECIPE['seed']}; "
                         "stage 2's scenes draw with seed + 1)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --work")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    first = args.stage1 or stage1(args.work, args)
    if first is None:
        return
    data = args.work / "scenes-sizes" / "train"
    if not data.is_dir():
        write_sized_scenes(data, args.seed + 1)
    cfg = TrainConfig(model=str(first), data=str(data), output=str(args.work / "train-sizes"),
                      **{**RECIPE_SIZES, "steps": args.steps_sizes, "seed": args.seed,
                         "resume": "latest" if args.resume else None})
    result = train(cfg)
    if result.interrupted:
        return
    assemble(first, args.work / "train-sizes" / "transformer.safetensors", args.out, SAMPLING_DEFAULTS)
    minutes = (time.perf_counter() - start) / 60
    tail = result.losses[-100:]
    print(f"wrote {args.out} in {minutes:.1f} min; mean loss of the last {len(tail)} steps {sum(tail) / len(tail):.4f}")


if __name__ == "__main__":
    main()
