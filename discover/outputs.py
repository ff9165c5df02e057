"""Output formats of discovery results: JSONL, COCO, CSV and VOC XML.

Each format is one :class:`Writer` subclass that writes records, reads its own files
back (for ``--resume``, merging the parts of a distributed run, and the HTML report) and
writes a merged file. Records are plain dicts::

    {"image": "photos/a.jpg", "width": 640, "height": 480,
     "boxes": [[x0, y0, x1, y1], ...], "scores": [...], "seed": [row, col], "error": null}

- ``jsonl``: one line per image, flushed as it goes; an interrupted run leaves every
  finished line valid (a torn last line is dropped on resume; a corrupt line elsewhere
  is skipped and counted, the lines after it are kept).
- ``coco``: a COCO results list (``image_id``, ``category_id`` 1, ``bbox`` as x, y, w, h,
  ``score``) plus an ``images`` list, in one JSON object ``{"info": ..., "images": [...],
  "annotations": [...], "categories": [...]}``; rewritten atomically every few images and
  at the end, so an interruption leaves a valid file.
- ``csv``: one row per box (``image,width,height,x0,y0,x1,y1,score,seed_row,seed_col,
  error``); an image without a box gets one row with empty box fields.
- ``voc``: one Pascal VOC XML per image in a folder (object name ``object``), and an
  ``index.jsonl`` naming the XML of each image.

Nothing is truncated before the first record: a writer checks its target when it is
made but creates or replaces the file only at its first :meth:`Writer.write`, so a run
that fails before its first image leaves an existing output as it was. The run's
settings go to a sidecar, ``<output>.settings.json`` (``settings.json`` inside a VOC
folder; COCO's ``info`` holds them too), written with the first record.
"""

from __future__ import annotations

import csv
import io
import json
import os
import secrets
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

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
SETTINGS_FORMAT = "regdiscover.settings/1"
VIZ_INDEX = "index.jsonl"
"""In a ``--viz`` folder: one ``{"image": name, "png": file}`` line per picture drawn."""
_COCO_CATEGORIES = [{"id": 1, "name": "object", "supercategory": "object"}]


class OutputError(ValueError):
    """An output that cannot be written, resumed or merged as asked."""


