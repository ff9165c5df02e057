"""Pure helpers for boxes: patch-to-pixel mapping, IoU, suppression, mask bounding boxes.

Conventions used throughout the package:

- A box is ``(x0, y0, x1, y1)``: ``x`` runs along image columns (width), ``y`` along rows
  (height). ``x0``/``y0`` are inclusive, ``x1``/``y1`` are exclusive, so the width of a box is
  ``x1 - x0`` with no ``+ 1``.
- A *patch box* counts patches of the ViT grid; a *pixel box* counts pixels of an image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "box_iou",
    "mask_box",
    "pairwise_iou",
    "patch_box_to_pixels",
    "suppress",
]

# Stabiliser of the corloc IoU formula (LOST ``datasets.bbox_iou``).
_IOU_EPS = 1e-7


def mask_box(mask: torch.Tensor | np.ndarray) -> tuple[int, int, int, int]:
    """Bounding box ``(x0, y0, x1, y1)`` of the true cells of a 2-D mask, end exclusive.

    Units are the mask's cells (patches when the mask is over the patch grid).

    Raises:
        ValueError: when ``mask`` is not 2-D or has no true cell.
    """
    m = torch.as_tensor(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [h, w], got shape {tuple(m.shape)}")
    m = m.bool()
    rows = torch.nonzero(m.any(dim=1)).flatten()
    cols = torch.nonzero(m.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError("mask has no true cell, it has no bounding box")
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def patch_box_to_pixels(
    box: Sequence[int] | torch.Tensor,
    patch_size: int | tuple[int, int],
    input_size: tuple[int, int],
    scale: tuple[float, float] = (1.0, 1.0),
) -> tuple[int, int, int, int] | tuple[float, float, float, float]:
    """Map a patch-unit box to a pixel box, the way LOST reports its predictions.

    Steps, in this order (the order matters for the clipping):

    1. multiply the patch box by the patch size (columns by the patch width, rows by the
       patch height);
    2. clip ``x1`` to the input width and ``y1`` to the input height, where ``input_size`` is
       the ``(width, height)`` of the image as fed to the network *before* it was padded to a
       multiple of the patch size. Only the end coordinates are clipped: the start of a patch
       box always lies inside the unpadded image (LOST does the same);
    3. multiply x coordinates by ``scale[0]`` and y coordinates by ``scale[1]``, with
       ``scale = (original_width / resized_width, original_height / resized_height)`` when
       the image was resized before the network; the default ``(1, 1)`` means no resize.

    Args:
        box: ``(x0, y0, x1, y1)`` in patches, end exclusive.
        patch_size: an int for square patches, or ``(patch_height, patch_width)`` in the order
            of timm's ``model.patch_embed.patch_size``.
        input_size: ``(width, height)`` in pixels of the network input before padding.
        scale: ``(sx, sy)`` factors back to the original image.

    Returns:
        The pixel box ``(x0, y0, x1, y1)``, ``x0``/``y0`` inclusive and ``x1``/``y1`` exclusive.
        Ints when ``scale == (1, 1)`` (as the reference), floats otherwise.
    """
    if isinstance(box, torch.Tensor):
        box = box.tolist()
    if len(box) != 4:
        raise ValueError(f"box must have 4 coordinates (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in box)
    if isinstance(patch_size, int):
        patch_h = patch_w = patch_size
    else:
        patch_h, patch_w = (int(v) for v in patch_size)
    if patch_h <= 0 or patch_w <= 0:
        raise ValueError(f"patch_size must be positive, got {patch_size!r}")
    width, height = (int(v) for v in input_size)

    px0 = x0 * patch_w
    py0 = y0 * patch_h
    px1 = min(x1 * patch_w, width)
    py1 = min(y1 * patch_h, height)

    sx, sy = float(scale[0]), float(scale[1])
    if sx == 1.0 and sy == 1.0:
        return (px0, py0, px1, py1)
    return (px0 * sx, py0 * sy, px1 * sx, py1 * sy)


def _as_box_tensor(x: Sequence | np.ndarray | torch.Tensor) -> torch.Tensor:
    # Non-tensors go through numpy, as the reference does (np.asarray then from_numpy), so
    # Python ints become int64 and Python floats float64.
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.asarray(x))


def box_iou(
    box: Sequence[float] | np.ndarray | torch.Tensor,
    boxes: Sequence[Sequence[float]] | np.ndarray | torch.Tensor,
) -> torch.Tensor:
    """IoU of one box against ``M`` boxes with LOST's corloc formula (numbers included).

    This is the formula LOST evaluates corloc with (their ``datasets.bbox_iou``): boxes are
    end exclusive (no ``+ 1`` in widths/heights), and a stabiliser ``eps = 1e-7`` is added to
    each box height and to the union::

        inter = clamp(min(x1) - max(x0), 0) * clamp(min(y1) - max(y0), 0)
        union = w_a * (h_a + eps) + w_b * (h_b + eps) - inter + eps

    The arithmetic is done in the same order and with torch's type promotion on the inputs as
    given, so decisions such as ``iou >= 0.5`` agree with the reference bit for bit. In
    particular for int64 inputs (the reference's case: integer predictions and ground truth)
    everything after ``+ eps`` is float32, where the eps vanishes for heights above ~1, so a
    geometric IoU of exactly 0.5 on large boxes gives 0.5 (a hit); in float64 it would fall
    just below. Non-tensor inputs are converted through numpy (ints -> int64, floats ->
    float64), like the reference pipeline.

    Args:
        box: ``[4]`` box ``(x0, y0, x1, y1)``.
        boxes: ``[M, 4]`` boxes; ``M`` may be 0.

    Returns:
        ``[M]`` IoUs (dtype from type promotion: float32 for integer inputs).
    """
    a = _as_box_tensor(box)
    b = _as_box_tensor(boxes)
    if a.numel() != 4:
        raise ValueError(f"box must have 4 coordinates, got shape {tuple(a.shape)}")
    a = a.reshape(4)
    if b.numel() == 0:
        b = b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"boxes must be [M, 4], got shape {tuple(b.shape)}")

    ax0, ay0, ax1, ay1 = a.unbind(0)
    bx0, by0, bx1, by1 = b.unbind(1)
    overlap_w = (torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp(0)
    overlap_h = (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp(0)
    inter = overlap_w * overlap_h
    area_a = (ax1 - ax0) * (ay1 - ay0 + _IOU_EPS)
    area_b = (bx1 - bx0) * (by1 - by0 + _IOU_EPS)
    return inter / (area_a + area_b - inter + _IOU_EPS)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain IoU matrix ``[N, M]`` between boxes ``a [N, 4]`` and ``b [M, 4]`` (end exclusive).

    No stabiliser: an empty intersection gives 0, and a pair whose union is empty (two
    degenerate boxes) gives 0 instead of NaN. Computed in float32, or float64 when an input is
    float64.
    """
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    if a.numel() == 0:
        a = a.reshape(0, 4)
    if b.numel() == 0:
        b = b.reshape(0, 4)
    if a.ndim != 2 or a.shape[1] != 4 or b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(
            f"boxes must be [N, 4] and [M, 4], got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    a = a.to(dtype)
    b = b.to(device=a.device, dtype=dtype)
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    lo = torch.maximum(a[:, None, :2], b[None, :, :2])
    hi = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (hi - lo).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    safe = torch.where(union > 0, union, torch.ones_like(union))
    return torch.where(union > 0, inter / safe, torch.zeros_like(inter))


def suppress(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; returns the kept indices, best score first.

    Boxes are visited by decreasing score, equal scores in their original order (a stable
    sort, so the result is deterministic on any device). A box is dropped when its IoU
    (:func:`pairwise_iou`) with an already kept box is strictly greater than
    ``iou_threshold`` (the torchvision ``nms`` convention).

    Raises:
        ValueError: on shape mismatch or NaN scores.
    """
    boxes = torch.as_tensor(boxes)
    scores = torch.as_tensor(scores)
    if boxes.numel() == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [N, 4], got shape {tuple(boxes.shape)}")
    if scores.ndim != 1 or scores.shape[0] != boxes.shape[0]:
        raise ValueError(
            f"scores must be [N] with N = {boxes.shape[0]}, got shape {tuple(scores.shape)}"
        )
    if torch.isnan(scores.float()).any():
        raise ValueError("scores contain NaN")
    n = boxes.shape[0]
    if n == 0:
        return []
    order = torch.argsort(scores.cpu(), descending=True, stable=True).tolist()
    overlap = pairwise_iou(boxes, boxes).cpu() > iou_threshold
    removed = [False] * n
    keep: list[int] = []
    for i in order:
        if removed[i]:
            continue
        keep.append(i)
        for j in torch.nonzero(overlap[i]).flatten().tolist():
            removed[j] = True
    return keep
