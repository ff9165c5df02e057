#!/usr/bin/env python
"""CorLoc evaluation on VOC07 / VOC12 / COCO20k: a thin shell over ``discover eval``.

Example (real DINOv2 with registers from the hub)::

    python scripts/eval_voc.py --dataset voc07 --root datasets/VOCdevkit --out out/voc07

Every option of ``discover eval --help`` is accepted.
"""

from __future__ import annotations

import sys

from discover.cli import main

if __name__ == "__main__":
    sys.argv = [sys.argv[0], "eval", *sys.argv[1:]]
    main()
