"""Ground-truth readers for the object-discovery benchmarks: VOC07, VOC12 and COCO20k.

Only annotations are read here (images are decoded by :mod:`discover.images`). Each
benchmark is exposed as a :class:`Dataset` of :class:`Sample` records, in the order of
its image list, with boxes already converted to the conventions of the LOST evaluation
protocol (valeoai/LOST), so that CorLoc numbers are comparable with the published ones:

VOC (``voc07`` / ``voc12``, ``trainval`` split)
    Boxes in the XML files are 1-based, inclusive pixel indices. Following LOST, only
    ``xmin`` and ``ymin`` are shifted by one; ``xmax`` / ``ymax`` are kept, giving
    0-based, end-exclusive boxes (``xmin=1, xmax=W`` becomes ``0..W``). Coordinates are
    parsed with ``int(float(text))`` because a few files hold values such as ``273.5``
    (truncated toward zero, then shifted). Every object keeps its ``difficult`` and
    ``truncated`` flags (a missing flag reads as 0).

COCO20k (``coco20k``)
    The 19,817 COCO 2014 *train* images listed in ``coco_20k_filenames.txt`` (the file
    shipped with the LOST repository, ``datasets/coco_20k_filenames.txt``; pass its path
    as ``coco_list``). Crowd annotations (``iscrowd == 1``) are dropped; each ``[x, y, w,
    h]`` box becomes ``[x, y, x + w, y + h]`` and every coordinate is rounded with
    Python's ``round`` (round-half-to-even: 10.5 -> 10, 11.5 -> 12), as LOST does.

``no_hard`` (the LOST ``--no_hard`` flag, VOC only)
    Objects that are difficult OR truncated are removed; an image left without any box
    is skipped entirely: it is not yielded, so it is neither evaluated nor counted in
    the CorLoc denominator (its id is listed in :attr:`Dataset.skipped`). Without
    ``no_hard`` every image and every box (difficult ones included) is kept.

Ground-truth boxes that are inverted (``xmin > xmax`` or ``ymin > ymax``) or reach
outside the image (VOC: below 1 or beyond ``<size>``) are kept, as LOST keeps them (so
that CorLoc stays comparable), but each one is noted in the sample's ``issues`` and
listed by :attr:`Dataset.box_issues`, for the evaluation to warn about and count.

Per-image problems never abort loading: a missing or malformed XML file, or an
unusable COCO record, gives a :class:`Sample` with ``error`` set and no boxes, which the
CorLoc accumulator counts as evaluated-and-not-localized. Such samples are kept even
with ``no_hard`` (whether the image was "hard" cannot be known). Missing roots, split
files and annotation files raise :class:`DatasetError` naming the missing path.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import defusedxml
import defusedxml.ElementTree as SafeET
import numpy as np
from PIL import Image

from discover.errors import DatasetError

__all__ = [
    "DATASET_NAMES",
    "Dataset",
    "DatasetError",
    "Sample",
    "coco_image_id",
    "load_dataset",
    "read_coco_list",
]

DATASET_NAMES = ("voc07", "voc12", "coco20k")

_VOC_YEARS = {"voc07": "2007", "voc12": "2012"}
_COCO_ANN_NAME = "instances_train2014.json"
_COCO_IMAGES_DIR = "train2014"


def _empty_boxes() -> np.ndarray:
    return np.zeros((0, 4), dtype=np.int64)


@dataclass(frozen=True)
class Sample:
    """Ground truth of one benchmark image.

    Attributes:
        image_id: VOC: the id from the split file (``"000005"``); COCO: the numeric image
            id as a string (``"123456"``), as LOST keys its predictions.
        path: where the image file should be (not checked for existence).
        width, height: image size from the annotation (VOC ``<size>``, COCO ``images``),
            ``None`` when unknown.
        boxes: int64 array ``[M, 4]`` of ``(x0, y0, x1, y1)`` after the dataset's
            conventions (see the module docstring).
        classes: the ``M`` class names (COCO: category names, or the id as text when the
            file has no ``categories``).
        difficult, truncated: bool arrays ``[M]`` (always False for COCO).
        error: why this image's ground truth could not be read, else ``None``.
        issues: one line per suspicious ground-truth box (inverted, or outside the
            image), kept all the same.
    """

    image_id: str
    path: Path
    width: int | None
    height: int | None
    boxes: np.ndarray = field(default_factory=_empty_boxes)
    classes: tuple[str, ...] = ()
    difficult: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    error: str | None = None
    issues: tuple[str, ...] = ()

    @property
    def hard(self) -> np.ndarray:
        """bool ``[M]``: objects that ``no_hard`` removes (difficult or truncated)."""
        return self.difficult | self.truncated

    def without_hard(self) -> Sample:
        """A copy keeping only the objects that are neither difficult nor truncated."""
        keep = ~self.hard
        return Sample(
            image_id=self.image_id,
            path=self.path,
            width=self.width,
            height=self.height,
            boxes=self.boxes[keep],
            classes=tuple(c for c, k in zip(self.classes, keep, strict=True) if k),
            difficult=self.difficult[keep],
            truncated=self.truncated[keep],
            error=self.error,
            issues=self.issues,
        )


class Dataset(Sequence[Sample]):
    """An ordered, indexable collection of :class:`Sample` (ground truth is read eagerly).

    Attributes:
        name: ``"voc07"``, ``"voc12"`` or ``"coco20k"``.
        root: the resolved folder (VOC: the ``VOC20xx`` folder; COCO: the images folder).
        no_hard: whether hard objects were removed and box-less images skipped.
        skipped: ids of the images dropped by ``no_hard``, in list order.
    """

    def __init__(
        self,
        name: str,
        root: Path,
        samples: Sequence[Sample],
        *,
        no_hard: bool = False,
        skipped: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.root = root
        self.no_hard = no_hard
        self.skipped = list(skipped)
        self._samples = list(samples)

    def __len__(self) -> int:
        return len(self._samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self._samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> list[Sample]: ...

    def __getitem__(self, index: int | slice) -> Sample | list[Sample]:
        return self._samples[index]

    @property
    def ids(self) -> list[str]:
        """Image ids in iteration order."""
        return [s.image_id for s in self._samples]

    @property
    def errors(self) -> list[tuple[str, str]]:
        """``(image_id, error)`` for every sample whose ground truth could not be read."""
        return [(s.image_id, s.error) for s in self._samples if s.error is not None]

    @property
    def box_issues(self) -> list[tuple[str, str]]:
        """``(image_id, issue)`` for every suspicious ground-truth box (see
        :attr:`Sample.issues`): inverted, or outside its image."""
        return [(s.image_id, issue) for s in self._samples for issue in s.issues]

    def __repr__(self) -> str:
        extra = f", no_hard, {len(self.skipped)} skipped" if self.no_hard else ""
        return f"Dataset({self.name!r}, {len(self)} images, root={str(self.root)!r}{extra})"


def load_dataset(
    name: str,
    root: str | Path,
    *,
    coco_list: str | Path | None = None,
    no_hard: bool = False,
    ann_file: str | Path | None = None,
    split: str = "trainval",
) -> Dataset:
    """Read the ground truth of one benchmark.

    Args:
        name: ``"voc07"``, ``"voc12"`` or ``"coco20k"`` (case-insensitive).
        root: VOC: the ``VOCdevkit`` folder, the ``VOC2007`` / ``VOC2012`` folder itself,
            or a folder holding ``VOCdevkit/VOC20xx`` (torchvision's layout). COCO: the
            ``train2014`` images folder, or a folder holding ``train2014/`` or
            ``images/train2014/``.
        coco_list: COCO20k only, required: path to ``coco_20k_filenames.txt``.
        no_hard: VOC only: drop difficult/truncated objects and skip images left empty.
        ann_file: COCO only: ``instances_train2014.json``; by default looked up in an
            ``annotations`` folder next to the images folder (or one level above it).
        split: VOC image set (``ImageSets/Main/<split>.txt``); the benchmarks use
            ``trainval``. Ignored for COCO.

    Raises:
        DatasetError: a root, split list or annotation file is missing or unusable.
        ValueError: unknown ``name``, or ``no_hard`` with COCO20k.
    """
    key = name.lower()
    root = Path(root).expanduser()
    if key in _VOC_YEARS:
        return _load_voc(key, root, _VOC_YEARS[key], split=split, no_hard=no_hard)
    if key == "coco20k":
        if no_hard:
            # LOST's --no_hard is a VOC protocol (its COCO code path fails with it).
            raise ValueError("no_hard is only defined for voc07 / voc12")
        return _load_coco20k(root, coco_list=coco_list, ann_file=ann_file)
    raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASET_NAMES)}")


# --------------------------------------------------------------------------- VOC


def _find_voc_dir(root: Path, year: str) -> Path:
    if not root.exists():
        raise DatasetError(f"dataset root not found: {root}")
    candidates = [root, root / f"VOC{year}", root / "VOCdevkit" / f"VOC{year}"]
    for cand in candidates:
        if (cand / "ImageSets").is_dir() or (cand / "Annotations").is_dir():
            return cand
    raise DatasetError(
        f"no VOC{year} tree found under {root}: expected one of "
        + ", ".join(str(c / "ImageSets" / "Main") for c in candidates)
    )


def _read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"split file not found: {path}")
    ids = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if parts:  # per-class lists carry a second column ("000005 -1"): keep the id
            ids.append(parts[0])
    return ids


def _load_voc(key: str, root: Path, year: str, *, split: str, no_hard: bool) -> Dataset:
    voc_dir = _find_voc_dir(root, year)
    ids = _read_split(voc_dir / "ImageSets" / "Main" / f"{split}.txt")
    ann_dir = voc_dir / "Annotations"
    img_dir = voc_dir / "JPEGImages"
    for d in (ann_dir, img_dir):
        if not d.is_dir():
            raise DatasetError(f"folder not found: {d}")

    samples: list[Sample] = []
    skipped: list[str] = []
    for image_id in ids:
        sample = _read_voc_sample(
            image_id, ann_dir / f"{image_id}.xml", img_dir / f"{image_id}.jpg"
        )
        if no_hard and sample.error is None:
            sample = sample.without_hard()
            if len(sample.boxes) == 0:
                skipped.append(image_id)
                continue
        samples.append(sample)
    return Dataset(key, voc_dir, samples, no_hard=no_hard, skipped=skipped)


def _voc_int(text: str | None, what: str) -> int:
    if text is None or not text.strip():
        raise ValueError(f"missing {what}")
    try:
        return int(float(text))
    except ValueError:
        raise ValueError(f"bad {what} {text.strip()!r}") from None


def _voc_flag(obj: Any, tag: str) -> bool:
    text = obj.findtext(tag)
    if text is None or not text.strip():
        return False
    return _voc_int(text, tag) != 0


def _header_size(path: Path) -> tuple[int | None, int | None]:
    try:
        with Image.open(path) as im:  # reads the header only
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None, None


def _read_voc_sample(image_id: str, xml_path: Path, img_path: Path) -> Sample:
    def failed(reason: str) -> Sample:
        return Sample(image_id, img_path, None, None, error=reason)

    if not xml_path.is_file():
        return failed(f"annotation file not found: {xml_path}")
    try:
        tree = SafeET.parse(xml_path)
    except (SafeET.ParseError, defusedxml.DefusedXmlException, OSError) as exc:
        return failed(f"cannot parse {xml_path}: {exc}")

    ann = tree.getroot()
    try:
        width = _voc_int(ann.findtext("size/width"), "width")
        height = _voc_int(ann.findtext("size/height"), "height")
        if width <= 0 or height <= 0:
            raise ValueError("non-positive size")
    except ValueError:
        width, height = _header_size(img_path)

    boxes, classes, difficult, truncated, issues = [], [], [], [], []
    try:
        # Direct <object> children only; each object's own <bndbox> (not its <part>s).
        for i, obj in enumerate(ann.findall("object")):
            bb = obj.find("bndbox")
            if bb is None:
                raise ValueError(f"object {i} has no bndbox")
            x0, y0, x1, y1 = (
                _voc_int(bb.findtext(t), f"object {i} {t}")
                for t in ("xmin", "ymin", "xmax", "ymax")
            )
            boxes.append((x0 - 1, y0 - 1, x1, y1))  # 1-based inclusive -> LOST convention
            classes.append((obj.findtext("name") or "").strip())
            issue = _voc_box_issue((x0, y0, x1, y1), width, height)
            if issue:
                issues.append(f"{xml_path.name}: object {i} ({classes[-1] or '?'}) {issue}")
            difficult.append(_voc_flag(obj, "difficult"))
            truncated.append(_voc_flag(obj, "truncated"))
    except ValueError as exc:
        return failed(f"bad annotation in {xml_path}: {exc}")

    flags = {"difficult": difficult, "truncated": truncated}
    return _annotated(image_id, img_path, (width, height), boxes, classes, flags, issues)


def _annotated(
    image_id: str,
    path: Path,
    size: tuple[int | None, int | None],
    boxes: Sequence[tuple[int, ...]],
    classes: Sequence[str],
    flags: dict[str, Sequence[bool]],
    issues: Sequence[str] = (),
) -> Sample:
    """A :class:`Sample` from parsed lists (boxes as ``(x0, y0, x1, y1)`` tuples)."""
    return Sample(
        image_id,
        path,
        *size,
        boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        classes=tuple(classes),
        difficult=np.asarray(flags["difficult"], dtype=bool),
        truncated=np.asarray(flags["truncated"], dtype=bool),
        issues=tuple(issues),
    )


def _voc_box_issue(box: tuple[int, int, int, int], width: int | None, height: int | None) -> str:
    """What is wrong with a VOC box (1-based, inclusive), or ``""``."""
    x0, y0, x1, y1 = box
    text = f"xmin {x0} ymin {y0} xmax {x1} ymax {y1}"
    if x0 > x1 or y0 > y1:
        return f"is inverted ({text})"
    if x0 < 1 or y0 < 1 or (width and x1 > width) or (height and y1 > height):
        size = f"the {width}x{height} image" if width and height else "the image"
        return f"reaches outside {size} ({text})"
    return ""


# --------------------------------------------------------------------------- COCO


def coco_image_id(filename: str) -> int:
    """The image id encoded in a COCO file name.

    ``"train2014/COCO_train2014_000000123456.jpg"`` -> ``123456`` (the digits after the
    last underscore of the base name, extension removed).
    """
    stem = Path(filename.strip()).name.rsplit(".", 1)[0]
    digits = stem.rsplit("_", 1)[-1]
    if not digits.isdigit():
        raise ValueError(f"no image id in COCO file name {filename!r}")
    return int(digits)


def read_coco_list(path: str | Path) -> list[str]:
    """Read an image list such as ``coco_20k_filenames.txt`` (one file name per line).

    Blank lines are ignored; every other line must end in a COCO file name with an id
    (see :func:`coco_image_id`). Returns the names as written, in file order.

    Raises:
        DatasetError: the file is missing, empty, or has a line without an image id.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetError(f"COCO image list not found: {path}")
    names = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name:
            continue
        try:
            coco_image_id(name)
        except ValueError:
            raise DatasetError(f"{path}:{lineno}: not a COCO file name: {name!r}") from None
        names.append(name)
    if not names:
        raise DatasetError(f"COCO image list is empty: {path}")
    return names


def _find_coco_images(root: Path) -> Path:
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}")
    for cand in (root / _COCO_IMAGES_DIR, root / "images" / _COCO_IMAGES_DIR):
        if cand.is_dir():
            return cand
    return root


