"""Resolving a source to local files: a path as is, a hub repo id through huggingface_hub's cache.

- `owner/name`: a Diffusers-format repo; only model_index.json and the pipeline's folders are fetched
  (never the single files, `text_encoders/` or pickled weights the same repos also hold).
- `owner/name/file.safetensors`: that file, then only the companions it still needs: FLUX's and
  FLUX.2's `ae.safetensors` (else, as in the FLUX.2 [klein] repos, `vae/`) and encoder/tokenizer
  folders; for SD3, the tokenizers and whatever is not bundled in the file (`text_encoders/clip_l`,
  `clip_g`, `t5xxl_fp16`, `vae/`).
huggingface_hub does the rest as usual: HF_TOKEN for gated or private repos, HF_HUB_OFFLINE and
HF_HOME / HF_HUB_CACHE for the cache, HF_ENDPOINT for the server. Its errors are turned into one
message saying what to do.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from convert import detect_transformer
from convert.files import Checkpoint

from .parts import AE_PREFIXES, BUNDLED, DIFFUSERS_DIRS, SAI_FILES

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# configs, weights, BPE files, sentencepiece, chat templates (FLUX.2's LLM tokenizers)
WEIGHT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model", "*.jinja")


class HubError(RuntimeError):
    """A hub source that cannot be fetched; the message says what to do."""


def _folders(*names: str, prefix: str = "") -> list[str]:
    return [f"{prefix}{n}/{ext}" for n in names for ext in WEIGHT_FILES]


def _diffusers_dirs(family: str) -> list[str]:
    """The encoder and tokenizer folders of a Diffusers repo of the family."""
    return [d for dirs in DIFFUSERS_DIRS[family].values() for d in dirs]


DIFFUSERS_PATTERNS = ["model_index.json", "scheduler/*.json", *_folders(
    "transformer", "vae", *dict.fromkeys(d for family in DIFFUSERS_DIRS for d in _diffusers_dirs(family))
)]


def parse(source: str) -> tuple[str, str | None] | None:
    """`owner/name` -> (repo, None); `owner/name/dir/file.safetensors` -> (repo, "dir/file.safetensors"); else None."""
    parts = source.split("/")
    if len(parts) == 2 and REPO_ID.fullmatch(source):
        return source, None
    repo = "/".join(parts[:2])
    if len(parts) > 2 and source.endswith(".safetensors") and REPO_ID.fullmatch(repo):
        return repo, "/".join(parts[2:])
    return None


def _prefix(path_in_repo: str) -> str:
    """The folder of a file in its repo, as a pattern prefix ("" or "dir/")."""
    d = os.path.dirname(path_in_repo)
    return f"{d}/" if d else ""


def companions(file: Path, path_in_repo: str) -> list[str]:
    """Patterns of the files a downloaded single file needs beside it (see the module docstring)."""
    prefix = _prefix(path_in_repo)
    family = detect_transformer(file).family
    if family in ("flux", "flux2"):
        return [f"{prefix}ae.safetensors", *_folders(*_diffusers_dirs(family), prefix=prefix)]
    keys = list(Checkpoint.open(file))
    bundled = {p for p in (*AE_PREFIXES, *BUNDLED.values()) if any(k.startswith(p) for k in keys)}
    patterns = _folders(*(tok for _, tok in DIFFUSERS_DIRS["sd3"].values()), prefix=prefix)
    if not bundled & set(AE_PREFIXES):
        patterns += _folders("vae", prefix=prefix)
    for role, prefix_in_file in BUNDLED.items():
        if prefix_in_file not in bundled:
            patterns.append(f"{prefix}text_encoders/{SAI_FILES[role][0]}")
    return patterns


@contextmanager
def _explained(repo: str, what: str):
    """huggingface_hub's errors as one HubError saying what to do."""
    page = f"{constants.ENDPOINT}/{repo}"
    try:
        yield
    except GatedRepoError:
        raise HubError(
            f"{repo} is gated: accept its license on {page} (logged in), then set HF_TOKEN to a read token "
            "of that account and retry"
        ) from None
    except RevisionNotFoundError:
        raise HubError(f"{repo}: no such revision ({what})") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{repo}: no such local path, and no such repo on the hub (or it is private: check the name, or "
            "set HF_TOKEN to a token that can read it)"
        ) from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise HubError(
                f"{repo}: {what} is not in the local cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set: "
                "download it once online, or unset HF_HUB_OFFLINE"
            ) from None
        raise HubError(
            f"{repo}: cannot reach {constants.ENDPOINT} and {what} is not in the local cache: check the "
            "connection (or HF_ENDPOINT)"
        ) from None
    except RemoteEntryNotFoundError:
        raise HubError(f"{repo}: has no file {what} (see {page}/tree/main)") from None


def resolve(source: str, revision: str | None = None) -> tuple[Path, str]:
    """(local path, name) for a local path or a hub source; downloads into huggingface_hub's cache."""
    path = Path(source).expanduser()
    if path.exists():
        return path, source
    parsed = parse(source)
    if parsed is None:
        raise FileNotFoundError(
            f"{source}: no such file or folder, and not a hub source (owner/name or owner/name/file.safetensors)"
        )
    from huggingface_hub import hf_hub_download, snapshot_download  # 0.3 s to import: only for a hub source

    repo, file = parsed
    if file is None:
        with _explained(repo, "the Diffusers-format files"):
            folder = Path(snapshot_download(repo, revision=revision, allow_patterns=DIFFUSERS_PATTERNS))
        if not (folder / "model_index.json").is_file():
            raise HubError(
                f"{repo} is not a Diffusers-format repo (no model_index.json): name one of its single files, "
                f"e.g. {repo}/<file>.safetensors"
            )
        return folder, repo
    with _explained(repo, file):
        local = Path(hf_hub_download(repo, file, revision=revision))
        snapshot_download(repo, revision=revision, allow_patterns=companions(local, file))
        if not (local.parent / "ae.safetensors").is_file() and detect_transformer(local).family in ("flux", "flux2"):
            # no BFL autoencoder beside it (the FLUX.2 [klein] repos): the Diffusers vae/ folder
            snapshot_download(repo, revision=revision, allow_patterns=_folders("vae", prefix=_prefix(file)))
    return local, source
