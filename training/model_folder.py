"""A fully trained transformer (`train="full"`) as a model folder `mmdit sample --model` reads.

`OUTPUT/transformer.safetensors` holds the transformer only (BFL / SAI keys); a pipeline also needs
the base model's autoencoder, text encoders and tokenizers. `write_model_folder` writes
`OUTPUT/model/`, a Diffusers-style folder (sampling/loading.py reads it as any other):
`model_index.json` (the base's own, `sampling_defaults` and absent parts included, or one made for a
single-file base), `transformer/transformer.safetensors` (a hard link to the trained file, or a copy),
and each other part as a symbolic link to the base's own file or folder, found as `mmdit sample`
finds them (sampling/parts.py): nothing big is copied, and the base must stay where it is.
A part bundled inside the base's single file (SAI `*_incl_clips*` files) cannot be linked alone, and
a single-file base may lack parts: then no folder is written and the message says how to sample in Python.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from sampling.loading import OPTIONAL
from sampling.parts import DIFFUSERS_DIRS, find_parts, model_index

from .disk import writing

PIPELINE_CLASS = {"flux": "FluxPipeline", "sd3": "StableDiffusion3Pipeline"}  # Diffusers' names, for model_index


class NoModelFolder(ValueError):
    """The base's parts cannot be linked into a folder of their own (the message says what to do instead)."""


def _links(base: Path, family: str) -> dict[str, Path]:
    """{folder name in the new model folder: the base's file or folder it links to}."""
    if model_index(base):  # a Diffusers folder: its parts' folders as they are
        return {name: base / name for name, value in model_index(base).items()
                if isinstance(value, list) and any(value) and name != "transformer" and (base / name).exists()}
    names = {"vae": "vae"}
    for role, (encoder_dir, tokenizer_dir) in DIFFUSERS_DIRS[family].items():
        names[role], names[f"{role}_tokenizer"] = encoder_dir, tokenizer_dir
    links = {}
    for key, part in find_parts(base, family, {}).items():
        if part is None and (family, key.removesuffix("_tokenizer")) not in OPTIONAL:
            raise NoModelFolder(f"the base {base} has no {key} beside it")
        if part is None or part.pad is not None:  # not there, or SAI's shared CLIP tokenizer: found again the same way
            continue
        if part.prefix is not None:
            raise NoModelFolder(f"the base's {key} is stored inside {base} ({part.prefix}*)")
        links[names[key]] = part.path
    return links


def write_model_folder(base: Path, family: str, transformer: Path, folder: Path, class_name: str) -> None:
    """Write `folder` (atomically: built beside it, then renamed): the base model (`base`, a local folder or
    single file) with `transformer` (our checkpoint of a `family` model, class `class_name`) in its place.
    NoModelFolder if a part of the base cannot be linked; WriteError if the folder cannot be written."""
    if not model_index(base) and family not in PIPELINE_CLASS:  # FLUX.2: which pipeline, distilled or not
        raise NoModelFolder(f"the base {base} is a single {family} file, whose model folder is not made here")
    links = _links(base, family)
    index = model_index(base) or {"_class_name": PIPELINE_CLASS[family]}
    index = {**index, "transformer": ["mmdit", class_name]}
    with writing(folder):
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700: the mode a plain mkdir gives
        try:
            (tmp / "transformer").mkdir()
            try:
                os.link(transformer, tmp / "transformer" / "transformer.safetensors")
            except OSError:  # a filesystem without hard links
                shutil.copyfile(transformer, tmp / "transformer" / "transformer.safetensors")
            for name, target in links.items():
                if target.is_dir():
                    (tmp / name).symlink_to(target.resolve(), target_is_directory=True)
                else:  # a single file (ae.safetensors, clip_l.safetensors): a folder holding it
                    (tmp / name).mkdir()
                    (tmp / name / target.name).symlink_to(target.resolve())
            (tmp / "model_index.json").write_text(json.dumps(index, indent=1) + "\n")
            if folder.exists():  # an earlier run's: moved aside, then removed
                old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
                os.replace(folder, old / folder.name)
                shutil.rmtree(old)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
