"""Tiny random Diffusers-style repos (FLUX and SD3.5), built with Diffusers/transformers classes, for the pipeline tests.

Each repo folder is what `DiffusionPipeline.save_pretrained` writes: model_index.json, scheduler/,
tokenizer*/, text_encoder*/, transformer/, vae/, every weight random (tests/builders.randomize_).
The tokenizers are tiny: a CLIP BPE vocabulary in CLIP's layout (byte symbols, the same with
`</w>`, a few merges, then BOS/EOS, so "!" is id 0 and EOS the highest id) and a unigram
sentencepiece model with T5's special ids. The Diffusers pipeline object is returned too: it is the oracle.
"""

from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import sentencepiece as spm
import torch
import transformers
from builders import TINY_FLUX, diffusers_flux, randomize_
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from einops import rearrange
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram

from mmdit.lora import adapters, inject_lora

PROMPTS = ["a photo of a cat", "a red dog on the table"]
T5_LEN = 16  # max_sequence_length for both families in the tests
MERGES = [("a", "t</w>"), ("c", "at</w>"), ("o", "n</w>"), ("t", "h"), ("th", "e</w>"), ("d", "o"),
          ("do", "g</w>"), ("r", "e"), ("re", "d</w>"), ("p", "h"), ("o", "f</w>")]
CORPUS = "a photo of a cat and a red dog on the table with blue chair in the sunny city at night".split()


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable character table, in the order of CLIP's first 256 vocabulary entries."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + n) for n in range(len(others))]


def write_clip_vocab(folder: Path) -> int:
    """vocab.json + merges.txt in CLIP's layout; returns the vocabulary size."""
    alphabet = byte_alphabet()
    symbols = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in MERGES]
    symbols += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {s: i for i, s in enumerate(symbols)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES), encoding="utf-8")
    return len(vocab)


def write_spiece(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [" ".join(CORPUS[i:] + CORPUS[:i]) for i in range(len(CORPUS))]
    (folder / "corpus.txt").write_text("\n".join(lines * 5), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"), vocab_size=40, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    return folder / "spiece.model"


def hf_tokenizers(work: Path):
    """(CLIP tokenizer padding with EOS, CLIP tokenizer padding with "!", T5 tokenizer), transformers classes."""
    n_clip = write_clip_vocab(work / "clip_vocab")
    clip = transformers.CLIPTokenizer.from_pretrained(str(work / "clip_vocab"), pad_token="<|endoftext|>", model_max_length=77)
    clip_g = transformers.CLIPTokenizer.from_pretrained(str(work / "clip_vocab"), pad_token="!", model_max_length=77)
    return clip, clip_g, t5_tokenizer(write_spiece(work / "spiece")), n_clip


def t5_tokenizer(spiece: Path):
    """transformers' T5TokenizerFast over the sentencepiece pieces, built as its converter does (Unigram,
    Metaspace, `</s>` appended) without the protobuf package the converter would need."""
    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    tok = Tokenizer(Unigram([(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())], unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                        extra_ids=0, model_max_length=512)


def clip_encoder(vocab: int, hidden: int, projection: bool, seed: int, act: str = "quick_gelu"):
    cfg = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
        num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=hidden,
        bos_token_id=vocab - 2, eos_token_id=2,  # eos 2: the legacy argmax pooling the real configs have
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return randomize_(cls(cfg), seed).eval()


def t5_encoder(d_model: int, seed: int):
    cfg = transformers.T5Config(
        vocab_size=64, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )
    return randomize_(transformers.T5EncoderModel(cfg), seed).eval()


def vae(scaling: float, shift: float, seed: int):
    ae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=32, scaling_factor=scaling, shift_factor=shift,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    return randomize_(ae, seed).eval()


def save_like_the_hub(pipe, folder: Path, work: Path) -> None:
    """`save_pretrained`, plus the slow-tokenizer files the official repos also ship (vocab.json, merges.txt, spiece.model)."""
    pipe.save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is None:
            continue
        files = ["spiece.model"] if "T5" in type(tok).__name__ else ["vocab.json", "merges.txt"]
        src = work / ("spiece" if files == ["spiece.model"] else "clip_vocab")
        for f in files:
            shutil.copy(src / f, folder / name / f)


def tiny_flux_pipeline(work: Path, schnell: bool = False):
    """A Diffusers FluxPipeline with tiny random parts, saved to work/'flux'. Returns (pipe, folder)."""
    clip, _, t5, n_clip = hf_tokenizers(work)
    p = replace(TINY_FLUX, guidance_embed=not schnell)
    sched = (dict(shift=1.0, use_dynamic_shifting=False) if schnell else
             dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                  base_image_seq_len=256, max_image_seq_len=4096))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**sched),
        vae=vae(0.3611, 0.1159, seed=1),
        text_encoder=clip_encoder(n_clip, p.vec_in_dim, projection=False, seed=2),
        tokenizer=clip,
        text_encoder_2=t5_encoder(p.context_in_dim, seed=3),
        tokenizer_2=t5,
        transformer=randomize_(diffusers_flux(p), seed=4).eval(),
    )
    folder = work / ("flux-schnell" if schnell else "flux")
    save_like_the_hub(pipe, folder, work)
    return pipe, folder


