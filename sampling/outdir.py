"""The folder `mmdit sample --prompts FILE --outdir DIR` fills: image names, the manifest, resuming.

    DIR/manifest.jsonl               one line per image, in index order: index, file, prompt, seed, every setting
    DIR/manifest.parts/rank-N.jsonl  the lines process N appends as it writes (folded into manifest.jsonl at the end)
    DIR/000000.png, ...              --layout index (the default): {index:06d}.png
    DIR/samples/{prompt}_{index:06d}.png   --layout t2i-compbench

`--layout t2i-compbench` is the layout the official T2I-CompBench evaluation scripts read
(Karine-Huang/T2I-CompBench, commit 1b70949, `Readme.md` lines 71-88: "examples/samples/" holding
"a green bench and a blue bowl_000000.png", the question_id being the last 6 digits):
- they list every file of `DIR/samples` (`BLIPvqa_eval/BLIP_vqa.py` line 79 counts them), so the folder
  must hold this run's images and nothing else;
- they sort by the number after the last "_" (`BLIP_vqa.py` line 21, `CLIPScore_eval/CLIP_similarity.py`
  line 48) or after the first one (`UniDet_eval/experts/obj_detection/generate_dataset.py` line 25), and
  read the prompt back as the name up to the first "_" (`BLIP_vqa.py` line 31, `CLIP_similarity.py` line 59,
  `UniDet_eval/2D_spatial_eval.py` line 167): a prompt holding "_" (or "/") cannot be named, and is refused;
- the index counts images prompt-major, as their generator does (`GORS_finetune/inference_eval.py`
  line 108: `f"{prompts[0]}_{base_count:06}.png"`), so that `3_in_1_eval/3_in_1.py` (lines 55-69) finds
  prompt i's 10 images at i*10 .. i*10+9.

Resuming: an image is done when its file exists *and* a manifest line (in manifest.jsonl or a part)
records it. Files are written whole (`convert.files.write_atomic`, synced before the rename), then
their line is appended to the writer's part with one `os.write` of the whole line on an O_APPEND
descriptor, synced: a run killed at any moment leaves whole images, whole lines and at most a torn
last line of a part, which is ignored (and cut off before that part grows again), so its image is
drawn again. The end of a run (`merge`) rewrites manifest.jsonl atomically from itself and the parts,
then deletes the parts; a run killed before that leaves them to the next run's merge.

Settings: a folder holds one run's settings. A line recorded with other settings than this run gives
its image (another model, steps, size, TACA, LoRA, dtype, layout, or another prompt or seed at that
index) is an error naming the first difference, never a silent mix; `version` and `batch_size` are
recorded but not compared (see `sampling/batch.py` on what the batch size changes).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from convert.files import check_can_create, write_atomic

from .prompt_file import Item

LAYOUTS = ("index", "t2i-compbench")
MANIFEST = "manifest.jsonl"
PARTS = "manifest.parts"
SAMPLES = "samples"  # the image folder of --layout t2i-compbench
NOT_COMPARED = ("index", "version", "batch_size")  # recorded, but a rerun may change them
NAME_MAX = 255  # bytes in a file name (Linux, macOS)
TEMPORARY = re.compile(r"\.(.+)\.[0-9a-f]{12}\.tmp")  # convert.files.write_atomic's temporary files


def image_name(layout: str, item: Item) -> str:
    """Where an item's PNG goes, relative to DIR."""
    if layout == "t2i-compbench":
        return f"{SAMPLES}/{item.prompt}_{item.index:06d}.png"
    return f"{item.index:06d}.png"


def check_names(layout: str, items: list[Item], source: Path) -> None:
    """Refuse a prompt the layout cannot name (T2I-CompBench: the prompt is the file name), naming its line."""
    if layout != "t2i-compbench":
        return
    for item in items:
        where = f"{source} line {item.line}"
        if not item.prompt.strip():
            raise ValueError(f"{where}: --layout t2i-compbench names each image after its prompt, and this "
                             "prompt is empty")
        bad = next((c for c in ("_", "/", "\0") if c in item.prompt), None)
        if bad is not None:
            raise ValueError(f"{where}: --layout t2i-compbench names each image after its prompt, and the benchmark's "
                             f"scripts read the prompt back up to the first '_': a prompt cannot hold {bad!r}")
        if len(Path(image_name(layout, item)).name.encode()) > NAME_MAX:
            raise ValueError(f"{where}: the prompt is too long to be a file name ({NAME_MAX} bytes with "
                             f"'_{item.index:06d}.png') for --layout t2i-compbench")


def check_outdir(outdir: Path) -> None:
    """Refuse, before any work and without creating it, a DIR that could not take the images: a file in the
    way, or a folder (DIR, or the nearest existing folder above it) where no file can be created."""
    existing = next(p for p in (outdir, *outdir.parents) if p.exists())
    if not existing.is_dir():
        raise NotADirectoryError(f"{outdir}: {existing} is not a folder")
    check_can_create(existing, outdir)


def png_bytes(image: Image.Image, text: dict[str, str]) -> bytes:
    """The image encoded as PNG, `text` as its text chunks."""
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    encoded = io.BytesIO()
    image.save(encoded, format="PNG", pnginfo=info)
    return encoded.getvalue()


