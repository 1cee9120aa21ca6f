"""What `mmdit probe` writes: the attention probe (mmdit/probe.py) of one sampling run as a CSV and a heat map.

The CSV has one row per (model call, layer): `step, t, layer, n_txt, n_img, uniform, text_mass, head_0, ...`,
where `step` counts the model calls (one per sampler step; with --slg, SLG's steps add the skip
branch's call, with the same t), `text_mass` is the mean over image queries and heads of the
attention mass on text keys, `head_i` the same per head, and `uniform = n_txt / (n_txt + n_img)` the
mass a uniform attention would give (the dilution baseline). With classifier-free guidance the
batch is [negative | positive]: the rows are the positive branch's. The heat map is drawn with PIL
(no plotting library needed): one column per layer, one row per step, darker = less text mass.
"""

from __future__ import annotations

import csv
from collections import Counter
from itertools import accumulate
from pathlib import Path

from PIL import Image, ImageDraw

from convert.files import write_atomic
from mmdit.probe import AttentionProbe

CELL, LEFT, HEAD = 12, 60, 40  # heat map: cell size, left and top margins (pixels)
COLORS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]  # viridis, low to high


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
