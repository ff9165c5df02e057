"""Deep spectral methods: the Fiedler eigenvector of the feature-affinity Laplacian
(Melas-Kyriazi et al., CVPR 2022; lukemelas/deep-spectral-segmentation, object
localization with ``--eigenseg --which_matrix laplacian``).

1. ``A = F F^T`` of the L2-normalised patch features (keys in the reference), kept
   where positive: ``W = A * (A > 0)``, divided by its maximum;
2. degrees ``d = W 1``, ``D = diag(d)`` (each at least 1, the self-affinity);
3. ``y``, the eigenvector of the second smallest eigenvalue of ``(D - W) y = lambda D y``
   (the Fiedler vector; the same generalised problem TokenCut solves, on a soft graph
   instead of a thresholded one);
4. the patch mask is ``y > 0``; when more than half but not all of the patches are in
   it, it is replaced by its complement (the reference's fix of the eigenvector's sign:
   the object is the smaller side); an empty mask becomes the whole grid;
5. the box is that of the largest connected component of the mask, 8-connected
   (``skimage.measure.label``'s default in the reference; the lowest label among equal
   sizes), ``max + 1``.

The reference's solver returns ``y`` or ``-y``; with the side rule of step 4 the result
depends on that sign only when exactly half of the patches are positive. There we keep
the side holding the entry of largest ``|y|`` (the first one among equals), so the
answer is the same whatever the solver.

Score: ``1 - lambda_2``, as for TokenCut (near 1 for a cleanly separated region).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from skimage.measure import label as cc_label
from torch import Tensor

import discover.methods.base as base
from discover.boxes import mask_box
from discover.methods.tokencut import second_eigenpair

__all__ = ["SpectralParams", "SpectralResult", "spectral"]


@dataclass(frozen=True)
class SpectralParams(base.Params):
    """Parameters of the deep-spectral object localisation."""

    center: bool = False
    """Subtract the mean feature first (not in the reference)."""
    solver: str = "auto"
    """Eigensolver (see :func:`discover.methods.tokencut.second_eigenpair`)."""

    def validate(self) -> None:
        if self.solver not in ("auto", "dense", "lanczos"):
            raise ValueError(f"solver must be 'auto', 'dense' or 'lanczos', got {self.solver!r}")


@dataclass(frozen=True, eq=False)
class SpectralResult:
    """Output of :func:`spectral`: ``seed`` (largest ``|y|`` in the mask), ``mask`` (the
    largest component), ``box``, ``score`` (``1 - eigenvalue``), ``eigenvector``
    (float64 ``[h, w]``, 0 on excluded patches), ``region`` (bool ``[h, w]``, the
    side of the split before the component was taken) and ``eigenvalue``."""

    seed: int
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float
    eigenvector: torch.Tensor
    region: torch.Tensor
    eigenvalue: float


def spectral(
    feats: Tensor, grid: base.Grid, *, exclude: base.Mask = None, **params: Any
) -> SpectralResult:
    """Localise the main object with the Fiedler vector of the feature affinity.

    Raises:
        ValueError: bad shapes or non-finite features.
        EmptyGraphError: fewer than 3 patches left in the graph.
    """
    h, w, exclude = base.check_inputs(feats, grid, exclude)
    p = SpectralParams.build(params, "spectral")
    device = feats.device
    kept = torch.arange(h * w, device=device) if exclude is None else torch.nonzero(~exclude)[:, 0]
    n = int(kept.numel())
    if n < 3:
        raise base.EmptyGraphError(f"spectral: needs at least 3 patches in the graph, got {n}")
    x = feats[kept].double()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("feats contain NaN or infinite values")
    if p.center:
        x = x - x.mean(dim=0, keepdim=True)
    x = F.normalize(x, p=2, dim=-1)
    a = x @ x.T
    weights = a * (a > 0)
    top = float(weights.max())
    if top <= 0:
        raise base.EmptyGraphError("spectral: no positive affinity between patches")
    weights = weights / top
    # Every degree is at least the self-affinity 1 of a normalised feature, so the
    # reference's guard (a degree under 1e-12 set to 1) never fires, but for a zero
    # feature, which has no direction to compare.
    if bool((weights.sum(dim=1) < 1e-12).any()):
        raise ValueError("spectral: a patch feature has zero norm")
    lam, vec = second_eigenpair(weights, solver=p.solver)

    side = vec > 0
    share = float(side.double().mean())
    if share == 0.5:
        big = vec.abs()
        first = int(torch.nonzero(big >= big.max())[0])
        side = vec > 0 if bool(vec[first] > 0) else vec < 0
    elif 0.5 < share < 1.0:
        side = ~side
    elif share == 0.0:
        side = torch.ones_like(side)

    region = torch.zeros(h * w, dtype=torch.bool, device=device)
    region[kept] = side
    labels = cc_label(region.reshape(h, w).cpu().numpy(), connectivity=2)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    component = torch.from_numpy(labels == int(np.argmax(counts))).to(device)
    full = torch.zeros(h * w, dtype=torch.float64, device=device)
    full[kept] = vec
    inside = torch.where(component.reshape(-1), full.abs(), torch.full_like(full, -1.0))
    seed, box, vec2d = int(torch.argmax(inside)), mask_box(component), full.reshape(h, w)
    return SpectralResult(seed, component, box, 1.0 - lam, vec2d, region.reshape(h, w), lam)


base.register(
    base.Method(
        "spectral",
        spectral,
        SpectralParams,
        defaults=base.measured_on_dinov2(features="queries"),
        summary="Deep spectral methods: Fiedler vector of the affinity (Melas-Kyriazi, CVPR 2022)",
    )
)