def write_synced(path: Path, data: bytes) -> None:
    """`data` as the whole file at `path`, atomically, on the disk before the file takes its name."""
    def write(name: str) -> None:
        with open(name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    write_atomic(path, write)


# ---- the manifest: whole lines only ----


def read_lines(path: Path) -> list[dict]:
    """The records of a manifest or part file; a torn last line (no newline at its end) is ignored.
    Any other line that is not a JSON object with an index and a file is an error naming the file and line."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    lines = data.split(b"\n")[:-1]  # the last piece is "" or a torn line
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} line {number}: not a manifest line ({e}); delete the line to draw its "
                             "image again") from None
        if not (isinstance(record, dict) and type(record.get("index")) is int and isinstance(record.get("file"), str)):
            raise ValueError(f"{path} line {number}: not a manifest line (no index or file); delete the line to "
                             "draw its image again")
        records.append(record)
    return records


def part_files(outdir: Path) -> list[Path]:
    return sorted((outdir / PARTS).glob("*.jsonl"))


def recorded(outdir: Path) -> dict[int, dict]:
    """{index: record} from manifest.jsonl and every part (a part's line wins: it is newer)."""
    found = {}
    for path in (outdir / MANIFEST, *part_files(outdir)):
        for record in read_lines(path):
            found[record["index"]] = record
    return found


class Part:
    """One process's part of the manifest, appended whole lines at a time."""

    def __init__(self, outdir: Path, rank: int):
        self.path = outdir / PARTS / f"rank-{rank:05d}.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):  # a torn line of a killed run: cut it, so lines stay whole
            os.ftruncate(self.fd, data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        if os.write(self.fd, line) != len(line):  # one write on O_APPEND: the line lands whole, at the end
            raise OSError(f"{self.path}: short write (disk full?)")
        os.fsync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def first_difference(old: dict, new: dict) -> str | None:
    for key in dict.fromkeys([*new, *old]):
        if key not in NOT_COMPARED and old.get(key) != new.get(key):
            return key
    return None


def scan(outdir: Path, records: list[dict]) -> list[bool]:
    """Which of this run's images are done (`records[i]`: the manifest line item i will get), after the
    checks that keep a folder to one run. Writes nothing. Raises ValueError: a folder of other files, a
    recorded image with other settings or beyond this run's items, or (T2I-CompBench) foreign files
    in the samples folder."""
    if not outdir.exists():
        return [False] * len(records)
    ours = not list(os.scandir(outdir)) or (outdir / MANIFEST).exists() or (outdir / PARTS).exists()
    if not ours and any(not e.name.startswith(".") for e in os.scandir(outdir)):
        raise ValueError(f"{outdir}: holds files but no {MANIFEST}, so it is not a folder of `mmdit sample "
                         "--prompts`: name a new or empty folder")
    found = recorded(outdir)
    beyond = sorted(i for i in found if not 0 <= i < len(records))
    if beyond:
        raise ValueError(f"{outdir}: records image {beyond[0]}, and this run has {len(records)} images (0 to "
                         f"{len(records) - 1}): the prompts or seeds changed; give another --outdir")
    for i, old in sorted(found.items()):
        key = first_difference(old, records[i])
        if key is not None:
            renumbered = " (images are numbered prompt-major: other --seeds or another prompt file renumber them)"
            raise ValueError(f"{outdir}: image {i} was made with {key}={old.get(key)!r}, this run gives it "
                             f"{key}={records[i].get(key)!r}"
                             f"{renumbered if key in ('prompt', 'seed', 'negative') else ''}: a folder holds one "
                             "run's settings; give another --outdir, or the same settings to resume")
    if records and records[0]["file"].startswith(f"{SAMPLES}/") and (outdir / SAMPLES).is_dir():
        names = {Path(r["file"]).name for r in records}
        foreign = sorted(e.name for e in os.scandir(outdir / SAMPLES)
                         if e.name not in names and not is_our_temporary(e.name, names))
        if foreign:
            raise ValueError(f"{outdir / SAMPLES}: holds {len(foreign)} file(s) this run does not make (first: "
                             f"{foreign[0]!r}); the T2I-CompBench scripts read every file there: move them out")
    return [i in found and (outdir / found[i]["file"]).is_file() for i in range(len(records))]


def is_our_temporary(name: str, names: set[str]) -> bool:
    m = TEMPORARY.fullmatch(name)
    return m is not None and m[1] in names


def remove_temporaries(outdir: Path, records: list[dict], manifest: bool = True) -> None:
    """Delete the temporary files a killed run left beside the images of `records` (write_atomic's), and
    beside manifest.jsonl when `manifest` (the process that merges)."""
    folders: dict[Path, set[str]] = {outdir: {MANIFEST} if manifest else set()}
    for r in records:
        path = outdir / r["file"]
        folders.setdefault(path.parent, set()).add(path.name)
    for folder, names in folders.items():
        if folder.is_dir():
            for e in os.scandir(folder):
                if is_our_temporary(e.name, names):
                    os.unlink(e.path)


def merge(outdir: Path, n: int) -> int:
    """Rewrite manifest.jsonl, atomically and in index order, from itself and every part (the lines
    whose image exists), then delete the parts. Returns the number of lines."""
    found = recorded(outdir)
    lines = [found[i] for i in sorted(found) if i < n and (outdir / found[i]["file"]).is_file()]
    write_synced(outdir / MANIFEST, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines).encode())
    for part in part_files(outdir):
        part.unlink()
    if (outdir / PARTS).is_dir() and not list(os.scandir(outdir / PARTS)):
        (outdir / PARTS).rmdir()
    return len(lines)
