"""Writers for discovery results: JSONL, COCO, CSV and VOC XML, with resume.

Every writer is a context manager with ``write(record)`` and a ``done`` set of image
names already present in the output (for ``--resume``). Records are plain dicts::

    {"image": "photos/a.jpg", "width": 640, "height": 480,
     "boxes": [[x0, y0, x1, y1], ...], "scores": [...], "seed": [row, col], "error": null}

- ``jsonl``: one line per image, flushed as it goes; an interrupted run leaves every
  finished line valid (a torn last line is dropped on resume).
- ``coco``: a COCO results list (``image_id``, ``category_id`` 1, ``bbox`` as x, y, w, h,
  ``score``) plus an ``images`` list, in one JSON object ``{"images": [...],
  "annotations": [...], "categories": [...]}``; rewritten atomically every few images and
  at the end, so an interruption leaves a valid file. ``annotations`` is the results list.
- ``csv``: one row per box (``image,width,height,x0,y0,x1,y1,score,seed_row,seed_col,
  error``); an image without a box gets one row with empty box fields.
- ``voc``: one Pascal VOC XML per image in a folder (object name ``object``).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "coco", "csv", "voc")
CSV_FIELDS = [
    "image",
    "width",
    "height",
    "x0",
    "y0",
    "x1",
    "y1",
    "score",
    "seed_row",
    "seed_col",
    "error",
]


def result_record(result: Any, name: str) -> dict[str, Any]:
    """Turn a :class:`discover.pipeline.ImageResult` into the output record dict."""
    dets = result.detections
    return {
        "image": name,
        "width": result.width,
        "height": result.height,
        "boxes": [[_num(v) for v in d.box] for d in dets],
        "scores": [round(float(d.score), 6) for d in dets],
        "seed": list(dets[0].seed) if dets else None,
        "error": result.error,
    }


def _num(v: float) -> int | float:
    f = float(v)
    return int(f) if f.is_integer() else round(f, 2)


def open_writer(path: str | os.PathLike[str], fmt: str, *, resume: bool = False) -> Writer:
    """Open the writer for ``fmt`` at ``path`` (a folder for ``voc``).

    Raises:
        OSError: when the output cannot be created or written.
        ValueError: for an unknown format, or an existing output that cannot be resumed.
    """
    cls = {"jsonl": JsonlWriter, "coco": CocoWriter, "csv": CsvWriter, "voc": VocWriter}
    if fmt not in cls:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return cls[fmt](Path(path), resume=resume)


class Writer:
    """Base class: tracks the images written so far."""

    def __init__(self, path: Path, *, resume: bool = False) -> None:
        self.path = path
        self.done: set[str] = set()
        self.count = 0

    def write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    _f: Any = None
    """The open output file of writers that stream to one."""

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JsonlWriter(Writer):
    def __init__(self, path: Path, *, resume: bool = False) -> None:
        super().__init__(path, resume=resume)
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            self.done, valid_bytes = read_jsonl_done(path)
            with open(path, "r+b") as f:  # drop a torn last line
                f.truncate(valid_bytes)
            self._f = open(path, "a", encoding="utf-8")
        else:
            self._f = open(path, "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()
        self.done.add(record["image"])
        self.count += 1


def read_jsonl_done(path: Path) -> tuple[set[str], int]:
    """Image names of the complete lines of a JSONL output, and their byte length."""
    done: set[str] = set()
    valid = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(rec, dict) and "image" in rec:
                done.add(rec["image"])
            valid += len(line)
    return done, valid


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All complete records of a JSONL output."""
    out = []
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


class CocoWriter(Writer):
    SAVE_EVERY = 50

    def __init__(self, path: Path, *, resume: bool = False) -> None:
        super().__init__(path, resume=resume)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        if resume and path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.images = list(data["images"])
                self.annotations = list(data["annotations"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"cannot resume from {path}: not a regdiscover COCO file") from e
            self.done = {im["file_name"] for im in self.images}
        self._dirty = 0
        self._save()  # fail now, not at the end, when the path is not writable

    def write(self, record: dict[str, Any]) -> None:
        image_id = len(self.images) + 1
        self.images.append(
            {
                "id": image_id,
                "file_name": record["image"],
                "width": record["width"],
                "height": record["height"],
                "error": record["error"],
            }
        )
        for box, score in zip(record["boxes"], record["scores"], strict=True):
            x0, y0, x1, y1 = box
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [x0, y0, _num(x1 - x0), _num(y1 - y0)],
                    "area": _num((x1 - x0) * (y1 - y0)),
                    "score": score,
                }
            )
        self.done.add(record["image"])
        self.count += 1
        self._dirty += 1
        if self._dirty >= self.SAVE_EVERY:
            self._save()

    def _save(self) -> None:
        data = {
            "images": self.images,
            "annotations": self.annotations,
            "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
        }
        atomic_write(self.path, json.dumps(data))
        self._dirty = 0

    def close(self) -> None:
        self._save()


