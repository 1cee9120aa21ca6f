"""Hub sources through the real huggingface_hub client, against a local stand-in of the hub on 127.0.0.1.

The server (a thread, random free port) answers the few endpoints huggingface_hub 2.4 uses to fetch
a repo: `/api/models/{repo}/revision/{rev}` (the commit), `/api/models/{repo}/tree/{rev}` (the file
list) and `/{repo}/resolve/{rev}/{file}` (HEAD: `X-Repo-Commit`, `ETag`, `Content-Length`; GET: the
bytes), and errors with `X-Error-Code` as the hub does (GatedRepo, RepoNotFound, EntryNotFound). Each
load runs in a child process with `HF_ENDPOINT` pointing at the server and a fresh `HF_HOME`, the way
a user's environment configures the client. The served repo holds, as the official FLUX repo does, both
the Diffusers folders and the single files, plus files that must never be fetched.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from builders import rel_err
from pipeline_builders import PROMPTS, T5_LEN, built, flux_noise
from safetensors.torch import load_file, save_file

from convert.files import save_safetensors_atomic
from sampling import load_pipeline
from sampling.hub import DIFFUSERS_PATTERNS, companions, parse

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_test_secret"
NEVER = {"pytorch_model.bin": b"pickle!", "text_encoders/clip_l.safetensors": b"not needed", "README.md": b"# tiny"}


class Hub(BaseHTTPRequestHandler):
    repos: dict[str, dict[str, bytes]] = {}
    gated: set[str] = set()
    fetched: list[str] = []  # "repo:file" of every file body served

    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
        self.send_response(code)
        for k, v in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _error(self, code: int, error: str, head: bool):
        self._send(code, json.dumps({"error": error}).encode(), {"X-Error-Code": error, "X-Error-Message": error}, head)

    def _route(self, head: bool):
        path = self.path.split("?")[0]
        api = path.startswith("/api/models/")
        parts = path.removeprefix("/api/models/" if api else "/").split("/")
        repo = "/".join(parts[:2])
        if repo not in self.repos:
            return self._error(404, "RepoNotFound", head)
        if repo in self.gated and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "GatedRepo", head)
        files = self.repos[repo]
        if api and parts[2] == "revision":
            body = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files]}
            return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        if api and parts[2] == "tree":
            entries = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()]
            return self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, head)
        if not api and parts[2] == "resolve":
            file = "/".join(parts[4:])
            if file not in files:
                return self._error(404, "EntryNotFound", head)
            if not head:
                self.fetched.append(f"{repo}:{file}")
            etag = f'"{hashlib.sha1(files[file]).hexdigest()}"'
            return self._send(200, files[file], {"X-Repo-Commit": COMMIT, "ETag": etag}, head)
        self._error(404, "EntryNotFound", head)

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)


def repo_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    _, folder = built("flux")
    local = load_pipeline(folder, max_sequence_length=T5_LEN)
    extra = tmp_path_factory.mktemp("single")
    save_safetensors_atomic(local.transformer.state_dict(), extra / "flux1-dev.safetensors")
    save_safetensors_atomic(local.autoencoder.state_dict(), extra / "ae.safetensors")
    files = {**repo_files(folder), **repo_files(extra), **NEVER}
    Hub.repos = {"tiny/flux": files, "tiny/gated": files}
    Hub.gated = {"tiny/gated"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    noise = flux_noise(2, 64, 48)
    reference = local.generate(PROMPTS, height=64, width=48, steps=1, noise=noise, output="latent")
    yield dict(url=f"http://127.0.0.1:{server.server_address[1]}", home=tmp_path_factory.mktemp("hf_home"),
               noise=noise, reference=reference, work=tmp_path_factory.mktemp("child"))
    server.shutdown()
    server.server_close()


CHILD = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from sampling import load_pipeline
from sampling.hub import HubError
out = {}
noise = load_file(sys.argv[1])["noise"]
for i, source in enumerate(sys.argv[3:]):
    try:
        pipe = load_pipeline(source, max_sequence_length=%d)
    except HubError as e:
        out[source] = str(e)
        continue
    latents = pipe.generate(%r, height=64, width=48, steps=1, noise=noise, output="latent")
    save_file({"latents": latents}, f"{sys.argv[2]}/{i}.safetensors")
    out[source] = "loaded"
print(json.dumps(out))
""" % (T5_LEN, PROMPTS)


