"""`mmdit train` on CPU with a tiny FLUX file and a generated dataset (2-4 PNGs of 16 px + one corrupt file).

Checked: the loss goes down when overfitting two images; the corrupt file is skipped with a warning
naming it; the objective (flow matching, per-sample TACA) equals Diffusers' model with an explicit
TACA attention and the trained LoRA loaded by `load_lora_adapter`; the saved LoRA gives the trained
model's outputs in our model and in Diffusers; an interrupted (Ctrl-C) and resumed run repeats the
uninterrupted one exactly; 2 processes (gloo) equal 1 process with the same global batch; a NaN loss
stops with a message and keeps the last good checkpoint; buckets, cropping, the batch order, the
manifest, TOML + flags; gradient checkpointing (same result) and bf16; SD3 with per-sample temperatures;
and the CLI end to end on a tiny Diffusers-format FLUX folder, whose cached latents and text embeddings
equal Diffusers' pipeline's.
"""

import argparse
import json
import signal
import socket
import subprocess
import sys
import warnings
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from builders import TINY_FLUX, flux_state, randomize_, rel_err
from PIL import Image
from pipeline_builders import tiny_flux_pipeline
from safetensors import safe_open
from safetensors.torch import load_file
from test_flux import diffusers_explicit_taca, diffusers_forward, reference
from test_sd3 import CASES, sai_state, write_sai
from test_sd3 import inputs as sd3_inputs
from training_builders import (
    CORRUPT,
    config_dict,
    ddp_worker,
    standin_encoders,
    tiny_config,
    write_dataset,
    write_tiny_flux,
)

import convert
from mmdit.sd3 import SD3
from mmdit.lora import lora_parameters
from training import TrainConfig, TrainingError, make_config, train
from training.checkpoint import list_checkpoints
from training.cli import add_arguments, main
from training.data import BatchSampler, Item, bucket_sizes, load_image, scan, target_size
from training.loop import ADAPTER, checkpoint_blocks
from training.loss import batch_temperature, flow_matching_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def ckpt_names(output) -> list[str]:
    return [p.name for p in list_checkpoints(Path(output) / "checkpoints")]


def diffusers_with(lora_file):
    """Diffusers' FLUX with the tiny base weights and our LoRA file.

    use_safetensors=True: without it (or a weight_name) Diffusers 0.42 does not read the header, and a
    LoRA with alpha != rank loads with the wrong scale."""
    ref = reference(TINY_FLUX, flux_state(TINY_FLUX))
    ref.load_lora_adapter(str(lora_file), prefix="transformer", adapter_name="taca", use_safetensors=True)
    return ref


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_flux(tmp_path_factory.mktemp("model") / "tiny-flux.safetensors")


@pytest.fixture(scope="module")
def overfit(tmp_path_factory, base):
    """30 steps on two images, TACA gamma 1.25 on t in [0.9, 1]."""
    d = tmp_path_factory.mktemp("overfit")
    data = write_dataset(d / "data", n=2)
    cfg = tiny_config(base, data, d / "out", steps=30, lr=3e-3, taca_gamma=1.25, t_min=0.9, checkpoint_every=10)
    before = torch.get_num_threads()  # module scope: set up before `one_thread`
    torch.set_num_threads(1)
    with pytest.warns(UserWarning, match=f"skipping unreadable image .*{CORRUPT}"):
        result = train(cfg, encoders=standin_encoders())
    torch.set_num_threads(before)
    return cfg, result


def test_loss_goes_down_and_outputs(overfit):
    cfg, result = overfit
    assert (len(result.data), result.data.skipped, result.data.encoded) == (2, 1, 2)
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.7 * first, result.losses
    lines = [json.loads(s) for s in open(f"{cfg.output}/log.jsonl")]
    assert [e["step"] for e in lines] == list(range(1, 31))
    assert [e["loss"] for e in lines] == result.losses
    assert all(cfg.t_min <= e["t_min"] <= e["t_max"] <= 1 and e["lr"] == cfg.lr and e["seconds"] > 0 for e in lines)
    assert ckpt_names(cfg.output) == ["step-0000020.safetensors", "step-0000030.safetensors"]
    with safe_open(f"{cfg.output}/lora.safetensors", "pt") as f:
        meta = f.metadata()
    assert [meta[k] for k in ("taca.gamma", "taca.until", "train.steps", "mmdit.rank")] == ["1.25", "0.9", "30", "4"]
    assert json.loads(meta["train.config"])["data"] == cfg.data