class CsvWriter(Writer):
    def __init__(self, path: Path, *, resume: bool = False) -> None:
        super().__init__(path, resume=resume)
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = b""
        if resume and path.exists():
            data = path.read_bytes()
            kept = data[: data.rfind(b"\n") + 1]  # drop a torn last row
            text = kept.decode("utf-8")
            header = text.splitlines()[0] if text else ""
            if header and header.split(",") != CSV_FIELDS:
                raise ValueError(f"cannot resume from {path}: not a regdiscover CSV file")
            rows = list(csv.DictReader(io.StringIO(text, newline="")))
            self.done = {r["image"] for r in rows}
            with open(path, "r+b") as f:
                f.truncate(len(kept))
        self._f = open(path, "a" if kept else "w", encoding="utf-8", newline="")
        self._w = csv.DictWriter(self._f, CSV_FIELDS)
        if not kept:  # new file, or nothing but a torn header: start with the header
            self._w.writeheader()
        self._f.flush()

    def write(self, record: dict[str, Any]) -> None:
        base = {
            "image": record["image"],
            "width": record["width"],
            "height": record["height"],
            "error": record["error"] or "",
        }
        seed = record["seed"] or ["", ""]
        rows = []
        if not record["boxes"]:
            rows.append(base)
        for box, score in zip(record["boxes"], record["scores"], strict=True):
            row = dict(base, x0=box[0], y0=box[1], x1=box[2], y1=box[3], score=score)
            row.update(seed_row=seed[0], seed_col=seed[1])
            rows.append(row)
        # All the rows of one image in one write: an interruption cannot leave an image
        # with only some of its boxes behind a complete line.
        buf = io.StringIO(newline="")
        csv.DictWriter(buf, CSV_FIELDS).writerows(rows)
        self._f.write(buf.getvalue())
        self._f.flush()
        self.done.add(record["image"])
        self.count += 1


class VocWriter(Writer):
    """One XML per image under the folder ``path``; resume reads the folder."""

    def __init__(self, path: Path, *, resume: bool = False) -> None:
        super().__init__(path, resume=resume)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--format voc writes a folder of XML files; {path} is a file")
        path.mkdir(parents=True, exist_ok=True)
        self._index = path / "index.jsonl"
        self._stems: dict[str, str] = {}
        """XML stem -> image name, so that ``a.jpg`` and ``a.png`` get different files."""
        if resume and self._index.exists():
            self.done, valid = read_jsonl_done(self._index)
            with open(self._index, "r+b") as f:
                f.truncate(valid)
            for rec in read_jsonl(self._index):
                self._stems[os.path.splitext(str(rec.get("xml", "")))[0]] = rec.get("image")
        elif self._index.exists():
            self._index.unlink()
        self._f = open(self._index, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        name = record["image"]
        stem = unique_stem(name, self._stems)
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = name
        size = ET.SubElement(root, "size")
        ET.SubElement(size, "width").text = str(record["width"] or 0)
        ET.SubElement(size, "height").text = str(record["height"] or 0)
        ET.SubElement(size, "depth").text = "3"
        if record["error"]:
            ET.SubElement(root, "error").text = record["error"]
        for box, score in zip(record["boxes"], record["scores"], strict=True):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = "object"
            ET.SubElement(obj, "score").text = str(score)
            bb = ET.SubElement(obj, "bndbox")
            # VOC is 1-based inclusive: our [x0, x1) pixel box becomes [x0 + 1, x1].
            for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), _voc_coords(box), strict=True):
                ET.SubElement(bb, tag).text = str(v)
        ET.indent(root)
        atomic_write(self.path / f"{stem}.xml", ET.tostring(root, encoding="unicode"))
        self._f.write(json.dumps({"image": name, "xml": f"{stem}.xml"}) + "\n")
        self._f.flush()
        self.done.add(name)
        self.count += 1


def unique_stem(name: str, used: dict[str, str]) -> str:
    """A flat file stem for image ``name``, unique among ``used`` (stem -> name; updated).

    ``photos/a.jpg`` becomes ``photos__a``; when another image already owns that stem
    (``photos/a.png``), the extension is kept: ``photos__a.png``, then a counter.
    """
    flat = name.replace("\\", "/").strip("/").replace("../", "").replace("/", "__")
    base, ext = os.path.splitext(flat)
    candidates = [base or "image", f"{base or 'image'}{ext}"]
    candidates += [f"{candidates[1]}-{i}" for i in range(2, len(used) + 3)]
    for stem in candidates:
        if used.get(stem, name) == name:
            used[stem] = name
            return stem
    raise AssertionError("unreachable: there are more candidates than used stems")


def _voc_coords(box: list[float]) -> list[int]:
    x0, y0, x1, y1 = box
    return [int(round(x0)) + 1, int(round(y0)) + 1, int(round(x1)), int(round(y1))]


def atomic_write(path: Path, data: str | bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file and :func:`os.replace`.

    Readers see the old file or the new one, never a torn one. ``fsync`` also flushes the
    data to disk before the rename (for caches that must survive a power loss).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