def load_in_child(hub, *sources: str, home: Path | None = None, **env: str) -> dict[str, str]:
    """Load each source in a fresh process whose environment points huggingface_hub at the test hub
    (cache: HF_HOME = `home`, default the module's shared one)."""
    Hub.fetched.clear()
    save_file({"noise": hub["noise"]}, hub["work"] / "noise.safetensors")
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    child_env.update(HF_ENDPOINT=hub["url"], HF_HOME=str(home or hub["home"]), HF_HUB_DISABLE_TELEMETRY="1",
                     HF_HUB_DISABLE_PROGRESS_BARS="1", **env)
    run = subprocess.run([sys.executable, "-c", CHILD, str(hub["work"] / "noise.safetensors"), str(hub["work"]), *sources],
                         env=child_env, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def child_latents(hub, i: int) -> torch.Tensor:
    return load_file(hub["work"] / f"{i}.safetensors")["latents"]


def test_diffusers_repo_and_single_file(hub, tmp_path):
    assert load_in_child(hub, "tiny/flux") == {"tiny/flux": "loaded"}
    fetched = {f.removeprefix("tiny/flux:") for f in Hub.fetched}
    assert rel_err(child_latents(hub, 0), hub["reference"]) < 1e-5
    assert {"model_index.json", "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
            "text_encoder_2/model.safetensors", "tokenizer/vocab.json", "tokenizer_2/spiece.model"} <= fetched
    assert not fetched & {"flux1-dev.safetensors", "ae.safetensors", *NEVER}

    single = "tiny/flux/flux1-dev.safetensors"
    assert load_in_child(hub, single, home=tmp_path) == {single: "loaded"}  # an empty cache
    fetched = {f.removeprefix("tiny/flux:") for f in Hub.fetched}
    assert rel_err(child_latents(hub, 0), hub["reference"]) < 1e-5
    assert {"flux1-dev.safetensors", "ae.safetensors", "text_encoder/model.safetensors", "tokenizer_2/spiece.model"} <= fetched
    assert not any(f.startswith(("transformer/", "vae/")) for f in fetched) and not fetched & set(NEVER)


def test_gated_missing_and_token(hub):
    out = load_in_child(hub, "tiny/gated", "tiny/nope", "tiny/flux/flux1-schnell.safetensors")
    assert "tiny/gated is gated: accept its license on " + hub["url"] + "/tiny/gated" in out["tiny/gated"]
    assert "set HF_TOKEN" in out["tiny/gated"]
    assert "no such repo on the hub (or it is private" in out["tiny/nope"]
    assert "has no file flux1-schnell.safetensors" in out["tiny/flux/flux1-schnell.safetensors"]
    assert load_in_child(hub, "tiny/gated", HF_TOKEN=TOKEN) == {"tiny/gated": "loaded"}
    assert rel_err(child_latents(hub, 0), hub["reference"]) < 1e-5


def test_offline_uses_the_cache(hub):
    if not (hub["home"] / "hub" / "models--tiny--flux").is_dir():  # cached by the first test, unless run alone
        load_in_child(hub, "tiny/flux")
    out = load_in_child(hub, "tiny/flux", "tiny/other", HF_HUB_OFFLINE="1")
    assert out["tiny/flux"] == "loaded" and not Hub.fetched
    assert rel_err(child_latents(hub, 0), hub["reference"]) < 1e-5
    assert "not in the local cache" in out["tiny/other"] and "HF_HUB_OFFLINE is set" in out["tiny/other"]


def test_parse_sources():
    assert parse("black-forest-labs/FLUX.1-dev") == ("black-forest-labs/FLUX.1-dev", None)
    assert parse("stabilityai/stable-diffusion-3.5-large/sd3.5_large.safetensors") == (
        "stabilityai/stable-diffusion-3.5-large", "sd3.5_large.safetensors")
    assert parse("owner/name/sub/x.safetensors") == ("owner/name", "sub/x.safetensors")
    assert parse("just-a-name") is None and parse("a/b/c.ckpt") is None
    with pytest.raises(FileNotFoundError, match="not a hub source"):
        load_pipeline("no/such/thing.bin")


def test_sd3_single_file_companions(tmp_path):
    """Only what the SAI file does not bundle is fetched beside it (and never the fp8 T5 or the Diffusers weights)."""
    _, folder = built("sd3")
    pipe = load_pipeline(folder, max_sequence_length=T5_LEN)
    t = {f"model.diffusion_model.{k}": v for k, v in pipe.transformer.state_dict().items()}
    save_safetensors_atomic(t, tmp_path / "bare.safetensors")
    bare = companions(tmp_path / "bare.safetensors", "sd3.5_large.safetensors")
    assert {"text_encoders/clip_l.safetensors", "text_encoders/clip_g.safetensors", "text_encoders/t5xxl_fp16.safetensors",
            "vae/*.safetensors", "tokenizer_2/*.json"} <= set(bare)
    t.update({f"first_stage_model.{k}": v for k, v in pipe.autoencoder.state_dict().items()})
    t.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in pipe.encoders["t5"].state_dict().items()})
    save_safetensors_atomic(t, tmp_path / "bundled.safetensors")
    bundled = companions(tmp_path / "bundled.safetensors", "sub/sd3.5_large.safetensors")
    assert "sub/text_encoders/clip_g.safetensors" in bundled and "sub/tokenizer_3/*.model" in bundled
    assert not any("t5xxl" in p or p.startswith("sub/vae/") for p in bundled)
    assert all(not p.startswith("text_encoders/") for p in DIFFUSERS_PATTERNS)
