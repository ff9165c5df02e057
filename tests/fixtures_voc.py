"""Tiny synthetic VOC and COCO20k trees for tests (shared by several test files).

``write_voc_tree`` and ``write_coco20k`` write a handful of small JPEGs (colored
rectangles on a noisy striped background) with their annotations, and return what was
written together with the ground truth expected after the LOST conventions. The expected
boxes are written out by hand here, not computed, so tests comparing against them check
the readers' conversions (VOC 1-based -> xmin/ymin minus one; COCO xywh -> xyxy with
half-to-even rounding).

Import from a test file with ``from fixtures_voc import write_voc_tree, write_coco20k``
(pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["VOC_IMAGES", "COCO_IMAGES", "write_coco20k", "write_jpeg", "write_voc_tree"]

_COLORS = [(220, 40, 40), (40, 180, 60), (40, 80, 220), (230, 200, 30), (200, 60, 200)]


def write_jpeg(
    path: Path, size: tuple[int, int], boxes: list[tuple[int, int, int, int]], seed: int = 0
) -> None:
    """Write a ``size = (width, height)`` JPEG: textured background plus filled boxes.

    ``boxes`` are 0-based inclusive pixel rectangles ``(x0, y0, x1, y1)``.
    """
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = ((xx + 2 * yy) // 6 % 2) * 40
    base = 90 + stripes[..., None] + rng.integers(0, 40, size=(h, w, 3))
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for i, box in enumerate(boxes):
        draw.rectangle(box, fill=_COLORS[i % len(_COLORS)])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "JPEG", quality=90)


# ----------------------------------------------------------------------------- VOC

# Objects as written in the XML (1-based inclusive, strings kept verbatim) and the box
# expected after the LOST convention (xmin - 1, ymin - 1, xmax, ymax).
VOC_IMAGES: list[dict[str, Any]] = [
    {
        "id": "000012",
        "size": (100, 75),
        "objects": [
            {
                "name": "dog",
                "bbox": ("1", "1", "50", "40"),
                "difficult": 0,
                "truncated": 0,
                "expected": (0, 0, 50, 40),
            },
            {
                "name": "person",
                "bbox": ("60", "10", "95", "70"),
                "difficult": 1,
                "truncated": 0,
                "expected": (59, 9, 95, 70),
            },
        ],
    },
    {
        "id": "000005",
        "size": (64, 96),
        "objects": [
            {
                "name": "car",
                "bbox": ("5", "20", "60", "90"),
                "difficult": 0,
                "truncated": 0,
                "expected": (4, 19, 60, 90),
            },
            {
                "name": "bottle",
                "bbox": ("30", "2", "40", "30"),
                "difficult": 0,
                "truncated": 1,
                "expected": (29, 1, 40, 30),
            },
        ],
    },
    {
        # every object is hard: skipped with no_hard
        "id": "000009",
        "size": (100, 75),
        "objects": [
            {
                "name": "cat",
                "bbox": ("10", "10", "40", "40"),
                "difficult": 1,
                "truncated": 0,
                "expected": (9, 9, 40, 40),
            },
            {
                "name": "chair",
                "bbox": ("50", "20", "100", "75"),
                "difficult": 0,
                "truncated": 1,
                "expected": (49, 19, 100, 75),
            },
        ],
    },
    {
        # float coordinates, as in a few VOC files: int(float()) truncates, then -1
        "id": "000017",
        "size": (64, 96),
        "objects": [
            {
                "name": "horse",
                "bbox": ("12.7", "3.5", "63.9", "96"),
                "difficult": 0,
                "truncated": 0,
                "expected": (11, 2, 63, 96),
            },
        ],
    },
    {
        # a single object with a <part> (VOC12 layout) and no difficult/truncated tags
        "id": "000023",
        "size": (80, 60),
        "objects": [
            {
                "name": "person",
                "bbox": ("20", "5", "60", "60"),
                "difficult": None,
                "truncated": None,
                "expected": (19, 4, 60, 60),
                "part": ("head", ("30", "5", "45", "20")),
            },
        ],
    },
    {"id": "000031", "size": (100, 75), "malformed": True, "objects": []},
    {
        # whole-image box
        "id": "000032",
        "size": (72, 72),
        "objects": [
            {
                "name": "sofa",
                "bbox": ("1", "1", "72", "72"),
                "difficult": 0,
                "truncated": 0,
                "expected": (0, 0, 72, 72),
            },
        ],
    },
]

_MISSING_XML_ID = "000040"


def _voc_xml(year: str, spec: dict[str, Any]) -> str:
    w, h = spec["size"]
    parts = [
        "<annotation>",
        f"  <folder>VOC{year}</folder>",
        f"  <filename>{spec['id']}.jpg</filename>",
        f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>",
        "  <segmented>0</segmented>",
    ]
    for obj in spec["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        parts += ["  <object>", f"    <name>{obj['name']}</name>", "    <pose>Left</pose>"]
        if obj["truncated"] is not None:
            parts.append(f"    <truncated>{obj['truncated']}</truncated>")
        if obj["difficult"] is not None:
            parts.append(f"    <difficult>{obj['difficult']}</difficult>")
        parts.append(
            f"    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
            f"<xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>"
        )
        if "part" in obj:
            pname, (px0, py0, px1, py1) = obj["part"]
            parts.append(
                f"    <part><name>{pname}</name><bndbox><xmin>{px0}</xmin><ymin>{py0}</ymin>"
                f"<xmax>{px1}</xmax><ymax>{py1}</ymax></bndbox></part>"
            )
        parts.append("  </object>")
    parts.append("</annotation>")
    return "\n".join(parts) + "\n"


def write_voc_tree(
    root: Path, year: str = "2007", *, split: str = "trainval", missing_xml: bool = False
) -> dict[str, Any]:
    """Write ``root/VOCdevkit/VOC<year>`` with the images of :data:`VOC_IMAGES`.

    ``ImageSets/Main/<split>.txt`` lists the ids in :data:`VOC_IMAGES` order (not sorted);
    ``000031`` has a malformed XML; with ``missing_xml`` an extra id (``000040``) is
    listed with its JPEG but without an XML file.

    Returns a dict with ``devkit`` and ``voc_dir`` (paths), ``year``, ``ids`` (split
    order), ``sizes`` (id -> (w, h)), ``expected`` (id -> dict of ``boxes`` int64
    ``[M, 4]``, ``classes``, ``difficult``, ``truncated`` for every well-formed image),
    ``malformed`` and ``missing_xml`` (id lists), ``all_hard`` (ids whose objects are all
    difficult or truncated).
    """
    root = Path(root)
    devkit = root / "VOCdevkit"
    voc_dir = devkit / f"VOC{year}"
    (voc_dir / "Annotations").mkdir(parents=True, exist_ok=True)
    (voc_dir / "ImageSets" / "Main").mkdir(parents=True, exist_ok=True)
    (voc_dir / "JPEGImages").mkdir(parents=True, exist_ok=True)

    ids: list[str] = []
    sizes: dict[str, tuple[int, int]] = {}
    expected: dict[str, dict[str, Any]] = {}
    malformed: list[str] = []
    all_hard: list[str] = []
    for n, spec in enumerate(VOC_IMAGES):
        image_id = spec["id"]
        ids.append(image_id)
        sizes[image_id] = spec["size"]
        rects = []
        for obj in spec["objects"]:
            x0, y0, x1, y1 = (int(float(v)) for v in obj["bbox"])
            rects.append((x0 - 1, y0 - 1, x1 - 1, y1 - 1))
        write_jpeg(voc_dir / "JPEGImages" / f"{image_id}.jpg", spec["size"], rects, seed=n)
        xml_path = voc_dir / "Annotations" / f"{image_id}.xml"
        if spec.get("malformed"):
            xml_path.write_text(
                "<annotation>\n  <filename>000031.jpg</filename>\n  <object><name>dog</name"
            )
            malformed.append(image_id)
            continue
        xml_path.write_text(_voc_xml(year, spec))
        objs = spec["objects"]
        expected[image_id] = {
            "boxes": np.array([o["expected"] for o in objs], dtype=np.int64).reshape(-1, 4),
            "classes": [o["name"] for o in objs],
            "difficult": [bool(o["difficult"]) for o in objs],
            "truncated": [bool(o["truncated"]) for o in objs],
        }
        if objs and all(o["difficult"] or o["truncated"] for o in objs):
            all_hard.append(image_id)

    missing: list[str] = []
    if missing_xml:
        ids.append(_MISSING_XML_ID)
        sizes[_MISSING_XML_ID] = (48, 48)
        write_jpeg(voc_dir / "JPEGImages" / f"{_MISSING_XML_ID}.jpg", (48, 48), [], seed=99)
        missing.append(_MISSING_XML_ID)

    (voc_dir / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return {
        "devkit": devkit,
        "voc_dir": voc_dir,
        "year": year,
        "ids": ids,
        "sizes": sizes,
        "expected": expected,
        "malformed": malformed,
        "missing_xml": missing,
        "all_hard": all_hard,
    }


# ----------------------------------------------------------------------------- COCO

# Annotations as in instances_train2014.json (xywh floats) and the boxes expected after
# dropping crowds and rounding x, y, x + w, y + h half-to-even.
COCO_IMAGES: list[dict[str, Any]] = [
    {
        "id": 123456,
        "size": (100, 75),
        "anns": [
            {"bbox": [10.5, 11.5, 20.0, 30.25], "category_id": 18, "iscrowd": 0},
            {"bbox": [5.0, 5.0, 90.0, 60.0], "category_id": 1, "iscrowd": 1},
            {"bbox": [0.4, 2.6, 49.2, 30.0], "category_id": 17, "iscrowd": 0},
        ],
        # 10.5 -> 10, 11.5 -> 12, 30.5 -> 30, 41.75 -> 42; 0.4 -> 0, 2.6 -> 3, 49.6 -> 50
        "expected": [(10, 12, 30, 42), (0, 3, 50, 33)],
        "classes": ["dog", "cat"],
    },
    {
        # only a crowd annotation: no ground truth left
        "id": 42,
        "size": (64, 96),
        "anns": [{"bbox": [0.0, 0.0, 64.0, 96.0], "category_id": 1, "iscrowd": 1}],
        "expected": [],
        "classes": [],
    },
    {
        "id": 7,
        "size": (100, 75),
        "anns": [{"bbox": [11.5, 0, 39, 74.5], "category_id": 1, "iscrowd": 0}],
        # 11.5 -> 12, 50.5 -> 50, 74.5 -> 74
        "expected": [(12, 0, 50, 74)],
        "classes": ["person"],
    },
    {"id": 314, "size": (80, 60), "anns": [], "expected": [], "classes": []},
]

_COCO_UNLISTED = {
    "id": 999,
    "size": (50, 50),
    "anns": [{"bbox": [1.0, 1.0, 20.0, 20.0], "category_id": 1, "iscrowd": 0}],
}


def coco_file_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


def write_coco20k(root: Path, *, list_prefix: str = "train2014/") -> dict[str, Any]:
    """Write a miniature COCO 2014 train tree and a 20k-style image list.

    Layout: ``root/train2014/*.jpg``, ``root/annotations/instances_train2014.json`` and
    ``root/coco_20k_filenames.txt`` (lines like the real list:
    ``train2014/COCO_train2014_000000123456.jpg``). The json also holds an image that is
    not in the list (id 999, with an annotation), and annotations are interleaved across
    images. Image 42 has only a crowd box, image 314 has no annotation at all.

    Returns a dict with ``root``, ``images_dir``, ``ann_file``, ``list_file``, ``ids`` (list
    order, as strings), ``sizes``, ``expected`` (id -> ``boxes`` int64 ``[M, 4]`` and
    ``classes``), ``crowd_only``, ``no_annotations`` and ``not_listed`` (id lists).
    """
    root = Path(root)
    images_dir = root / "train2014"
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)

    json_images = []
    per_image_anns = []
    for n, spec in enumerate([*COCO_IMAGES, _COCO_UNLISTED]):
        w, h = spec["size"]
        name = coco_file_name(spec["id"])
        rects = [
            (
                int(a["bbox"][0]),
                int(a["bbox"][1]),
                int(a["bbox"][0] + a["bbox"][2]) - 1,
                int(a["bbox"][1] + a["bbox"][3]) - 1,
            )
            for a in spec["anns"]
        ]
        write_jpeg(images_dir / name, (w, h), rects, seed=100 + n)
        json_images.append({"id": spec["id"], "file_name": name, "width": w, "height": h})
        per_image_anns.append([{**a, "image_id": spec["id"]} for a in spec["anns"]])

    # interleave annotations of different images (round-robin)
    annotations = []
    depth = max(len(a) for a in per_image_anns)
    for k in range(depth):
        for anns in per_image_anns:
            if k < len(anns):
                annotations.append(anns[k])
    for i, ann in enumerate(annotations, start=1):
        ann["id"] = i
        x, y, w, h = ann["bbox"]
        ann["area"] = w * h

    data = {
        "images": json_images[::-1],
        "annotations": annotations,
        "categories": [
            {"id": 1, "name": "person", "supercategory": "person"},
            {"id": 17, "name": "cat", "supercategory": "animal"},
            {"id": 18, "name": "dog", "supercategory": "animal"},
        ],
    }
    ann_file = ann_dir / "instances_train2014.json"
    ann_file.write_text(json.dumps(data))

    list_file = root / "coco_20k_filenames.txt"
    list_file.write_text("".join(f"{list_prefix}{coco_file_name(s['id'])}\n" for s in COCO_IMAGES))
    return {
        "root": root,
        "images_dir": images_dir,
        "ann_file": ann_file,
        "list_file": list_file,
        "ids": [str(s["id"]) for s in COCO_IMAGES],
        "sizes": {str(s["id"]): s["size"] for s in COCO_IMAGES},
        "expected": {
            str(s["id"]): {
                "boxes": np.array(s["expected"], dtype=np.int64).reshape(-1, 4),
                "classes": s["classes"],
            }
            for s in COCO_IMAGES
        },
        "crowd_only": ["42"],
        "no_annotations": ["314"],
        "not_listed": [str(_COCO_UNLISTED["id"])],
    }
