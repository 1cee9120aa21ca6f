"""`mmdit train --fsdp`: the model sharded with FSDP2 over 2 gloo processes on the CPU (tiny FLUX file).

Checked against the runs without FSDP: 2 FSDP processes x 2 samples give the losses, checkpoints
(LoRA and AdamW state) and LoRA file of 1 process x 2 micro-batches of 2, tensor for tensor (the
same sums: gradients averaged over 2 processes, or summed over 2 halved micro-steps); an FSDP
checkpoint resumed without FSDP, and one written without FSDP resumed with it, end where the
uninterrupted runs end, exactly; a stop request reaching one process stops both at the same step;
--fsdp in a single process is refused with a line saying how to launch it. One spawn of 2 processes
runs every multi-process run, one after the other (the module's fixture `runs`).
"""

import json
import socket
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor
from training_builders import config_dict, standin_encoders, stop_at_step_2, tiny_config, write_dataset, write_tiny_flux

import convert
from sampling.offload import blocks_of
from training import TrainConfig, train
from training.checkpoint import list_checkpoints
from training.cli import main

STEP2 = Path("checkpoints") / "step-0000002.safetensors"
STEPS = ("step-0000002.safetensors", "step-0000003.safetensors")


def runs_worker(rank: int, port: int, configs: list[dict], stop_config: dict, signal_at: int) -> None:
    """One of 2 gloo processes: the training runs `configs`, in order, in one process group; then `stop_config`,
    where rank 0 sends itself SIGTERM at its block forward number `signal_at` and both must stop at step 2."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        for config in configs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = train(TrainConfig(**config))
            # FSDP sharded every weight, the frozen base's and the LoRA's (without it, none)
            sharded = [isinstance(p, DTensor) for p in result.model.parameters()]
            assert all(sharded) if config["fsdp"] else not any(sharded), config["output"]
        stop_at_step_2(rank, stop_config, {0: signal_at})
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_losses(output: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(output / "log.jsonl")]


def assert_same_file(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys(), (a, b)
    for k in x:
        assert torch.equal(x[k], y[k]), (a, b, k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The single-process runs (1 process x 2 micro-batches of 2), then one spawn of 2 processes for the rest.
    Returns the folder of every run's output, and the single-process results."""
    tmp = tmp_path_factory.mktemp("fsdp")
    base = write_tiny_flux(tmp / "tiny-flux.safetensors")
    data = write_dataset(tmp / "data", n=4)
    kw = dict(steps=3, batch_size=4, lr=1e-2, checkpoint_every=2, cache=str(tmp / "cache"))
    full = {**kw, "train": "full", "lr": 1e-3, "max_grad_norm": 0.0}  # unclipped: the same sums
    bf16 = {**kw, "dtype": "bfloat16", "mixed_precision": "bf16"}  # the defaults: a bf16 base, a float32 LoRA
    before = torch.get_num_threads()  # module scope: set up before `one_thread`
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the corrupt file of the dataset
        one = train(tiny_config(base, data, tmp / "one", grad_accum=2, **kw), encoders=standin_encoders())
        unclipped = train(tiny_config(base, data, tmp / "one-unclipped", grad_accum=2, max_grad_norm=0.0, **kw))
        train(tiny_config(base, data, tmp / "one-full", grad_accum=2, **full))
        train(tiny_config(base, data, tmp / "one-bf16", grad_accum=2, **bf16), encoders=standin_encoders())
    torch.set_num_threads(before)
    configs = [
        tiny_config(base, data, tmp / "fsdp", fsdp=True, **kw),
        tiny_config(base, data, tmp / "ddp", **kw),
        tiny_config(base, data, tmp / "fsdp-unclipped", fsdp=True, max_grad_norm=0.0, **kw),
        # each mode resumed from the other's checkpoint of step 2
        tiny_config(base, data, tmp / "fsdp-from-ddp", fsdp=True, resume=str(tmp / "ddp" / STEP2), **kw),
        tiny_config(base, data, tmp / "ddp-from-fsdp", resume=str(tmp / "fsdp" / STEP2), **kw),
        tiny_config(base, data, tmp / "fsdp-full", fsdp=True, **full),
        tiny_config(base, data, tmp / "fsdp-bf16", fsdp=True, **bf16),
    ]
    stop = tiny_config(base, data, tmp / "stopped", fsdp=True, **{**kw, "steps": 4, "checkpoint_every": 10})
    blocks = len(blocks_of(convert.load_transformer(base)))
    mp.spawn(runs_worker, args=(free_port(), [config_dict(c) for c in configs], config_dict(stop), 2 * blocks + 2),
             nprocs=2)  # the signal: in step 3's forward, at its third block
    return tmp, one, unclipped


