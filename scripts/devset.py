"""Tools for the development benchmark in samples/devset (a VOC2007-layout tree).

    python scripts/devset.py stats  [--root samples/devset]      # the mix, per split
    python scripts/devset.py split  [--root samples/devset]      # (re)write tune/test/trainval
    python scripts/devset.py draw ID OUT.png [--zoom x0,y0,x1,y1]  # check an image's boxes
    python scripts/devset.py sources                             # SOURCES.md from SOURCES.tsv

``split`` is deterministic: images are grouped by the size of their largest object
(under 20%, 20-50%, over 50% of the image) and, inside each group, ordered by a hash of
their id; every third goes to ``test``, the others to ``tune``. So adding images moves
few others, and test is chosen before any setting is measured.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from discover.calibration import STRATA, largest_object_share
from discover.datasets import load_dataset

SPLITS = ("tune", "test")


def _stratum(share: float) -> str:
    return next(name for name, lo, hi in STRATA if lo <= share < hi)


def _samples(root: Path, split: str = "trainval") -> list:
    return list(load_dataset("voc07", root, split=split))


def cmd_stats(args: argparse.Namespace) -> None:
    root = Path(args.root)
    for split in ("trainval", *SPLITS):
        if not (root / "VOC2007" / "ImageSets" / "Main" / f"{split}.txt").exists():
            continue
        samples = _samples(root, split)
        n = len(samples)
        shares = [largest_object_share(s) for s in samples]
        strata = Counter(_stratum(x) for x in shares)
        several = sum(1 for s in samples if len(s.boxes) > 1)
        objects = sum(len(s.boxes) for s in samples)
        classes = Counter(c for s in samples for c in s.classes)
        print(f"{split}: {n} images, {objects} objects ({objects / max(n, 1):.1f} per image)")
        for name, _, _ in STRATA:
            print(f"  largest object {name:>6}: {strata[name]:4d} ({100 * strata[name] / n:.0f}%)")
        print(f"  several objects: {several} ({100 * several / max(n, 1):.0f}%)")
        print(
            f"  classes ({len(classes)}): "
            + ", ".join(f"{c} {k}" for c, k in classes.most_common())
        )


def cmd_split(args: argparse.Namespace) -> None:
    root = Path(args.root)
    main = root / "VOC2007" / "ImageSets" / "Main"
    samples = _samples(root, "trainval")
    bad = [s.image_id for s in samples if s.error]
    if bad:
        sys.exit(f"unreadable annotations: {bad}")
    groups: dict[str, list[str]] = {}
    for s in samples:
        groups.setdefault(_stratum(largest_object_share(s)), []).append(s.image_id)
    out: dict[str, list[str]] = {"tune": [], "test": []}
    for ids in groups.values():
        ordered = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
        for k, image_id in enumerate(ordered):
            out["test" if k % 3 == 2 else "tune"].append(image_id)
    for split, ids in out.items():
        (main / f"{split}.txt").write_text("".join(f"{i}\n" for i in sorted(ids)), "utf-8")
    print(f"tune {len(out['tune'])}, test {len(out['test'])}")


def cmd_draw(args: argparse.Namespace) -> None:
    root = Path(args.root) / "VOC2007"
    sample = next(s for s in _samples(Path(args.root)) if s.image_id == args.id)
    img = Image.open(root / "JPEGImages" / f"{args.id}.jpg").convert("RGB")
    d = ImageDraw.Draw(img)
    for (x0, y0, x1, y1), name in zip(sample.boxes.tolist(), sample.classes, strict=True):
        d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 0, 0), width=2)
        d.text((x0 + 3, y0 + 2), name, fill=(255, 0, 0))
    if args.zoom:
        x0, y0, x1, y1 = (int(v) for v in args.zoom.split(","))
        img = img.crop((x0, y0, x1, y1))
        img = img.resize((img.width * 3, img.height * 3), Image.NEAREST)
    img.save(args.out)


def cmd_sources(args: argparse.Namespace) -> None:
    import csv

    root = Path(args.root)
    with open(root / "SOURCES.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    cols = ("id", "package", "version", "path", "licence", "attribution", "changes")
    lines = [
        "# Sources of the development benchmark\n",
        "One row per image: the package it ships in, the package version, the file's path",
        "inside the package (for Qt resources, the .rcc file and the path inside it), the",
        "licence as the package states it, the author or source it credits, and what we",
        "changed. Generated from `SOURCES.tsv` by `python scripts/devset.py sources`.\n",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        cells = [str(r[c]).replace("|", "/").replace("\n", " ") for c in cols]
        cells[3] = f"`{cells[3]}`"
        lines.append("| " + " | ".join(cells) + " |")
    (root / "SOURCES.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(rows)} sources -> {root / 'SOURCES.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="samples/devset")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stats")
    sub.add_parser("split")
    sub.add_parser("sources")
    dr = sub.add_parser("draw")
    dr.add_argument("id")
    dr.add_argument("out")
    dr.add_argument("--zoom")
    args = ap.parse_args()
    {"stats": cmd_stats, "split": cmd_split, "draw": cmd_draw, "sources": cmd_sources}[args.cmd](
        args
    )


if __name__ == "__main__":
    main()