class MissingImages(OutputError):
    """Images that should be in an output are in none of the sources of a merge."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"{len(names)} image(s) are in no output (e.g. {names[0]})")
        self.names = names


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


@dataclass
class Contents:
    """What an output file holds, as its writer reads it back."""

    entries: dict[str, Any] = field(default_factory=dict)
    """``{image name: entry}`` in file order; an entry is everything written for that
    image, untouched (a JSON line, CSV rows, a COCO image and its annotations, a VOC
    index line and its XML path)."""
    corrupt: int = 0
    """Lines or rows that could not be read (skipped)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Format-specific parts (COCO ``categories`` and ``info``)."""


class Writer:
    """Base class of the formats: tracks the images written, defers the first write.

    Args:
        path: the output file (a folder for ``voc``).
        resume: keep what the output holds and append; :attr:`done` names those images.
        settings: the run's settings, written to the sidecar with the first record.

    Raises:
        OSError: the target cannot be written (checked without touching it).
        OutputError: the target has the wrong kind (a folder for a file format...), or
            an existing output that is not of this format.
    """

    fmt: ClassVar[str] = ""

    def __init__(
        self, path: Path, *, resume: bool = False, settings: dict[str, Any] | None = None
    ) -> None:
        self.path = Path(path)
        self.resume = resume
        self.settings = settings
        self.done: set[str] = set()
        self.count = 0
        self.corrupt = 0
        self.previous_settings: dict[str, Any] | None = None
        """The sidecar of the output resumed (``None`` when there is none)."""
        self.sidecar_extra: dict[str, Any] = {}
        """More sidecar fields, written beside ``settings`` (see :func:`write_settings`)."""
        self._opened = False
        self._f: Any = None
        self.check_target()
        if resume and self.exists():
            try:
                contents = self.read(self.path)
            except (OSError, ValueError) as e:
                raise OutputError(f"cannot resume from {self.path}: {e}") from e
            self.done = set(contents.entries)
            self.corrupt = contents.corrupt
            self.previous_settings = read_settings(self.path, self.fmt)

    @property
    def base_cwd(self) -> str:
        """The folder the output's relative image names start from: the working directory
        of the run that began it (recorded in its sidecar), else the current one."""
        cwd = (self.previous_settings or {}).get("cwd")
        return cwd if isinstance(cwd, str) and cwd else os.getcwd()

    # -- the target ----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.path.is_file()

    def check_target(self) -> None:
        """Fail now when the output cannot be written; creates and truncates nothing."""
        p = self.path
        if p.is_dir():
            raise OutputError(f"{p} is a folder (--format {self.fmt} writes a file)")
        _check_writable(p)

    # -- writing -------------------------------------------------------------------------
    def write(self, record: dict[str, Any]) -> None:
        if not self._opened:
            self._open()
            self._opened = True
            if self.settings is not None:
                write_settings(
                    self.path, self.fmt, self.settings, self.sidecar_extra, cwd=self.base_cwd
                )
        self._write(record)
        self.done.add(record["image"])
        self.count += 1

    def _open(self) -> None:
        raise NotImplementedError

    def _write(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self._f.close()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading and merging ---------------------------------------------------------------
    @classmethod
    def read(cls, path: Path) -> Contents:
        """The images of an output of this format (empty when it does not exist)."""
        raise NotImplementedError

    @classmethod
    def records(cls, path: Path) -> list[dict[str, Any]]:
        """The output's records, one dict per image (the format of :func:`result_record`)."""
        raise NotImplementedError

    @classmethod
    def write_merged(cls, out: Path, ordered: Sequence[tuple[str, Any]], extra: dict) -> None:
        """Write ``ordered`` entries (from :meth:`read`) as one output, atomically."""
        raise NotImplementedError


