"""Where the parts of a model lie: the Diffusers folder layout and SAI's single files (docs/formats.md).

A model is its transformer plus an autoencoder and, per text-encoder role (`clip_l`, `clip_g`, `t5`;
FLUX.2's one `llm`), an encoder and a tokenizer. `find_parts` finds each one for a Diffusers folder or
an official single file; sampling/hub.py uses the same tables to download only those files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from convert.families import FAMILIES
from convert.files import AUTOENCODER_PREFIXES as AE_PREFIXES
from convert.files import BUNDLED_ENCODERS as BUNDLED
from convert.files import Checkpoint, read_config

# role -> (encoder folder, tokenizer folder) in a Diffusers repo (`text_encoder_2/` beside `tokenizer_2/`)
DIFFUSERS_DIRS = {
    family: {role: (folder, folder.replace("text_encoder", "tokenizer")) for folder, role in layout.DIFFUSERS_TEXT_ENCODERS.items()}
    for family, layout in FAMILIES.items()
}
ROLES = {family: tuple(dirs) for family, dirs in DIFFUSERS_DIRS.items()}  # the text encoders of each family
# SAI's encoder files (in `text_encoders/` of the SD3.5 repos; the first is the one to download)
SAI_FILES = {"clip_l": ["clip_l.safetensors"], "clip_g": ["clip_g.safetensors"],
             "t5": ["t5xxl_fp16.safetensors", "t5xxl.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]}


@dataclass
class Part:
    """Where one part is: a file or folder, and for a bundled part, its key prefix inside the file."""

    path: Path
    prefix: str | None = None
    pad: str | None = None  # a CLIP tokenizer folder used for another role: that role's padding


def model_index(source: Path) -> dict:
    """The folder's model_index.json ({} when there is none)."""
    return (read_config(source / "model_index.json") or {}) if source.is_dir() else {}


def absent_on_purpose(source: Path) -> set[str]:
    """The sub-folders model_index.json marks as null (`"text_encoder": [null, null]`)."""
    return {k for k, v in model_index(source).items() if isinstance(v, list) and all(x is None for x in v)}


def find_parts(source: Path, family: str, given: dict[str, str | os.PathLike | None]) -> dict[str, Part | None]:
    """{"vae", role, role + "_tokenizer": Part or None} for a Diffusers folder or a single file.

    What is not `given` is looked for, in this order, in the file itself (bundled keys), beside it, and
    in the Diffusers sub-folders beside it; a sub-folder model_index.json marks as null is None.
    """
    folder = source if source.is_dir() else source.parent
    keys = set() if source.is_dir() else set(Checkpoint.open(source))
    absent = absent_on_purpose(source)
    parts: dict[str, Part | None] = {}

    def part(name: str, bundled: str | None, *beside: Path) -> None:
        if given.get(name) is not None:
            parts[name] = Part(Path(given[name]))
        elif beside and beside[0].parent == folder and beside[0].name in absent:
            parts[name] = None
        elif bundled is not None and any(k.startswith(bundled) for k in keys):
            parts[name] = Part(source, bundled)
        else:
            found = next((p for p in beside if p.exists()), None)
            parts[name] = Part(found) if found else None

    ae_prefix = next((p for p in AE_PREFIXES if any(k.startswith(p) for k in keys)), None)
    part("vae", ae_prefix, folder / "vae", folder / "ae.safetensors")
    for role in ROLES[family]:
        enc_dir, tok_dir = DIFFUSERS_DIRS[family][role]
        sai = [d / f for d in (folder / "text_encoders", folder) for f in SAI_FILES.get(role, ())]
        part(role, BUNDLED.get(role), folder / enc_dir, *sai)
        part(f"{role}_tokenizer", None, folder / tok_dir)
    if family == "sd3" and parts["clip_g_tokenizer"] is None and parts["clip_l_tokenizer"] is not None:
        # SAI's layout: one CLIP BPE for both encoders; bigG pads with "!" (id 0) (SAI sd3.5 `other_impls.py`)
        parts["clip_g_tokenizer"] = Part(parts["clip_l_tokenizer"].path, pad="!")
    llm = parts.get("llm")
    if family == "flux2" and parts["llm_tokenizer"] is None and llm and (llm.path / "tokenizer.json").is_file():
        parts["llm_tokenizer"] = Part(llm.path)  # an LLM's own repo (Qwen/Qwen3-4B): its tokenizer beside the weights
    return parts
