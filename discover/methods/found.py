"""FOUND, its training-free part: the background seed (Simeoni et al., CVPR 2023).

FOUND ("Unsupervised Object Localization: Observing the Background to Discover
Objects", valeoai/FOUND ``bkg_seg.compute_img_bkg_seg``) looks for the background
rather than the object:

1. per-head weights from the sparsity of the last block's [CLS] attention (after CroW,
   Kalantidis et al.): with ``a[h, i]`` the attention of head ``h`` on patch ``i`` and
   ``t`` its mean over every head and patch, ``Q[h] = share of the patches with
   a[h, i] > t`` and ``beta[h] = log(sum_h' (Q[h'] + eps) / (Q[h] + eps))``: a head that
   attends to few patches weighs more;
2. the patch features (keys of the last block) are split into the heads' channel groups
   and each group is multiplied by its head's ``beta``, then L2-normalised;
3. the seed is the patch with the least ``beta``-weighted attention summed over the
   heads (``argmin``: the first such patch in raster order); it is surely background;
4. the background is every patch whose cosine similarity to the seed exceeds
   ``bkg_th`` (0.3); the object mask is the rest;
5. the box is that of the largest 4-connected component of the object mask (the
   reference's ``get_bbox_from_segmentation_labels``: ``bincount(labels).argmax()``, the
   lowest label among equals), ``max + 1``.

FOUND then trains a 1x1 convolution on DUTS-TR with these masks as pseudo-labels (and a
bilateral solver to refine them); that needs DUTS-TR, which we cannot download, so only
the training-free step above is here.

With registers, ``cls_attention`` is the [CLS] row of the softmax over every token
restricted to the patch columns (the reference's ``attentions[:, :, 0, 1:]`` with the
register columns dropped too). Excluded patches (several objects) are never the seed,
never in the object and do not count in the attention statistics.

Score: the share of the ``beta``-weighted attention mass that falls in the chosen
component (in ``[0, 1]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor

import discover.methods.base as base
from discover.boxes import mask_box

__all__ = ["FoundParams", "FoundResult", "found"]


@dataclass(frozen=True)
class FoundParams(base.Params):
    """FOUND's parameters (``configs/found_DUTS-TR.yaml`` of the reference)."""

    bkg_th: float = 0.3
    """Cosine similarity to the seed above which a patch is background."""
    apply_weights: bool = True
    """Weight the heads by the sparsity of their attention (the reference's default)."""
    center: bool = False
    """Subtract the mean feature of the patches in the graph first (not in the reference;
    DINOv2's keys are all alike above ``bkg_th`` otherwise)."""

    def validate(self) -> None:
        if not -1.0 <= float(self.bkg_th) < 1.0:
            raise ValueError(f"bkg_th must be in [-1, 1) (a cosine similarity), got {self.bkg_th}")


@dataclass(frozen=True, eq=False)
class FoundResult:
    """Output of :func:`found`.

    Attributes:
        seed: flat index of the most attended patch (weighted) of ``mask``: a patch of
            the object, as every method's ``seed`` is.
        background_seed: flat index of FOUND's seed, the least attended patch, surely
            background; the object is what does not look like it.
        background: bool ``[h, w]``, patches similar to the background seed.
        mask: bool ``[h, w]``, the largest 4-connected component of the object mask.
        box: ``(x0, y0, x1, y1)`` of ``mask``, in patches, end exclusive.
        score: share of the weighted attention mass inside ``mask``.
        beta: float ``[heads]``, the head weights.
    """

    seed: int
    background_seed: int
    background: torch.Tensor
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float
    beta: torch.Tensor


def found(
    feats: Tensor,
    grid: base.Grid,
    *,
    exclude: base.Mask = None,
    cls_attention: Tensor,
    **params: Any,
) -> FoundResult:
    """Find the object as what does not look like the background seed (FOUND).

    Args:
        feats: ``[N, D]`` patch features (the reference uses the last block's keys),
            ``D`` a multiple of the number of heads.
        grid: ``(h, w)``.
        exclude: optional bool ``[N]`` of patches left out.
        cls_attention: ``[heads, N]`` attention of [CLS] on the patches, last block.
        **params: :class:`FoundParams` (``bkg_th``, ``apply_weights``, ``center``).

    Raises:
        ValueError: bad shapes.
        EmptyGraphError: every patch excluded, or every patch similar to the seed (no
            object at all).
    """
    h, w, exclude = base.check_inputs(feats, grid, exclude)
    p = FoundParams.build(params, "found")
    n = h * w
    if cls_attention.ndim != 2 or cls_attention.shape[1] != n:
        raise ValueError(
            f"cls_attention must be [heads, {n}], got shape {tuple(cls_attention.shape)}"
        )
    heads = int(cls_attention.shape[0])
    if feats.shape[1] % heads:
        raise ValueError(f"feature width {feats.shape[1]} is not a multiple of {heads} heads")
    keep = torch.ones(n, dtype=torch.bool, device=feats.device) if exclude is None else ~exclude
    if not bool(keep.any()):
        raise base.EmptyGraphError("every patch is excluded, nothing left to discover")
    att = cls_attention.float().to(feats.device)
    if not bool(torch.isfinite(att).all()) or not bool(torch.isfinite(feats).all()):
        raise ValueError("feats or cls_attention contain NaN or infinite values")

    eps = 1e-10  # the reference's
    kept_att = att[:, keep]
    threshold = kept_att.mean()
    q = (kept_att > threshold).sum(dim=1).float() / kept_att.shape[1]
    beta = torch.log((q + eps).sum() / (q + eps))
    if not p.apply_weights:
        beta = torch.ones_like(beta)

    x = feats.float()
    if p.center:
        x = x - x[keep].mean(dim=0, keepdim=True)
    descs = x.reshape(n, heads, -1) * beta[None, :, None]
    descs = F.normalize(descs.reshape(n, -1), p=2, dim=-1)
    weighted = (att * beta[:, None]).sum(dim=0)
    weighted = torch.where(keep, weighted, torch.full_like(weighted, float("inf")))
    bkg_seed = int(torch.argmin(weighted))  # first minimum, as torch.argmin documents
    background = (descs @ descs[bkg_seed]) > float(p.bkg_th)
    objects = ~background & keep
    if not bool(objects.any()):
        raise base.EmptyGraphError(f"every patch is similar to the background seed (> {p.bkg_th})")

    labels, _ = scipy.ndimage.label(objects.reshape(h, w).cpu().numpy())
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    largest = int(np.argmax(counts))
    component = torch.from_numpy(labels == largest).to(feats.device)
    flat = component.reshape(-1)
    total = float(torch.where(keep, weighted, torch.zeros_like(weighted)).sum())
    score = float(weighted[flat].sum()) / total if total > 0 else 0.0
    inside = torch.where(flat, weighted, torch.full_like(weighted, -float("inf")))
    return FoundResult(
        seed=int(torch.argmax(inside)),
        background_seed=bkg_seed,
        background=background.reshape(h, w),
        mask=component,
        box=mask_box(component),
        score=score,
        beta=beta,
    )


base.register(
    base.Method(
        "found",
        found,
        FoundParams,
        needs=frozenset({"cls_attention"}),
        defaults=base.measured_on_dinov2(features="queries", bkg_th=0.5),
        summary="FOUND background seed, training-free (Simeoni et al., CVPR 2023)",
    )
)