# -- JSONL ----------------------------------------------------------------------------------
class JsonlWriter(Writer):
    fmt = "jsonl"

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.resume and self.exists():
            _, valid = _scan_jsonl(self.path)
            with open(self.path, "r+b") as f:  # drop a torn last line
                f.truncate(valid)
            self._f = open(self.path, "a", encoding="utf-8")
        else:
            self._f = open(self.path, "w", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    @classmethod
    def read(cls, path: Path) -> Contents:
        if not Path(path).is_file():
            return Contents()
        lines, _ = _scan_jsonl(Path(path))
        out = Contents()
        for rec in lines:
            if isinstance(rec, dict) and "image" in rec:
                out.entries.setdefault(rec["image"], json.dumps(rec) + "\n")
            else:
                out.corrupt += 1
        return out

    @classmethod
    def records(cls, path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in cls.read(path).entries.values()]

    @classmethod
    def write_merged(cls, out: Path, ordered: Sequence[tuple[str, Any]], extra: dict) -> None:
        atomic_write(out, "".join(line for _, line in ordered))


def _scan_jsonl(path: Path) -> tuple[list[Any], int]:
    """The parsed complete lines of a JSONL file (a corrupt line gives ``None``) and the
    byte length up to the end of the last complete line (a torn last line excluded)."""
    parsed: list[Any] = []
    valid = 0
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            valid += len(line)
            if not line.strip():
                continue
            try:
                parsed.append(json.loads(line))
            except (json.JSONDecodeError, UnicodeDecodeError):
                parsed.append(None)
    return parsed, valid


def read_jsonl_done(path: Path) -> tuple[set[str], int]:
    """Image names of the complete lines of a JSONL output, and their byte length."""
    parsed, valid = _scan_jsonl(Path(path))
    return {r["image"] for r in parsed if isinstance(r, dict) and "image" in r}, valid


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All readable records of a JSONL output (a corrupt line is skipped, not an end)."""
    parsed, _ = _scan_jsonl(Path(path))
    return [r for r in parsed if isinstance(r, dict)]


# -- COCO -----------------------------------------------------------------------------------
class CocoWriter(Writer):
    fmt = "coco"
    SAVE_EVERY = 50

    def __init__(self, path: Path, **kwargs: Any) -> None:
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        super().__init__(path, **kwargs)
        if self.resume and self.exists():
            data = _read_coco(self.path)  # read already by Writer: valid here
            self.images = list(data["images"])
            self.annotations = list(data["annotations"])
        self._dirty = 0

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict[str, Any]) -> None:
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
        self._dirty += 1
        # The first record at once (the file is valid from then on), then every few.
        if self._dirty >= self.SAVE_EVERY or len(self.images) == 1:
            self._save()

    def _save(self) -> None:
        info = {"settings": self.settings} if self.settings is not None else None
        _write_coco(self.path, self.images, self.annotations, None, info)
        self._dirty = 0

    def close(self) -> None:
        if self._opened:
            self._save()

    @classmethod
    def read(cls, path: Path) -> Contents:
        if not Path(path).is_file():
            return Contents()
        data = _read_coco(Path(path))
        by_id = {im["id"]: (im, []) for im in data["images"]}
        try:
            for ann in data["annotations"]:
                by_id[ann["image_id"]][1].append(ann)
        except (KeyError, TypeError) as e:
            raise OutputError(f"{path} is not a regdiscover COCO file") from e
        entries = {im["file_name"]: (im, anns) for im, anns in by_id.values()}
        extra = {"categories": data.get("categories"), "info": data.get("info")}
        return Contents(entries, 0, extra)

    @classmethod
    def records(cls, path: Path) -> list[dict[str, Any]]:
        out = []
        for name, (im, anns) in cls.read(path).entries.items():
            boxes = [[a["bbox"][0], a["bbox"][1], _num(a["bbox"][0] + a["bbox"][2]),
                      _num(a["bbox"][1] + a["bbox"][3])] for a in anns]  # fmt: skip
            out.append(
                {
                    "image": name,
                    "width": im.get("width"),
                    "height": im.get("height"),
                    "boxes": boxes,
                    "scores": [a.get("score") for a in anns],
                    "seed": None,
                    "error": im.get("error"),
                }
            )
        return out

    @classmethod
    def write_merged(cls, out: Path, ordered: Sequence[tuple[str, Any]], extra: dict) -> None:
        images, annotations = [], []
        for n, (_, (im, anns)) in enumerate(ordered, start=1):
            images.append({**im, "id": n})
            for ann in anns:
                annotations.append({**ann, "id": len(annotations) + 1, "image_id": n})
        _write_coco(out, images, annotations, extra.get("categories"), extra.get("info"))


def _read_coco(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
            raise TypeError("images and annotations must be lists")
        for im in data["images"]:
            im["id"], im["file_name"]  # noqa: B018 - the keys every entry needs
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise OutputError(f"{path} is not a regdiscover COCO file") from e
    return data


def _write_coco(
    path: Path,
    images: list[dict[str, Any]],
    annotations: list[dict[str, Any]],
    categories: list[dict[str, Any]] | None,
    info: dict[str, Any] | None,
) -> None:
    data: dict[str, Any] = {}
    if info is not None:
        data["info"] = {"description": "regdiscover object discovery results", **info}
    data.update(images=images, annotations=annotations, categories=categories or _COCO_CATEGORIES)
    atomic_write(path, json.dumps(data))


# -- CSV ------------------------------------------------------------------------------------
class CsvWriter(Writer):
    fmt = "csv"

    def __init__(self, path: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        if self.resume and self.exists():
            header = _csv_text(self.path).partition("\n")[0].rstrip("\r")
            if header and header.split(",") != CSV_FIELDS:
                raise OutputError(f"cannot resume from {self.path}: not a regdiscover CSV file")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = b""
        if self.resume and self.exists():
            data = self.path.read_bytes()
            kept = data[: data.rfind(b"\n") + 1]  # drop a torn last row
            with open(self.path, "r+b") as f:
                f.truncate(len(kept))
        self._f = open(self.path, "a" if kept else "w", encoding="utf-8", newline="")
        if not kept:  # new file, or nothing but a torn header: start with the header
            csv.DictWriter(self._f, CSV_FIELDS).writeheader()
        self._f.flush()

    def _write(self, record: dict[str, Any]) -> None:
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

    @classmethod
    def read(cls, path: Path) -> Contents:
        if not Path(path).is_file():
            return Contents()
        out = Contents()
        for row in csv.DictReader(io.StringIO(_csv_text(Path(path)), newline="")):
            if not row.get("image") or None in row:  # no name, or too many fields
                out.corrupt += 1
                continue
            out.entries.setdefault(row["image"], []).append(row)
        return out

    @classmethod
    def records(cls, path: Path) -> list[dict[str, Any]]:
        out = []
        for name, rows in cls.read(path).entries.items():
            first = rows[0]
            boxed = [r for r in rows if r.get("x0") not in (None, "")]
            out.append(
                {
                    "image": name,
                    "width": _int_or_none(first.get("width")),
                    "height": _int_or_none(first.get("height")),
                    "boxes": [[_number(r[k]) for k in ("x0", "y0", "x1", "y1")] for r in boxed],
                    "scores": [_number(r["score"]) for r in boxed],
                    "seed": [int(first["seed_row"]), int(first["seed_col"])]
                    if first.get("seed_row") not in (None, "")
                    else None,
                    "error": first.get("error") or None,
                }
            )
        return out

    @classmethod
    def write_merged(cls, out: Path, ordered: Sequence[tuple[str, Any]], extra: dict) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for _, rows in ordered:
            writer.writerows(rows)
        atomic_write(out, buf.getvalue())


def _csv_text(path: Path) -> str:
    text = path.read_bytes().decode("utf-8", errors="replace")
    return text[: text.rfind("\n") + 1]  # a torn last row is not a row


def _number(text: str) -> int | float:
    return _num(float(text))


def _int_or_none(text: str | None) -> int | None:
    return int(text) if text not in (None, "") else None


# -- VOC ------------------------------------------------------------------------------------
class VocWriter(Writer):
    """One XML per image under the folder ``path``; ``index.jsonl`` maps images to XMLs."""

    fmt = "voc"

    def __init__(self, path: Path, **kwargs: Any) -> None:
        self._stems: dict[str, str] = {}
        """XML stem -> image name, so that ``a.jpg`` and ``a.png`` get different files."""
        super().__init__(path, **kwargs)
        if self.resume:
            for rec, _ in self.read(self.path).entries.values():
                self._stems[os.path.splitext(str(rec.get("xml", "")))[0].lower()] = rec.get("image")

    @property
    def index(self) -> Path:
        return self.path / "index.jsonl"

    def exists(self) -> bool:
        return self.index.is_file()

    def check_target(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"--format voc writes a folder of XML files; {self.path} is a file")
        _check_writable(self.path / "index.jsonl")

    def _open(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        if self.resume and self.index.exists():
            _, valid = _scan_jsonl(self.index)
            with open(self.index, "r+b") as f:
                f.truncate(valid)
        elif self.index.exists():
            self.index.unlink()
        self._f = open(self.index, "a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
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

    @classmethod
    def read(cls, path: Path) -> Contents:
        index = Path(path) / "index.jsonl"
        if not index.is_file():
            return Contents()
        out = Contents()
        for rec in _scan_jsonl(index)[0]:
            if isinstance(rec, dict) and "image" in rec and "xml" in rec:
                out.entries.setdefault(rec["image"], (rec, Path(path) / Path(rec["xml"]).name))
            else:
                out.corrupt += 1
        return out

    @classmethod
    def records(cls, path: Path) -> list[dict[str, Any]]:
        import defusedxml.ElementTree as SafeET  # no entity expansion

        out = []
        for name, (_rec, xml) in cls.read(path).entries.items():
            root = SafeET.parse(xml).getroot()
            boxes, scores = [], []
            for obj in root.iter("object"):
                xmin, ymin, xmax, ymax = (int(obj.findtext(f"bndbox/{t}") or 0)
                                          for t in ("xmin", "ymin", "xmax", "ymax"))  # fmt: skip
                boxes.append([xmin - 1, ymin - 1, xmax, ymax])
                scores.append(float(obj.findtext("score") or "nan"))
            out.append(
                {
                    "image": name,
                    "width": int(root.findtext("size/width") or 0) or None,
                    "height": int(root.findtext("size/height") or 0) or None,
                    "boxes": boxes,
                    "scores": scores,
                    "seed": None,
                    "error": root.findtext("error"),
                }
            )
        return out

    @classmethod
    def write_merged(cls, out: Path, ordered: Sequence[tuple[str, Any]], extra: dict) -> None:
        out.mkdir(parents=True, exist_ok=True)
        for _, (_rec, xml) in ordered:
            if xml.parent != out:
                atomic_write(out / xml.name, xml.read_bytes())
        atomic_write(out / "index.jsonl", "".join(json.dumps(r) + "\n" for _, (r, _) in ordered))


WRITERS: dict[str, type[Writer]] = {
    "jsonl": JsonlWriter,
    "coco": CocoWriter,
    "csv": CsvWriter,
    "voc": VocWriter,
}


def writer_class(fmt: str) -> type[Writer]:
    try:
        return WRITERS[fmt]
    except KeyError:
        raise OutputError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}") from None


def open_writer(
    path: str | os.PathLike[str],
    fmt: str,
    *,
    resume: bool = False,
    settings: dict[str, Any] | None = None,
) -> Writer:
    """The writer of ``fmt`` for ``path`` (a folder for ``voc``); see :class:`Writer`."""
    return writer_class(fmt)(Path(path), resume=resume, settings=settings)


def guess_format(path: str | os.PathLike[str]) -> str:
    """The format of an existing output, from its extension or layout."""
    p = Path(path)
    if p.is_dir():
        return "voc"
    ext = p.suffix.lower().lstrip(".")
    if ext in ("jsonl", "csv", "coco"):  # results.coco: what --format coco writes by default
        return ext
    if ext == "json":
        return "coco"
    raise OutputError(f"cannot tell the format of {p}: use --format")


def read_records(path: str | os.PathLike[str], fmt: str | None = None) -> list[dict[str, Any]]:
    """The records of any output this package writes (format guessed when not given)."""
    return writer_class(fmt or guess_format(path)).records(Path(path))


def merge(out: Path, fmt: str, parts: Sequence[Path], required: Iterable[str] = ()) -> int:
    """Merge ``out`` (if present) and ``parts`` into ``out``, then delete the parts.

    Images are written once each (the first copy found: ``out``, then the parts in the
    order given), sorted by image name, in the format's own layout (COCO ids renumbered
    1..N in that order, exactly as a single writer numbers them); the output is replaced
    atomically. The settings sidecar of the first source that has one is kept.
    Returns the number of images in the merged output.

    Raises:
        MissingImages: a name in ``required`` is in no source (nothing is replaced or
            deleted then).
        OutputError: a source cannot be read.
    """
    cls = writer_class(fmt)
    out = Path(out)
    entries: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    sidecar = None
    for src in [out, *parts]:
        try:
            contents = cls.read(src)
        except (OSError, ValueError) as e:
            raise OutputError(f"cannot read {src}: {e}") from e
        for name, entry in contents.entries.items():
            entries.setdefault(name, entry)
        for k, v in contents.extra.items():
            if v is not None:
                extra.setdefault(k, v)
        sidecar = sidecar or read_settings(src, fmt)
    missing = [name for name in required if name not in entries]
    if missing:
        raise MissingImages(missing)
    ordered = [(name, entries[name]) for name in sorted(entries)]
    cls.write_merged(out, ordered, extra)
    if sidecar is not None:  # as it was written (the run's cwd and time, not the merge's)
        atomic_write(settings_path(out, fmt), json.dumps(sidecar, indent=1) + "\n")
    for p in parts:
        remove_output(p, fmt)
    return len(ordered)


# -- the settings sidecar -------------------------------------------------------------------
def settings_path(path: str | os.PathLike[str], fmt: str) -> Path:
    """Where the settings of an output live."""
    p = Path(path)
    return p / "settings.json" if fmt == "voc" else p.with_name(p.name + ".settings.json")


def write_settings(
    path: Path,
    fmt: str,
    settings: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
    *,
    cwd: str | None = None,
) -> None:
    """Write the sidecar: the run's ``settings`` (compared on ``--resume``), the package
    version, the time, ``cwd`` (the folder the relative image names start from; default
    the current working directory) and ``extra`` facts about the run that are no
    settings (``viz``: the ``--viz`` folder)."""
    from discover.version import __version__

    data = {
        "format": SETTINGS_FORMAT,
        "regdiscover": __version__,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cwd": cwd or os.getcwd(),
        **(extra or {}),
        "settings": settings,
    }
    atomic_write(settings_path(path, fmt), json.dumps(data, indent=1) + "\n")


def read_settings(path: str | os.PathLike[str], fmt: str) -> dict[str, Any] | None:
    """The sidecar of an output (``None`` when it has none or it is unreadable)."""
    p = settings_path(path, fmt)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != SETTINGS_FORMAT:
        return None
    return data


def remove_output(path: Path, fmt: str) -> None:
    """Delete an output (file or VOC folder) and its settings sidecar."""
    import shutil

    p = Path(path)
    sidecar = settings_path(p, fmt)
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()
    if sidecar.exists():
        sidecar.unlink()


# -- helpers --------------------------------------------------------------------------------
def unique_stem(name: str, used: dict[str, str]) -> str:
    """A flat file stem for image ``name``, unique among ``used`` (lower-case stem -> name;
    updated), whatever the case-sensitivity of the file system.

    ``photos/a.jpg`` becomes ``photos__a``; when another image already owns that stem
    (``photos/a.png``), the extension is kept: ``photos__a.png``, then a counter.
    """
    flat = name.replace("\\", "/").strip("/").replace("../", "").replace("/", "__")
    base, ext = os.path.splitext(flat)
    candidates = [base or "image", f"{base or 'image'}{ext}"]
    candidates += [f"{candidates[1]}-{i}" for i in range(2, len(used) + 3)]
    for stem in candidates:
        # Case-insensitive: a.jpg and A.png must not share a file on macOS or Windows.
        if used.get(stem.lower(), name) == name:
            used[stem.lower()] = name
            return stem
    raise AssertionError("unreachable: there are more candidates than used stems")


def _voc_coords(box: list[float]) -> list[int]:
    x0, y0, x1, y1 = box
    return [int(round(x0)) + 1, int(round(y0)) + 1, int(round(x1)), int(round(y1))]


def check_folder_target(path: str | os.PathLike[str]) -> None:
    """Raise when a folder could not be created at ``path`` or written in (touches nothing).

    Raises:
        OutputError: ``path`` is a file.
        OSError: no permission, or a file where a parent folder should be.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{p} is a file, not a folder")
    _check_writable(p / "probe")


def _check_writable(path: Path) -> None:
    """Raise ``OSError`` when ``path`` could not be created or replaced (touches nothing)."""
    if path.exists():
        if not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied", str(path))
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(parent))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(13, "Permission denied", str(parent))


def atomic_write(path: Path, data: str | bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file and :func:`os.replace`.

    Readers see the old file or the new one, never a torn one. The file gets the mode
    of the one it replaces, else the usual ``0666`` minus the umask. ``fsync`` also
    flushes the data to disk before the rename (for caches that must survive a power
    loss).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # os.open applies the umask to 0o666, as open() does for a new file.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        try:
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