def test_saved_lora_loads_in_ours_and_diffusers(overfit, base):
    cfg, result = overfit
    x0, context, pooled = result.data.load([0, 1])
    g = torch.Generator().manual_seed(5)
    x = dict(x=torch.randn(x0.shape, generator=g), t=torch.tensor([0.95, 0.5]), context=context, pooled=pooled,
             guidance=torch.full((2,), 3.5))
    with torch.no_grad():
        trained = result.model(**x)
        mine = convert.load_transformer(base)
        plain = mine(**x)
        convert.load_lora(mine, f"{cfg.output}/lora.safetensors")
        assert rel_err(mine(**x), trained) <= 1e-4
        assert rel_err(plain, trained) > 1e-3  # the LoRA matters

        assert rel_err(diffusers_forward(diffusers_with(f"{cfg.output}/lora.safetensors"), **x), trained) <= 1e-4


def test_objective_matches_diffusers_with_taca(overfit):
    """The training loss with per-sample TACA (t on both sides of t_min) equals Diffusers + explicit TACA."""
    cfg, result = overfit
    x0, context, pooled = result.data.load([1, 0])
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    t = torch.tensor([0.97, 0.4])  # gamma for the first sample only
    temp = batch_temperature(lambda s: cfg.taca_gamma if s >= cfg.t_min else None, t)
    assert temp.shape == (2, 1, 2, 2) and temp[0, 0, 1, 0] == cfg.taca_gamma and (temp[1] == 1).all()
    guidance = torch.full((2,), 3.5)
    with torch.no_grad():
        ours = flow_matching_loss(result.model, x0, noise, t, context, pooled, guidance, temp)
        ref = diffusers_with(f"{cfg.output}/lora.safetensors")
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
        v = []
        for i, gamma in enumerate((cfg.taca_gamma, 1.0)):
            with diffusers_explicit_taca(gamma, context.shape[1]):
                one = slice(i, i + 1)
                v.append(diffusers_forward(ref, x_t[one], t[one], context[one], pooled[one], guidance[one]))
        expected = ((torch.cat(v) - (noise - x0)) ** 2).mean()
    assert rel_err(ours, expected) <= 1e-4
    with torch.no_grad():  # and the temperature is really applied
        assert rel_err(flow_matching_loss(result.model, x0, noise, t, context, pooled, guidance, None), expected) > 1e-4


def test_batch_temperature_forms():
    t = torch.tensor([0.99, 0.98])
    assert batch_temperature(1.2, t) == 1.2
    assert batch_temperature(lambda s: 1.2 if s >= 0.97 else None, t) == 1.2
    assert batch_temperature(lambda s: None, t) is None
    heads = torch.ones(3, 2, 2)
    heads[:, 1, 0] = torch.tensor([1.1, 1.2, 1.3])
    mixed = batch_temperature(lambda s: heads if s > 0.985 else None, t)  # (2, 3, 2, 2)
    assert torch.equal(mixed[0], heads) and torch.equal(mixed[1], torch.ones(3, 2, 2))