def tiny_sd3_transformer():
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=128, caption_projection_dim=64, pooled_projection_dim=32 + 48, out_channels=16,
        pos_embed_max_size=16, qk_norm="rms_norm", dual_attention_layers=(0,),
    )


def tiny_sd3_pipeline(work: Path, with_t5: bool = True):
    """A Diffusers StableDiffusion3Pipeline (SD3.5-Medium-like: qk-norm, one MMDiT-X layer), saved to work/'sd3'."""
    clip, clip_g, t5, n_clip = hf_tokenizers(work)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae(1.5305, 0.0609, seed=11),
        text_encoder=clip_encoder(n_clip, 32, projection=True, seed=12),
        tokenizer=clip,
        text_encoder_2=clip_encoder(n_clip, 48, projection=True, seed=13, act="gelu"),
        tokenizer_2=clip_g,
        text_encoder_3=t5_encoder(128, seed=14) if with_t5 else None,
        tokenizer_3=t5 if with_t5 else None,
        transformer=randomize_(tiny_sd3_transformer(), seed=15).eval(),
    )
    folder = work / ("sd3" if with_t5 else "sd3-no-t5")
    save_like_the_hub(pipe, folder, work)
    return pipe, folder


def flux_noise(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Initial latents (B, 16, H/8, W/8)."""
    return torch.randn(batch, 16, height // 8, width // 8, generator=torch.Generator().manual_seed(seed))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """FLUX's 2x2 packing, as Diffusers' FluxPipeline takes `latents=`: (B, C, h, w) -> (B, h/2 * w/2, 4C)."""
    return rearrange(latents, "B C (h ph) (w pw) -> B (h w) (C ph pw)", ph=2, pw=2)


def unpack(packed: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    return rearrange(packed, "B (h w) (C ph pw) -> B C (h ph) (w pw)", h=h // 2, ph=2, pw=2)


_WORK: list[Path] = []


@functools.cache
def built(kind: str):
    """(Diffusers pipeline, repo folder) of "flux", "flux-schnell", "sd3" or "sd3-no-t5", built once per session."""
    if not _WORK:
        _WORK.append(Path(tempfile.mkdtemp(prefix="taca-mmdit-repos-")))
        atexit.register(shutil.rmtree, _WORK[0], True)
    work = _WORK[0] / kind
    if kind.startswith("flux"):
        return tiny_flux_pipeline(work, schnell=kind == "flux-schnell")
    return tiny_sd3_pipeline(work, with_t5=kind == "sd3")


def random_lora(model, std: float, name: str = "taca", rank: int = 4) -> None:
    """A LoRA on every attention projection with random B (a fresh one is zero: no effect), in place."""
    inject_lora(model, name, rank=rank)
    with torch.no_grad():
        for _, _, a in adapters(model):
            a.lora_B.normal_(0, std)