def test_fsdp_equals_one_process(runs):
    tmp, one, unclipped = runs
    # the gradients' norm is summed in another order over the shards: the clipped run is equal to
    # float32 rounding, the unclipped one exactly
    assert log_losses(tmp / "fsdp-unclipped") == unclipped.losses
    assert_same_file(tmp / "fsdp-unclipped" / "lora.safetensors", tmp / "one-unclipped" / "lora.safetensors")
    for step in STEPS:
        assert_same_file(tmp / "fsdp-unclipped" / "checkpoints" / step, tmp / "one-unclipped" / "checkpoints" / step)
    assert max(abs(x - y) / y for x, y in zip(log_losses(tmp / "fsdp"), one.losses)) <= 1e-6
    a, b = load_file(tmp / "fsdp" / "lora.safetensors"), load_file(tmp / "one" / "lora.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)
    assert all(b[k].abs().max() > 1e-3 for k in b if "lora_B" in k)  # B moved away from 0
    for step in STEPS:  # the same checkpoints as the 2-process run without FSDP
        x, y = load_file(tmp / "fsdp" / "checkpoints" / step), load_file(tmp / "ddp" / "checkpoints" / step)
        assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=1e-5, atol=1e-6) for k in x)


def test_fsdp_full_training_writes_the_whole_transformer(runs):
    """--train full --fsdp: every weight trains sharded; transformer.safetensors is gathered whole (BFL keys),
    the file 1 process x 2 micro-batches writes, up to float32 rounding, which AdamW's normalized steps magnify
    for the weights of tiny gradients: each tensor's update within 1e-3 of its largest (the LoRA runs above
    agree bit for bit)."""
    tmp, _, _ = runs
    a, b = (load_file(tmp / run / "transformer.safetensors") for run in ("fsdp-full", "one-full"))
    base = load_file(tmp / "tiny-flux.safetensors")
    assert a.keys() == b.keys() == base.keys()
    for k in a:
        update = (b[k] - base[k]).abs().max()
        assert update > 1e-4 and (a[k] - b[k]).abs().max() <= 1e-3 * update, k  # trained, the same way
    assert max(abs(x - y) / y for x, y in zip(log_losses(tmp / "fsdp-full"), log_losses(tmp / "one-full"))) <= 1e-6


def test_fsdp_with_a_bf16_base(runs):
    """The defaults (a bf16 base under bf16 autocast, the LoRA in float32): FSDP gathers the two dtypes of a
    block together; the same steps as 1 process x 2 micro-batches."""
    tmp, _, _ = runs
    assert log_losses(tmp / "fsdp-bf16") == log_losses(tmp / "one-bf16")
    assert_same_file(tmp / "fsdp-bf16" / "lora.safetensors", tmp / "one-bf16" / "lora.safetensors")


def test_resume_across_modes_is_exact(runs):
    """Resumed in the other mode from step 2: step 3 and the LoRA are those of the uninterrupted run."""
    tmp, _, _ = runs
    for resumed, uninterrupted in (("fsdp-from-ddp", "ddp"), ("ddp-from-fsdp", "fsdp")):
        assert log_losses(tmp / resumed) == log_losses(tmp / uninterrupted)[2:]
        assert_same_file(tmp / resumed / "lora.safetensors", tmp / uninterrupted / "lora.safetensors")


def test_fsdp_processes_stop_together_when_one_is_signalled(runs):
    """As tests/test_training_inputs.py's 2-process stop, with --fsdp: the processes meet at every block (its
    weights are all-gathered), so the signalled one must not abandon the step alone; both stop at step 2."""
    tmp, _, _ = runs
    assert [p.name for p in list_checkpoints(tmp / "stopped" / "checkpoints")] == ["step-0000002.safetensors"]
    assert len(log_losses(tmp / "stopped")) == 2
    assert not (tmp / "stopped" / "lora.safetensors").exists()


def test_fsdp_in_one_process_is_refused(tmp_path, capsys):
    cfg = tiny_config(tmp_path / "no-model.safetensors", tmp_path / "no-data", tmp_path / "out", fsdp=True)
    with pytest.raises(ValueError, match=r"torchrun --nproc-per-node N"):
        train(cfg)
    assert main(["--model", cfg.model, "--data", cfg.data, "--output", cfg.output, "--fsdp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mmdit train: --fsdp shards the model") and "torchrun" in err[0]
    assert not (tmp_path / "out").exists()
