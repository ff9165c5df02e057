#!/usr/bin/env python
"""Calibrate LOST's gram-matrix bias on an annotated VOC-style tree (default: samples/).

Extracts each feature kind once per image, then runs LOST for every bias strategy and
prints a CorLoc table (markdown) -- the table in the README's "Calibration" section:

    python scripts/calibrate_lost.py --model vit_small_patch14_dinov2.imgfocus

Strategies: ``0`` (the reference), ``center`` (subtract the image's mean feature), and
``pNN`` (subtract the NN-th percentile of the image's similarities), alone or with
centring. The backbone runs once per feature kind; LOST runs per setting.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from discover.backbone import FEATURE_KINDS, Backbone
from discover.boxes import box_iou, patch_box_to_pixels
from discover.corloc import CorLocAccumulator
from discover.datasets import load_dataset
from discover.images import read_image
from discover.methods import EmptyGraphError
from discover.methods.lost import lost

STRATEGIES: list[tuple[str, dict]] = [
    ("0 (reference)", {}),
    ("center", {"center": True}),
    ("p10", {"gram_bias": "p10"}),
    ("p20", {"gram_bias": "p20"}),
    ("p30", {"gram_bias": "p30"}),
    ("p50", {"gram_bias": "p50"}),
    ("center + p30", {"center": True, "gram_bias": "p30"}),
    ("center + p50", {"center": True, "gram_bias": "p50"}),
]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="samples/annotations")
    ap.add_argument("--dataset", default="voc07")
    ap.add_argument("--model", default="vit_small_patch14_dinov2.imgfocus")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--test-time-registers", default=None)
    ap.add_argument("--max-size", type=int, default=None)
    ap.add_argument("--json", default=None, help="Also write the table as JSON here.")
    args = ap.parse_args(argv)

    ds = load_dataset(args.dataset, args.root)
    bb = Backbone(args.model, checkpoint=args.checkpoint, max_size=args.max_size)
    if args.test_time_registers:
        from discover.registers import attach_test_time_registers

        attach_test_time_registers(bb, args.test_time_registers)
    images = []
    for s in ds:
        loaded = read_image(s.path)
        images.append((s, bb.prepare(loaded.array, loaded.original_size)))
    table: dict[str, dict[str, float]] = {}
    ious: dict[str, dict[str, float]] = {}
    for kind in FEATURE_KINDS:
        feats = []
        for _, pr in images:
            f = bb(bb.to_tensor([pr.array]), features=kind)
            feats.append((f.patches[0], f.grid))
        for label, params in STRATEGIES:
            acc = CorLocAccumulator()
            best = []
            for (s, pr), (patches, grid) in zip(images, feats, strict=True):
                try:
                    res = lost(patches, grid, **params)
                    box = patch_box_to_pixels(res.box, bb.patch_size, pr.input_size, pr.scale)
                    acc.add(s.image_id, np.asarray([box]), s.boxes)
                    best.append(float(box_iou(np.asarray(box), s.boxes).max()))
                except EmptyGraphError as e:
                    acc.add(s.image_id, None, s.boxes, error=str(e))
                    best.append(0.0)
            table.setdefault(label, {})[kind] = 100.0 * acc.corloc
            ious.setdefault(label, {})[kind] = 100.0 * float(np.mean(best))
    kinds = list(FEATURE_KINDS)
    print(f"LOST on {ds.name} at {args.root} ({len(ds)} images), {args.model}")
    print("CorLoc % / mean best IoU % of the box with the ground truth")
    print("| bias strategy | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for label, row in table.items():
        cells = [f"{row[k]:.1f} / {ious[label][k]:.1f}" for k in kinds]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        data = {"corloc": table, "mean_iou": ious}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