def _find_coco_ann(root: Path, images: Path, ann_file: str | Path | None) -> Path:
    if ann_file is not None:
        path = Path(ann_file).expanduser()
        if not path.is_file():
            raise DatasetError(f"COCO annotation file not found: {path}")
        return path
    tried = []
    for folder in (images.parent, images.parent.parent, root):
        cand = folder / "annotations" / _COCO_ANN_NAME
        if cand not in tried:
            tried.append(cand)
        if cand.is_file():
            return cand
    raise DatasetError(
        "COCO annotation file not found (pass ann_file=...); tried: "
        + ", ".join(str(t) for t in tried)
    )


def _coco_sample(
    image_id: int,
    path: Path,
    info: dict[str, Any] | None,
    anns: list[dict[str, Any]],
    categories: dict[Any, str],
) -> Sample:
    sid = str(image_id)
    if info is None:
        return Sample(sid, path, None, None, error=f"image id {image_id} not in annotation file")
    try:
        width, height = int(info["width"]), int(info["height"])
    except (KeyError, TypeError, ValueError):
        width, height = None, None
    boxes, classes = [], []
    try:
        for ann in anns:
            if ann.get("iscrowd", 0) == 1:
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            # Python floats and round(): half-to-even, exactly as LOST.
            boxes.append(tuple(int(round(v)) for v in (x, y, x + w, y + h)))
            cat = ann.get("category_id")
            classes.append(categories.get(cat, str(cat)))
    except (KeyError, TypeError, ValueError) as exc:
        return Sample(sid, path, width, height, error=f"bad annotation for image {sid}: {exc!r}")
    no_flags = {"difficult": [False] * len(boxes), "truncated": [False] * len(boxes)}
    return _annotated(sid, path, (width, height), boxes, classes, no_flags)