def test_resume_after_ctrl_c_repeats_the_run(tmp_path, base):
    data = write_dataset(tmp_path / "data", n=3)
    kw = dict(steps=6, batch_size=2, grad_accum=2, dropout=0.1, warmup_steps=3, checkpoint_every=2,
              cache=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = train(tiny_config(base, data, tmp_path / "full", **kw), encoders=standin_encoders())

    def ctrl_c(step, loss):
        if step == 2:
            signal.raise_signal(signal.SIGINT)

    cfg = tiny_config(base, data, tmp_path / "cut", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = train(cfg, on_step=ctrl_c)  # the cache is there: no encoders needed
    assert first.interrupted and first.step == 2  # a signal between steps: the run stops there
    assert not (tmp_path / "cut" / "lora.safetensors").exists()
    assert ckpt_names(tmp_path / "cut") == ["step-0000002.safetensors"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FileExistsError, match="--resume"):
            train(cfg)
        second = train(TrainConfig(**{**config_dict(cfg), "resume": "latest"}))
    assert first.losses + second.losses == full.losses  # exactly
    a, b = load_file(tmp_path / "full" / "lora.safetensors"), load_file(tmp_path / "cut" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = [json.loads(s)["loss"] for s in open(tmp_path / "cut" / "log.jsonl")]
    assert log == full.losses


def test_two_processes_equal_one(tmp_path, base):
    """gloo, 2 processes x 2 samples = 1 process x 4 samples (allclose: another summation order), and
    = 1 process x 2 micro-batches of 2 (exactly: the same sums)."""
    data = write_dataset(tmp_path / "data", n=4)
    kw = dict(steps=3, batch_size=4, lr=1e-2, cache=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one = train(tiny_config(base, data, tmp_path / "one", **kw), encoders=standin_encoders())
        train(tiny_config(base, data, tmp_path / "accum", grad_accum=2, **kw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(ddp_worker, args=(port, config_dict(tiny_config(base, data, tmp_path / "two", **kw))), nprocs=2)
    a, acc, b = (load_file(tmp_path / name / "lora.safetensors") for name in ("one", "accum", "two"))
    assert a.keys() == b.keys() == acc.keys()
    assert all(torch.allclose(b[k], a[k], rtol=1e-4, atol=1e-5) for k in a)
    assert all(torch.equal(b[k], acc[k]) for k in a)
    assert all(a[k].abs().max() > 1e-3 for k in a if "lora_B" in k)  # B moved away from 0
    two = [json.loads(s)["loss"] for s in open(tmp_path / "two" / "log.jsonl")]
    assert max(abs(x - y) / y for x, y in zip(two, one.losses)) <= 1e-5


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, base):
    data = write_dataset(tmp_path / "data", n=2)
    model = convert.load_transformer(base)
    poisoned = []
    model.final_layer.register_forward_hook(lambda m, i, out: out * float("nan") if poisoned else out)
    cfg = tiny_config(base, data, tmp_path / "out", steps=8, checkpoint_every=2)

    def poison(step, loss):
        if step == 3:
            poisoned.append(True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TrainingError, match=r"loss is nan at step 4.*last good checkpoint is .*step-0000002"):
            train(cfg, model=model, encoders=standin_encoders(), on_step=poison)
    ckpts = list_checkpoints(tmp_path / "out" / "checkpoints")
    assert [p.name for p in ckpts] == ["step-0000002.safetensors"]
    assert all(torch.isfinite(v).all() for v in load_file(ckpts[0]).values())
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    assert len(open(tmp_path / "out" / "log.jsonl").readlines()) == 3
    assert all(torch.isfinite(p).all() for p in lora_parameters(model))  # the bad step was not applied


def test_checkpoint_blocks_same_gradients():
    """Activation checkpointing applied from outside recomputes the blocks: the gradients do not change."""
    p = CASES["sd3.5-medium-like"]
    model = randomize_(SD3(p)).train()
    x, t, context, pooled = sd3_inputs(p)
    attention_calls = []
    for block in model.joint_blocks:  # counts the block forwards, the recomputation included
        block.attention.register_forward_pre_hook(lambda *args: attention_calls.append(1))
    grads, calls = [], []
    for checkpointed in (False, True):
        if checkpointed:
            checkpoint_blocks(model)
        model.zero_grad()
        attention_calls.clear()
        model(x, t, context, pooled, temperature=1.5).square().mean().backward()
        grads.append(torch.cat([q.grad.flatten() for q in model.parameters()]))
        calls.append(len(attention_calls))
    assert calls == [p.depth, 2 * p.depth]  # each block runs again in the backward pass
    assert grads[0].abs().max() > 0 and rel_err(grads[1], grads[0]) <= 1e-5


def test_gradient_checkpointing_and_bf16_autocast(tmp_path, base):
    data = write_dataset(tmp_path / "data", n=2)
    kw = dict(steps=2, lr=1e-2, cache=str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = train(tiny_config(base, data, tmp_path / "plain", **kw), encoders=standin_encoders())
        ckpt = train(tiny_config(base, data, tmp_path / "ckpt", gradient_checkpointing=True, **kw))
        bf16 = train(tiny_config(base, data, tmp_path / "bf16", dtype="bfloat16", mixed_precision="bf16", **kw),
                     encoders=standin_encoders())  # another dtype: another cache
    assert ckpt.losses == plain.losses
    a, b = (load_file(tmp_path / name / "lora.safetensors") for name in ("plain", "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert bf16.model.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16
    assert bf16.model.double_blocks[0].img_attn.qkv.lora[ADAPTER].lora_A.dtype == torch.float32
    assert max(abs(x - y) / y for x, y in zip(bf16.losses, plain.losses)) < 0.05


def test_sd3_trains_with_per_sample_temperature(tmp_path):
    """SD3.5-Medium-like (no guidance input), t ~ U[0, 1] and t_min = 0.5: batches mix gamma and plain attention."""
    p = CASES["sd3.5-medium-like"]
    write_sai(tmp_path / "sd3.safetensors", sai_state(p), torch.float32)
    data = write_dataset(tmp_path / "data", n=2)
    cfg = tiny_config(tmp_path / "sd3.safetensors", data, tmp_path / "out", steps=3, lr=1e-2,
                      timesteps="uniform", t_min=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train(cfg, encoders=standin_encoders(p.context_in_dim, p.adm_in_channels))
    log = [json.loads(s) for s in open(tmp_path / "out" / "log.jsonl")]
    assert any(e["t_min"] < 0.5 <= e["t_max"] for e in log)
    x0, context, pooled = result.data.load([0, 1])
    x = dict(x=x0, t=torch.tensor([0.9, 0.3]), context=context, pooled=pooled)
    with torch.no_grad():
        mine = convert.load_transformer(tmp_path / "sd3.safetensors")
        plain = mine(**x, temperature=1.3)
        convert.load_lora(mine, tmp_path / "out" / "lora.safetensors")
        trained = result.model(**x, temperature=1.3)
        assert rel_err(mine(**x, temperature=1.3), trained) <= 1e-4 and rel_err(plain, trained) > 1e-3


def test_buckets_crop_and_batches(tmp_path):
    for r in (16, 64, 512, 1024):
        sizes = bucket_sizes(r)
        assert (r, r) in sizes
        assert all(h * w <= r * r and h % 16 == 0 and w % 16 == 0 and max(h, w) <= 2 * min(h, w) for h, w in sizes)
    assert target_size(2000, 1000, 1024, buckets=True) == (704, 1408)  # aspect 2
    assert target_size(2000, 1000, 1024, buckets=False) == (1024, 1024)
    thirds = Image.new("RGB", (48, 16))
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        thirds.paste(color, (16 * i, 0, 16 * (i + 1), 16))
    thirds.save(tmp_path / "thirds.png")
    x = load_image(tmp_path / "thirds.png", 16, buckets=False)  # the middle third
    assert torch.equal(x, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16))
    assert load_image(tmp_path / "thirds.png", 64, buckets=True).shape == (3, 48, 80)  # the widest bucket

    sizes = [(8, 8)] * 5 + [(8, 16)] * 2
    sampler = BatchSampler(sizes, batch_size=2, seed=3)
    assert sampler.per_epoch == 3 + 1
    epoch = [sampler(s) for s in range(4)]
    flat = [i for b in epoch for i in b]
    assert set(flat) == set(range(7)) and len(flat) == 8  # one sample repeated to fill the last batch of 5
    assert all(len({sizes[i] for i in b}) == 1 for b in epoch)
    assert [BatchSampler(sizes, 2, 3)(s) for s in (5, 2)] == [sampler(5), sampler(2)]  # a function of (seed, step)
    assert [sampler(s) for s in range(4, 8)] != epoch  # reshuffled each epoch


def test_manifest_and_config(tmp_path):
    (tmp_path / "img").mkdir()
    rows = ['{"image": "img/a.png", "caption": " a cat "}', "", '{"image": "img/b.png", "caption": "dog"}']
    (tmp_path / "m.jsonl").write_text("\n".join(rows))
    assert scan(tmp_path / "m.jsonl") == [Item(tmp_path / "img/a.png", "a cat"), Item(tmp_path / "img/b.png", "dog")]
    (tmp_path / "bad.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected"):
        scan(tmp_path / "bad.jsonl")
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "lonely.png")
    with pytest.warns(UserWarning, match="without a .txt caption.*lonely.png"):
        with pytest.raises(ValueError, match="no image"):
            scan(tmp_path / "img")

    toml = tmp_path / "run.toml"
    toml.write_text('model = "m"\ndata = "d"\noutput = "o"\nsteps = 7\nt-min = 0.9\ntargets = ["attn", "mlp"]\n')
    cfg = make_config(toml, steps=9, lr=None)
    assert (cfg.steps, cfg.t_min, cfg.targets, cfg.lr) == (9, 0.9, ["attn", "mlp"], 1e-4)
    toml.write_text('model = "m"\nsteps_total = 3\n')
    with pytest.raises(ValueError, match="unknown setting.*steps_total"):
        make_config(toml)
    bad = {'steps = "two"': "steps = 'two': expected int", 'lr = "x"': "lr = 'x': expected float",
           "batch-size = 1.5": "batch-size = 1.5: expected int", 'fsdp = "yes"': "fsdp = 'yes': expected bool",
           "model = 5": "model = 5: expected str", "steps = true": "steps = True: expected int",
           "targets = [1]": r"targets = \[1\]: expected list\[str\]", "steps = [": "not valid TOML"}
    for text, message in bad.items():  # one line naming the file and the value, before the flags are merged
        toml.write_text(text + "\n")
        with pytest.raises(ValueError, match=f"^{toml}: {message}"):
            make_config(toml, model="m")
    toml.write_text('lr = 1\ntargets = "attn,mlp"\n')  # an integer is a float; a comma-separated string
    assert (make_config(toml, model="m", data="d", output="o").lr, make_config(toml, model="m", data="d",
            output="o").targets) == (1, ["attn", "mlp"])
    with pytest.raises(ValueError, match="no data, output"):
        make_config(None, model="m")
    with pytest.raises(ValueError, match="timesteps must be one of"):
        TrainConfig(model="m", data="d", output="o", timesteps="cosine")


def test_cli_end_to_end_on_a_pipeline_folder(tmp_path, caplog, capsys):
    """`python -m training` on a tiny Diffusers-format FLUX folder: the cache equals Diffusers' encodings; resume."""
    pipe, folder = tiny_flux_pipeline(tmp_path)
    data = write_dataset(tmp_path / "data", n=2, size=(40, 32))
    out = tmp_path / "out"

    def args(steps: int) -> list[str]:
        return ["--model", str(folder), "--data", str(data), "--output", str(out), "--steps", str(steps),
                "--batch-size", "2", "--resolution", "32", "--rank", "2", "--dtype", "float32",
                "--mixed-precision", "no", "--device", "cpu", "--no-progress", "--checkpoint-every", "1"]

    caplog.set_level("INFO")
    with pytest.warns(UserWarning, match=CORRUPT):
        assert main(args(2)) == 0
    assert "2 pairs (2 encoded now, 1 unreadable images skipped)" in caplog.text
    for file in (out / "cache").glob("*.safetensors"):  # the cache holds what Diffusers' pipeline computes
        cached = load_file(file)
        with safe_open(str(file), "pt") as f:
            meta = f.metadata()
        with torch.no_grad():
            x = load_image(Path(meta["image"]), 32, buckets=False)[None]  # (1, 3, 32, 32), center-cropped
            vae = pipe.vae.config
            latent = (pipe.vae.encode(x).latent_dist.mean - vae.shift_factor) * vae.scaling_factor
            context, pooled, _ = pipe.encode_prompt(meta["caption"], prompt_2=None, max_sequence_length=512)
        assert [cached[k].shape for k in ("latent", "context", "pooled")] == [(16, 4, 4), (512, 64), (32,)]
        assert rel_err(cached["latent"], latent[0]) <= 1e-4
        assert rel_err(cached["context"], context[0]) <= 1e-4 and rel_err(cached["pooled"], pooled[0]) <= 1e-4
    assert main(args(3)) == 2  # no --resume: the earlier run's checkpoints are not overwritten
    assert "pass --resume" in capsys.readouterr().err
    caplog.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main([*args(3), "--resume"]) == 0
    assert "(0 encoded now" in caplog.text and "resumed from" in caplog.text
    assert [json.loads(s)["step"] for s in open(out / "log.jsonl")] == [1, 2, 3]
    convert.load_lora(convert.load_transformer(folder), out / "lora.safetensors")


def test_every_flag_has_help_with_its_default():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest: a.help for a in parser._actions if a.dest != "help"}
    assert set(helps) == {f.name for f in fields(TrainConfig)} | {"config"} and all(helps.values())
    assert helps["steps"].endswith("(default 1000)") and helps["lr"].endswith("(default 0.0001)")
    assert helps["targets"].endswith("(default attn)") and helps["progress"].endswith("(default on)")
    assert helps["buckets"].endswith("(default off)") and helps["model"].endswith("(required)")
    for name in ("alpha", "cache", "device", "resume"):  # None: the help says what happens
        assert "default" in helps[name]


def test_training_imports_no_package_above_it():
    """Layers: mmdit <- convert <- sampling <- training <- benchmarks, scripts (and the top-level cli)."""
    code = "import json, sys, training, training.cli; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(json.loads(run.stdout))
    assert {"mmdit", "convert", "sampling", "training"} <= loaded
    assert not {"benchmarks", "scripts", "cli", "tests"} & loaded
