"""`mmdit sample --prompts FILE --outdir DIR`: one image per (prompt, seed), on one process or many (torchrun).

The items (sampling/prompt_file.py) are cut into fixed batches by index: batch k holds items
k*B .. k*B + B - 1 (B = --batch-size). A batch is drawn in one `generate` call, each item's initial
noise drawn alone from its own seed (`generate(seed=[...])`), and its images written one by one with
their manifest lines (sampling/outdir.py). Because the batches are fixed by index, an item is always
computed beside the same other items, whatever the number of processes or where a killed run stopped:
the same command gives byte-identical PNGs on 1 or N processes, and a resumed run redraws exactly the
pixels the killed one would have written. Another --batch-size draws the same noise, but the batched
kernels (a matrix product over B rows) may round differently, so a pixel can differ by one level of
255; a folder may still be resumed with another batch size (it is recorded, not compared).

Under torchrun (RANK, WORLD_SIZE and LOCAL_RANK in the environment) every process reads the folder,
then all wait for each other (so none writes before all have seen the same folder), then process r
draws the unfinished batches r, r + N, r + 2N, ... on `cuda:LOCAL_RANK` (the CPU without CUDA). The
processes exchange only counts (the progress bar's) and a barrier, so they talk over gloo, on the CPU,
whatever device they draw on. At the end process 0 merges every part into manifest.jsonl, in index
order; a run killed before that leaves the parts, which the next run (any number of processes) merges.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from .outdir import Part, image_name, merge, png_bytes, remove_temporaries, scan, write_synced
from .pipeline import Pipeline
from .prompt_file import Item


@dataclass(frozen=True)
class Processes:
    """This process's place among those torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Processes:
        """From torchrun's variables RANK, WORLD_SIZE, LOCAL_RANK (PyTorch `torch.distributed.run` docs)."""
        try:
            return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                       int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None

    def device(self, given: str | None) -> str | None:
        """The device this process draws on: `given` alone; under torchrun cuda:LOCAL_RANK, else the CPU."""
        if self.world == 1:
            return given
        if given is not None and given != "cpu":
            raise ValueError(f"--device {given}: under torchrun each process takes cuda:LOCAL_RANK (the CPU without "
                             "CUDA); leave --device out, or give cpu")
        if given == "cpu" or not torch.cuda.is_available():
            return "cpu"
        if self.local_rank >= torch.cuda.device_count():
            raise ValueError(f"process LOCAL_RANK={self.local_rank} has no GPU: this machine has "
                             f"{torch.cuda.device_count()}; start at most that many (torchrun --nproc-per-node)")
        return f"cuda:{self.local_rank}"


@dataclass(frozen=True)
class Run:
    """Where and how the images go: the folder, its layout (sampling/outdir.py), the batch size, the
    nearest-neighbour enlargement of each PNG."""

    outdir: Path
    layout: str = "index"
    batch_size: int = 1
    upscale: int = 1


@contextmanager
def process_group(procs: Processes) -> Iterator[None]:
    """torch.distributed over gloo among torchrun's processes (env:// rendezvous); nothing for one process."""
    if procs.world == 1:
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def total(n: int, procs: Processes) -> int:
    """The sum of `n` over every process (`n` alone for one process)."""
    if procs.world == 1:
        return n
    count = torch.tensor(n, dtype=torch.int64)
    dist.all_reduce(count)
    return int(count)


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


def item_text(text: dict[str, str], item: Item, negative: str | None) -> dict[str, str]:
    """The PNG text of one item: the run's settings (`text`, as `mmdit sample` writes them) with its own
    prompt, seed and negative prompt."""
    out = {k: v for k, v in text.items() if k != "negative"} | {"prompt": item.prompt, "seed": str(item.seed)}
    return out if negative is None else out | {"negative": negative}


def manifest_line(item: Item, file: str, text: dict[str, str], run: Run) -> dict:
    """One line of manifest.jsonl: index, prompt, seed, file, then every setting of the PNG, the layout
    and the batch size."""
    settings = {k: v for k, v in text.items() if k not in ("prompt", "seed")}
    return {"index": item.index, "prompt": item.prompt, "seed": item.seed, "file": file, **settings,
            "layout": run.layout, "batch_size": run.batch_size}


