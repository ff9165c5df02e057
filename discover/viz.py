"""Pictures of what was found: the only module that draws.

:func:`draw_result` overlays, on the original image, the seed-expansion mask (tinted),
the seed patch (filled square) and each box (rectangle with its score), the way the
LOST paper shows its predictions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import cv2
import numpy as np
import torch

# BGR-free: we draw on RGB arrays, so colours are RGB.
_COLOURS = [(255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (220, 64, 255)]


def draw_result(image: np.ndarray, result: object, *, alpha: float = 0.45) -> np.ndarray:
    """Return an RGB uint8 copy of ``image`` with the result's detections drawn.

    ``result`` is a :class:`discover.pipeline.ImageResult`; ``image`` is the original
    picture or any resized copy of it (e.g. the network input): boxes and masks are
    scaled to ``image``'s size.
    """
    out = np.ascontiguousarray(image.copy())
    H, W = out.shape[:2]
    dets = list(getattr(result, "detections", []))
    p = result.patch_size or 1
    fx = W / (result.width or W)
    fy = H / (result.height or H)
    sx, sy = result.scale[0] * fx, result.scale[1] * fy
    for i, det in reversed(list(enumerate(dets))):
        colour = _COLOURS[i % len(_COLOURS)]
        mask = _mask_to_pixels(det.mask, p, sx, sy, (H, W))
        if mask.any():
            tint = np.zeros_like(out)
            tint[:] = colour
            blend = cv2.addWeighted(out, 1 - alpha, tint, alpha, 0)
            out[mask] = blend[mask]
        r, c = det.seed
        s0 = (int(round(c * p * sx)), int(round(r * p * sy)))
        s1 = (int(round((c + 1) * p * sx)) - 1, int(round((r + 1) * p * sy)) - 1)
        cv2.rectangle(out, s0, s1, (255, 255, 0), thickness=-1)
    thick = max(2, round(max(H, W) / 300))
    for i, det in enumerate(dets):
        colour = _COLOURS[i % len(_COLOURS)]
        x0, y0 = int(round(det.box[0] * fx)), int(round(det.box[1] * fy))
        x1, y1 = int(round(det.box[2] * fx)), int(round(det.box[3] * fy))
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, thick)
        label = f"{det.score:.2f}"
        scale = max(0.4, max(H, W) / 900)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(th + 2, y0)
        cv2.rectangle(out, (x0, ty - th - 4), (x0 + tw + 4, ty), colour, -1)
        cv2.putText(out, label, (x0 + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1)
    return out


def _mask_to_pixels(
    mask: torch.Tensor | np.ndarray, patch: int, sx: float, sy: float, shape: Sequence[int]
) -> np.ndarray:
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.uint8)
    H, W = shape
    gh, gw = m.shape
    # Patch grid -> network-input pixels -> original pixels, nearest neighbour.
    big = cv2.resize(
        m, (int(round(gw * patch * sx)), int(round(gh * patch * sy))), cv2.INTER_NEAREST
    )
    full = np.zeros((H, W), dtype=bool)
    hh, ww = min(H, big.shape[0]), min(W, big.shape[1])
    full[:hh, :ww] = big[:hh, :ww] > 0
    return full


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as a PNG (creates the folder)."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")
