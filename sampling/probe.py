"""What `mmdit probe` writes: the attention probe (mmdit/probe.py) of one sampling run as a CSV and a heat map.

The CSV has one row per (model call, layer): `step, t, layer, n_txt, n_img, uniform, text_mass, head_0, ...`,
where `step` counts the model calls (one per sampler step; with --slg, SLG's steps add the skip
branch's call, with the same t), `text_mass` is the mean over image queries and heads of the
attention mass on text keys, `head_i` the same per head, and `uniform = n_txt / (n_txt + n_img)` the
mass a uniform attention would give (the dilution baseline). With classifier-free guidance the
batch is [negative | positive]: the rows are the positive branch's.

The heat map is drawn with PIL (no plotting library needed): one column per layer (its name on the
axis), one row per step (its t). A cell's color says how the text mass compares with the uniform
share, on one fixed scale for every run (`color`): white where it equals the uniform share, blue where
text gets less (suppression), red where it gets more, full color at 8x less or more (`RATIO_RANGE`).
So two maps, plain and TACA (or two image sizes), compare cell by cell: the same color is the same
ratio to the uniform share. `mmdit probe` writes the image drawn beside them (sampling/cli.py).
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from itertools import accumulate
from pathlib import Path

from PIL import Image, ImageDraw

from convert.files import write_atomic
from mmdit.probe import AttentionProbe

CELL, LEFT, TOP = 14, 60, 30  # heat map: cell size, left margin (the t labels), title band (pixels)
RATIO_RANGE = 8.0  # the color scale runs from uniform / 8 (full blue) to uniform x 8 (full red)
BLUE, WHITE, RED = (33, 102, 172), (255, 255, 255), (178, 24, 43)  # a diverging scale (ColorBrewer RdBu ends)


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


def color(mass: float, uniform: float) -> tuple[int, int, int]:
    """The color of a text mass against the uniform share: white at the share, blue below, red above; the shade
    is log(mass / uniform) over log(RATIO_RANGE), clipped to [-1, 1]."""
    x = math.log(max(mass, 1e-12) / uniform) / math.log(RATIO_RANGE)
    x = min(max(x, -1.0), 1.0)
    end = RED if x > 0 else BLUE
    return tuple(round(w + (e - w) * abs(x)) for w, e in zip(WHITE, end))


def vertical_text(text: str) -> Image.Image:
    """`text` in black, turned to read bottom to top (for column labels)."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text)
    label = Image.new("RGB", (measure[2] + 2, measure[3] + 2), "white")
    ImageDraw.Draw(label).text((1, 0), text, fill="black")
    return label.rotate(90, expand=True)


def grid_top(layers: list[str]) -> int:
    """The heat map's first row of cells, in pixels from the top: below the title and the layer names."""
    return TOP + max(vertical_text(n).height for n in layers) + 4


def heatmap(probe: AttentionProbe, title: str) -> Image.Image:
    """Steps (rows, labelled with t) x layers (columns, labelled with their names) of the text mass, colored
    against the uniform share (`color`), with the color scale beside it."""
    table = probe.table()  # (steps, layers)
    steps, layers = table.shape
    names = probe.layers()
    first = probe.records[0]
    uniform = first.n_txt / (first.n_txt + first.n_img)
    labels = [vertical_text(n) for n in names]
    head = grid_top(names)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength
    bar_x = LEFT + layers * CELL + 14
    width = int(max(bar_x + 150, measure(title) + 8))
    image = Image.new("RGB", (width, head + max(steps * CELL, 130) + 10), "white")
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title, fill="black")
    draw.text((4, 4 + 12), f"{first.n_txt} text and {first.n_img} image tokens: uniform share {uniform:.3f}", fill="black")
    for j, label in enumerate(labels):
        image.paste(label, (LEFT + j * CELL + (CELL - label.width) // 2, head - 2 - label.height))
    step_t = {r.step: r.t for r in probe.records}
    for s in range(steps):
        y = head + s * CELL
        draw.text((4, y + 1), f"t={step_t.get(s, float('nan')):.3f}", fill="black")
        for j in range(layers):
            value = table[s, j].item()
            fill = "lightgray" if value != value else color(value, uniform)  # NaN: no record
            draw.rectangle((LEFT + j * CELL, y, LEFT + (j + 1) * CELL - 1, y + CELL - 1), fill=fill)
    groups = Counter(name.split(".")[0] for name in names)  # in the model's order
    for edge in accumulate(list(groups.values())[:-1]):  # a black line between double and single blocks
        draw.line((LEFT + edge * CELL - 1, head, LEFT + edge * CELL - 1, head + steps * CELL - 1), fill="black")
    # the scale: 120 px from uniform x 8 (top) to uniform / 8 (bottom), white in the middle at the uniform share
    for i in range(121):
        ratio = RATIO_RANGE ** (1 - i / 60)
        draw.line((bar_x, head + i, bar_x + 12, head + i), fill=color(ratio * uniform, uniform))
    draw.rectangle((bar_x, head, bar_x + 12, head + 120), outline="gray")
    for ratio, text in ((RATIO_RANGE, f"x{RATIO_RANGE:g} ({min(1.0, RATIO_RANGE * uniform):.3g})"), (1.0, f"uniform ({uniform:.3g})"),
                        (1 / RATIO_RANGE, f"/{RATIO_RANGE:g} ({uniform / RATIO_RANGE:.3g})")):
        y = head + round(60 * (1 - math.log(ratio, RATIO_RANGE)))
        draw.line((bar_x + 12, y, bar_x + 16, y), fill="black")
        draw.text((bar_x + 19, y - 6), text, fill="black")
    draw.text((bar_x, head + 126), "text mass", fill="black")
    return image
