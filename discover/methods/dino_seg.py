"""DINO-seg, the baseline of the LOST paper: a box around the biggest blob of one
head's [CLS] attention (Caron et al.'s attention maps, as thresholded in valeoai/LOST
``object_discovery.dino_seg``).

:func:`dino_seg` is the reference, quirks included, on the ``[heads, N]`` attention;
the registered method ``dino_seg`` runs it on the attention the backbone returns (it
needs ``cls_attention``), with excluded patches given no attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage
import torch
from torch import Tensor

import discover.methods.base as base
from discover.boxes import mask_box

__all__ = ["DinoSegParams", "DinoSegResult", "dino_seg"]


@dataclass(frozen=True)
class DinoSegParams(base.Params):
    """DINO-seg's parameters (LOST's ``dino_seg`` defaults; its script uses head 4 with
    DINO, which is this method's calibrated default for that family)."""

    head: int = 0
    """Which attention head to threshold."""
    keep_mass: float = 0.6
    """Share of the head's attention mass to keep, in (0, 1]."""

    def validate(self) -> None:
        if isinstance(self.head, bool) or int(self.head) != self.head or self.head < 0:
            raise ValueError(f"head must be an integer >= 0, got {self.head!r}")
        if not 0.0 < float(self.keep_mass) <= 1.0:
            raise ValueError(f"keep_mass must be in (0, 1], got {self.keep_mass}")


@dataclass(frozen=True, eq=False)
class DinoSegResult:
    """Output of :func:`dino_seg`. Tensors are on the device of the attention.

    Attributes:
        kept: bool ``[h, w]``, patches in the kept share of the head's attention mass.
        label: the connected-component label chosen (``0`` means the reference's fallback to
            the *non-kept* region, see :func:`dino_seg`).
        mask: bool ``[h, w]``, the chosen component.
        box: ``(x0, y0, x1, y1)`` in patches, end exclusive.
        score: share of the head's attention mass that falls inside ``mask``.
        seed: flat index of the most attended patch of ``mask`` (first in raster order
            among equals).
    """

    kept: torch.Tensor
    label: int
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float
    seed: int = 0


def dino_seg(
    cls_attn: torch.Tensor,
    grid: tuple[int, int],
    **params: Any,
) -> DinoSegResult:
    """DINO-seg baseline of the LOST paper: box around the biggest blob of one head's attention.

    The [CLS]-to-patch attention of ``head`` is thresholded to keep the patches holding the
    top ``keep_mass`` share of its mass (the most attended patches first, the reference's
    0.6); the kept patches are split into 4-connected components and the box is taken around
    the biggest one. The component selection reproduces two quirks of the reference
    ``object_discovery.dino_seg``:

    - the component sizes are only measured for labels ``0 .. n_labels - 1``: the component
      with the highest label is never a candidate, whatever its size;
    - when fewer than two labels are measured (a single kept component, or none), the
      reference falls back to label 0, i.e. the region *outside* the kept patches, and boxes
      that. ``label`` in the result is then 0.

    Ties in size go to the lowest label; ties in attention when sorting go by index.

    Args:
        cls_attn: ``[heads, N]`` attention from [CLS] to the patch tokens (registers removed).
        grid: ``(h, w)`` of the patch grid.
        head: which head to threshold (the reference script's default is 4).
        keep_mass: share of the attention mass to keep, in (0, 1].

    Raises:
        ValueError: bad shapes or arguments.
        EmptyGraphError: the chosen region is empty (the fallback with every patch kept,
            e.g. ``N <= 2``; the reference crashes there).
    """
    if cls_attn.ndim != 2:
        raise ValueError(f"cls_attn must be 2-D [heads, N], got shape {tuple(cls_attn.shape)}")
    n_heads, n = cls_attn.shape
    h, w = base.check_grid(n, grid, "cls_attn")
    p = DinoSegParams.build(params, "dino_seg")
    head, keep_mass = int(p.head), float(p.keep_mass)
    if not 0 <= head < n_heads:
        raise ValueError(f"head must be in [0, {n_heads}), got {head}")

    att = cls_attn[head].float()
    values, order = torch.sort(att)  # the reference's (default) sort, see lost()
    # Normalise the *sorted* values (the sum is taken in that order, as in the reference)
    # and keep a patch once the cumulative share below it exceeds 1 - keep_mass.
    kept_sorted = torch.cumsum(values / values.sum(), dim=0) > (1 - keep_mass)
    kept_flat = torch.empty_like(kept_sorted)
    kept_flat[order] = kept_sorted
    kept = kept_flat.reshape(h, w)

    labels, _ = scipy.ndimage.label(kept.cpu().numpy())
    n_labels = int(labels.max())
    # Quirk reproduced on purpose: sizes exist for labels below n_labels only.
    sizes = np.bincount(labels.ravel(), minlength=n_labels)[:n_labels]
    if len(sizes) > 1:
        chosen = int(np.argmax(sizes[1:])) + 1
    else:
        chosen = 0
    component = torch.from_numpy(labels == chosen)
    if not bool(component.any()):
        raise base.EmptyGraphError(
            f"DINO-seg selected an empty region (label {chosen} of {n_labels} components)"
        )
    return _result(att, kept, chosen, component.to(cls_attn.device))


def _result(att: torch.Tensor, kept: torch.Tensor, label: int, mask: torch.Tensor) -> DinoSegResult:
    flat = mask.reshape(-1)
    total = float(att.sum())
    inside = float(att[flat].sum())
    score = inside / total if total > 0 and math.isfinite(total) else 0.0
    masked = torch.where(flat, att, torch.full_like(att, -math.inf))
    seed = int(torch.nonzero(masked == masked.max())[0])
    return DinoSegResult(kept, label, mask, mask_box(mask), score, seed)


def _dino_seg_method(
    feats: Tensor,
    grid: base.Grid,
    *,
    exclude: base.Mask = None,
    cls_attention: Tensor,
    **params: Any,
) -> DinoSegResult:
    """The registered method: :func:`dino_seg` with excluded patches given no attention
    (so they are never kept) and left out of the chosen region."""
    h, w, exclude = base.check_inputs(feats, grid, exclude)
    if exclude is None:
        return dino_seg(cls_attention, (h, w), **params)
    if bool(exclude.all()):
        raise base.EmptyGraphError("every patch is excluded, nothing left to discover")
    keep = (~exclude).to(cls_attention.device)
    res = dino_seg(cls_attention * keep, (h, w), **params)
    mask = res.mask & keep.reshape(h, w)
    if not bool(mask.any()):
        raise base.EmptyGraphError("DINO-seg's region holds only excluded patches")
    att = cls_attention[DinoSegParams.build(params).head].float() * keep
    return _result(att, res.kept, res.label, mask)


base.register(
    base.Method(
        "dino_seg",
        _dino_seg_method,
        DinoSegParams,
        needs=frozenset({"cls_attention"}),
        defaults={"dino": {"head": 4}, **base.measured_on_dinov2(head=1)},
        summary="DINO-seg: biggest blob of one head's [CLS] attention (LOST's baseline)",
    )
)