def _load_coco20k(
    root: Path, *, coco_list: str | Path | None, ann_file: str | Path | None
) -> Dataset:
    if coco_list is None:
        raise DatasetError(
            "coco20k needs coco_list=<path to coco_20k_filenames.txt> (the list from the "
            "LOST repository, datasets/coco_20k_filenames.txt)"
        )
    names = read_coco_list(coco_list)
    images = _find_coco_images(root)
    ann_path = _find_coco_ann(root, images, ann_file)

    # Selected ids in list order; a repeated name is kept once (LOST's COCO index is
    # keyed by id, so a duplicate could not be evaluated twice).
    selected: dict[int, str] = {}
    for name in names:
        selected.setdefault(coco_image_id(name), Path(name).name)

    try:
        with ann_path.open("rb") as f:
            data = json.load(f)
        images_info = {int(im["id"]): im for im in data["images"] if int(im["id"]) in selected}
        by_image: dict[int, list[dict[str, Any]]] = {i: [] for i in selected}
        for ann in data["annotations"]:  # one pass: image id -> its annotations
            anns = by_image.get(int(ann["image_id"]))
            if anns is not None:
                anns.append(ann)
        categories = {c["id"]: str(c["name"]) for c in data.get("categories", [])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"cannot read COCO annotation file {ann_path}: {exc!r}") from exc
    del data

    samples = [
        _coco_sample(i, images / fname, images_info.get(i), by_image[i], categories)
        for i, fname in selected.items()
    ]
    return Dataset("coco20k", images, samples)
