"""`mmdit probe PROMPT`: the attention probe (mmdit/probe.py) over one sampling run, written as CSV and PNG.

The CSV has one row per (step, layer): `step, t, layer, n_txt, n_img, uniform, text_mass, head_0, ...`,
where `text_mass` is the mean over image queries and heads of the attention mass on text keys,
`head_i` the same per head, and `uniform = n_txt / (n_txt + n_img)` the mass a uniform attention
would give (the dilution baseline). With classifier-free guidance the batch is [negative | positive]:
the rows are the positive branch's. The PNG beside it (same name, `.png`) is a heat map drawn with
PIL (no plotting library needed): one column per layer, one row per step, darker = less text mass.
The run is `mmdit sample`'s with the same flags, except that the latents are not decoded.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path

from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from mmdit.probe import AttentionProbe

CELL, LEFT, HEAD = 12, 60, 40  # heat map: cell size, left and top margins (pixels)
COLORS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # viridis, low to high


def write_atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` beside `path`, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def csv_rows(probe: AttentionProbe, sample: int = -1) -> list[dict[str, object]]:
    """One dict per record (step, layer) for sample `sample` of the batch (default the last: CFG's positive branch)."""
    rows = []
    for r in probe.records:
        heads = r.text_mass[sample]  # (H,)
        row = {"step": r.step, "t": f"{r.t:.6g}", "layer": r.layer, "n_txt": r.n_txt, "n_img": r.n_img,
               "uniform": f"{r.n_txt / (r.n_txt + r.n_img):.6g}", "text_mass": f"{heads.mean().item():.6g}"}
        rows.append(row | {f"head_{h}": f"{m:.6g}" for h, m in enumerate(heads.tolist())})
    return rows


def write_csv(probe: AttentionProbe, path: Path) -> None:
    rows = csv_rows(probe)
    if not rows:
        raise ValueError("the probe recorded no joint attention: nothing to write")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    write_atomic(path, write)


def color(x: float) -> tuple[int, int, int]:
    """x in [0, 1] -> an RGB color along COLORS."""
    x = min(max(x, 0.0), 1.0) * (len(COLORS) - 1)
    i = min(int(x), len(COLORS) - 2)
    a, b, f = COLORS[i], COLORS[i + 1], x - i
    return tuple(round(u + (v - u) * f) for u, v in zip(a, b))


def heatmap(probe: AttentionProbe, title: str) -> Image.Image:
    """Steps (rows, labelled with t) x layers (columns) of the text mass, scaled to its maximum, with a color bar."""
    table = probe.table()  # (steps, layers)
    top = table.nan_to_num(0).max().item() or 1.0
    steps, layers = table.shape
    groups = Counter(name.split(".")[0] for name in probe.layers())  # in the model's order
    columns = "layers: " + ", then ".join(f"{n} {g}" for g, n in groups.items())
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    width = int(max(LEFT + layers * CELL + 90, measure(title) + 8, LEFT + measure(columns) + 8))
    image = Image.new("RGB", (width, HEAD + max(steps * CELL, 110) + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill="black")
    draw.text((LEFT, HEAD - 14), columns, fill="black")
    step_t = {r.step: r.t for r in probe.records}
    for s in range(steps):
        y = HEAD + s * CELL
        draw.text((4, y), f"t={step_t.get(s, float('nan')):.3f}", fill="black")
        for j in range(layers):
            value = table[s, j].item()
            fill = "lightgray" if value != value else color(value / top)  # NaN: no record
            draw.rectangle((LEFT + j * CELL, y, LEFT + (j + 1) * CELL - 1, y + CELL - 1), fill=fill)
    for edge in accumulate(list(groups.values())[:-1]):  # a white line between double and single blocks
        draw.line((LEFT + edge * CELL - 1, HEAD, LEFT + edge * CELL - 1, HEAD + steps * CELL - 1), fill="white")
    x = LEFT + layers * CELL + 10
    for i in range(100):  # color bar, top = max
        draw.line((x, HEAD + i, x + 12, HEAD + i), fill=color(1 - i / 99))
    draw.text((x + 16, HEAD - 4), f"{top:.3g}", fill="black")
    draw.text((x + 16, HEAD + 92), "0", fill="black")
    return image


def add_probe(sub) -> None:
    from .cli import DTYPES, parse_size

    p = sub.add_parser(
        "probe", help="attention mass of image queries on text keys, per layer and step",
        description="Sample like `mmdit sample` and record, per step and layer, the share of attention that image "
        "queries give to text keys (with TACA applied). Writes OUTPUT (CSV) and OUTPUT with .png (heat map).",
    )
    p.add_argument("prompt")
    p.add_argument("--model", help="Diffusers folder, official single file, or hub repo id (default: the shipped tiny model)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="FLUX-dev: distilled guidance; SD3: CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--taca", type=float, metavar="GAMMA", help="TACA: image-to-text logits x GAMMA")
    p.add_argument("--taca-until", type=float, default=0.97, metavar="T",
                   help="TACA is on while the noise level t >= T (paper: 0.97; 0: every step)")
    p.add_argument("--size", type=parse_size, metavar="WxH", help="default: the model's (1024x1024; the tiny model 32x32)")
    p.add_argument("-o", "--output", default="probe.csv", type=Path)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.set_defaults(func=probe)


def probe(args: argparse.Namespace) -> int:
    import torch

    from mmdit.probe import probe_attention

    from .cli import DTYPES, default_model, save_atomic
    from .loading import load_pipeline
    from .taca import TacaSchedule

    model = args.model or default_model()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, DTYPES[args.dtype or ("bf16" if device.startswith("cuda") else "fp32")])
    pipe = load_pipeline(model, device=device, dtype=dtype)
    steps = pipe.defaults.steps if args.steps is None else args.steps
    guidance = pipe.defaults.guidance if args.guidance is None else args.guidance
    taca = None if args.taca is None else TacaSchedule(args.taca, args.taca_until)
    width, height = args.size or (pipe.defaults.size, pipe.defaults.size)
    with probe_attention(pipe.transformer) as result:
        pipe.generate([args.prompt], height=height, width=width, steps=steps, guidance=guidance, seed=args.seed,
                      temperature=taca, output="latent", progress=True)
    write_csv(result, args.output)
    settings = {"prompt": args.prompt, "model": model, "steps": steps, "guidance": guidance, "seed": args.seed,
                "taca": f"gamma={taca.gamma} until t={taca.until}" if taca else "off", "size": f"{width}x{height}"}
    title = f"text mass of image queries: {pipe.variant}, {width}x{height}, taca {settings['taca']}"
    png = PngInfo()
    for k, v in settings.items():
        png.add_text(k, str(v))
    save_atomic(heatmap(result, title), args.output.with_suffix(".png"), png)
    print(f"wrote {args.output} ({len(result.records)} rows: {result.step + 1} steps x {len(result.layers())} layers) "
          f"and {args.output.with_suffix('.png')}")
    return 0
