"""Tile pictures written by ``discover boxes --viz`` into one strip (the README figure).

    .venv/bin/discover boxes samples/ --model vit_small_patch14_dinov2.imgfocus \\
        --out out/boxes.jsonl --viz out/viz
    python scripts/samples_figure.py out/viz samples/figures/samples.jpg chelsea clock coins
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("viz", type=Path, help="the --viz folder")
    ap.add_argument("out", type=Path)
    ap.add_argument("names", nargs="+", help="image names (file stems) to show, in order")
    ap.add_argument("--height", type=int, default=300)
    ap.add_argument("--gap", type=int, default=6)
    args = ap.parse_args()
    tiles = []
    for name in args.names:
        found = sorted(args.viz.glob(f"{name}.*")) or sorted(args.viz.glob(f"**/{name}.*"))
        if not found:
            raise SystemExit(f"no picture named {name} in {args.viz}")
        im = Image.open(found[0]).convert("RGB")
        tiles.append(im.resize((round(im.width * args.height / im.height), args.height)))
    width = sum(t.width for t in tiles) + args.gap * (len(tiles) - 1)
    sheet = Image.new("RGB", (width, args.height), "white")
    x = 0
    for t in tiles:
        sheet.paste(t, (x, 0))
        x += t.width + args.gap
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, quality=88)
    print(f"{args.out}: {sheet.width} x {sheet.height}")


if __name__ == "__main__":
    main()