def negatives_used(pipe: Pipeline, settings: dict, items: list[Item], source: Path) -> list[str | None]:
    """Each item's negative prompt (its line's, else --negative): all None where the run uses none, with a
    warning when the file gives some (FLUX without true CFG, SD3 without CFG: `Pipeline.inert`)."""
    if all(item.negative is None for item in items):
        return [settings["negative_prompt"]] * len(items)
    if "negative_prompt" in pipe.inert(settings["guidance"], "", settings["true_cfg"]):
        print(f"mmdit sample: warning: {source}: the negative prompts do nothing on {pipe.variant} with these "
              "settings: not applied, not recorded", file=sys.stderr)
        return [None] * len(items)
    return [settings["negative_prompt"] if item.negative is None else item.negative for item in items]


def draw(pipe: Pipeline, settings: dict, items: list[Item], negatives: list[str | None]) -> list[Image.Image]:
    """One batch: one `generate` call, each item's noise from its own seed."""
    negative = None
    if any(n is not None for n in negatives):  # a list; "" where an item has none (SD3, FLUX.2: the same as None)
        negative = ["" if n is None else n for n in negatives]
    kwargs = settings | {"seed": [item.seed for item in items], "negative_prompt": negative}
    return pipe.generate([item.prompt for item in items], **kwargs)


def sample_items(pipe: Pipeline, settings: dict, text: dict[str, str], items: list[Item], source: Path, run: Run,
                 procs: Processes = Processes()) -> int:
    """Draw every item not done yet into `run.outdir`, this process's share of the batches; returns 0.

    settings: `generate`'s keyword arguments (`sampling.cli.load_run`); text: the PNG text of the run
    (`sampling.cli.png_text`), each item's prompt, seed and negative put in. source: the prompt file, for
    messages. Raises ValueError (sampling/outdir.py `scan`), before anything is written, where the folder
    holds another run's images or files that are not this run's.
    """
    negatives = negatives_used(pipe, settings, items, source)
    texts = [item_text(text, item, n) for item, n in zip(items, negatives)]
    files = [image_name(run.layout, item) for item in items]
    lines = [manifest_line(item, f, t, run) for item, f, t in zip(items, files, texts)]
    done = scan(run.outdir, lines)  # every process reads the folder ...
    b = run.batch_size
    batches = [range(k, min(k + b, len(items))) for k in range(0, len(items), b)]
    todo = [batch for batch in batches if not all(done[i] for i in batch)]
    mine = todo[procs.rank::procs.world]
    with process_group(procs):
        barrier(procs)  # ... before any writes: all see the same folder, so all agree on `todo`
        remove_temporaries(run.outdir, [lines[i] for batch in mine for i in batch], manifest=procs.rank == 0)
        part = Part(run.outdir, procs.rank) if mine else None
        bar = tqdm(total=len(items), initial=sum(done), unit="image", desc="sampling", disable=procs.rank != 0)
        start, written = time.perf_counter(), 0
        for r in range(math.ceil(len(todo) / procs.world)):  # every process takes part in every round's count
            new = 0
            if r < len(mine):
                batch = [items[i] for i in mine[r]]
                for item, image in zip(batch, draw(pipe, settings, batch, [negatives[i.index] for i in batch])):
                    if done[item.index]:  # drawn again only for its batch mates
                        continue
                    if run.upscale > 1:
                        image = image.resize((image.width * run.upscale, image.height * run.upscale),
                                             Image.Resampling.NEAREST)
                    write_synced(run.outdir / files[item.index], png_bytes(image, texts[item.index]))
                    part.append(lines[item.index])
                    new += 1
            n = total(new, procs)
            written += n
            bar.update(n)
        seconds = time.perf_counter() - start
        bar.close()
        if part is not None:
            part.close()
        barrier(procs)  # every part is complete
        if procs.rank == 0:
            recorded = merge(run.outdir, len(items))
            rate = f": {written / seconds:.2f} images/s" if written else ""
            print(f"wrote {written} images in {seconds:.1f} s{rate} ({len(items) - written} already there, "
                  f"{procs.world} process{'es' if procs.world > 1 else ''}); {run.outdir / 'manifest.jsonl'}: "
                  f"{recorded} of {len(items)} images")
    return 0
