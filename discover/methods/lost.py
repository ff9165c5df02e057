"""LOST: localizing objects with self-supervised transformers (Siméoni et al., BMVC 2021).

LOST on one image, with ``F`` the ``[N, D]`` patch features (the reference uses the keys of
the last attention block, [CLS] removed) on an ``(h, w)`` grid:

1. ``A = F F^T`` (raw dot products, no normalisation), optionally plus a constant bias;
2. the degree of a patch is the number of *other* patches it has a positive similarity with;
   patches are ordered by increasing degree and the first one is the seed;
3. seed expansion: among the ``k_patches`` lowest-degree patches, those with a positive
   similarity to the seed (the seed itself included when ``A[seed, seed] > 0``) form the seed
   set ``S``;
4. ``M = sum over s in S of A[s]``; the object mask is the 4-connected component of
   ``M > 0`` that contains the seed; the box is its bounding box.

Every step and box convention gives the same answer as the reference
``object_discovery.lost`` of valeoai/LOST on the same ``A``, including the order of patches
of equal degree: we make the reference's own ``torch.argsort(-degree, descending=True)``
call, whose order inside a tie is that of torch's (unstable) sort on the build and device
at hand -- the same as the reference's there, possibly different on another device.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import scipy.ndimage
import torch
from torch import Tensor

import discover.methods.base as base
from discover.boxes import mask_box

__all__ = [
    "LostParams",
    "LostResult",
    "gram_bias_percentile",
    "lost",
    "resolve_gram_bias",
]

_PERCENTILE = re.compile(r"^p(\d+(?:\.\d*)?|\.\d+)$")


@dataclass(frozen=True, eq=False)
class LostResult:
    """Output of :func:`lost`. All tensors are on the device of the input features.

    Attributes:
        seed: flat index (row-major, full ``h*w`` grid) of the seed patch.
        similars: long ``[|S|]``, flat full-grid indices of the expanded seed set, in the
            increasing-degree order they were picked in.
        scores: float ``[N]``, the degree of each patch (number of positive off-diagonal
            similarities among the patches in the graph); ``-1`` for excluded patches.
        mask: bool ``[h, w]``, the 4-connected component of ``M > 0`` containing the seed.
        box: ``(x0, y0, x1, y1)`` in patches, end exclusive (bounding box of ``mask``).
        score: confidence, see :func:`lost`.
        gram_bias: the bias actually added to the gram matrix (a ``"pNN"`` string resolved).
    """

    seed: int
    similars: torch.Tensor
    scores: torch.Tensor
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float
    gram_bias: float = 0.0


def _off_diagonal(a: torch.Tensor) -> torch.Tensor:
    """The ``N*(N-1)`` off-diagonal entries of a square matrix, flattened (row-major)."""
    n = a.shape[0]
    if n < 2:
        return a.new_empty(0)
    # In the flattened matrix the diagonal sits every N+1 entries: dropping the first entry
    # and cutting rows of length N+1 puts every diagonal entry in the last column.
    return a.reshape(-1)[1:].reshape(n - 1, n + 1)[:, :-1].reshape(-1)


def _percentile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation percentile (numpy's default method) of a 1-D tensor."""
    n = values.numel()
    pos = q / 100.0 * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    v_lo = float(torch.kthvalue(values, lo + 1).values)
    if hi == lo or pos == lo:
        return v_lo
    v_hi = float(torch.kthvalue(values, hi + 1).values)
    return v_lo + (pos - lo) * (v_hi - v_lo)


def resolve_gram_bias(A: torch.Tensor, bias: float | str) -> float:
    """Turn a gram-bias setting into the constant to add to the gram matrix ``A``.

    Args:
        A: square gram matrix ``[N, N]``.
        bias: a number, returned as is; or ``"pNN"`` (e.g. ``"p50"``, ``"p90"``, ``"p12.5"``),
            meaning minus the NN-th percentile (linear interpolation) of the off-diagonal
            entries of ``A``: after adding it, the NN% smallest similarities are ``<= 0``, so
            ``"p50"`` turns half of the edges into non-edges. With ``N == 1`` there is no
            off-diagonal entry and a percentile bias resolves to ``0.0``.

    Raises:
        ValueError: for a malformed string, a percentile outside [0, 100] or a non-finite
            number.
    """
    q = gram_bias_percentile(bias)
    if q is not None:
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
        off = _off_diagonal(A.float())
        if off.numel() == 0:
            return 0.0
        return -_percentile(off, q)
    return float(bias)


def gram_bias_percentile(bias: float | str) -> float | None:
    """The percentile of a ``"pNN"`` gram bias, ``None`` for a number (checked finite).

    Raises:
        ValueError: a malformed string, a percentile outside [0, 100] or a non-finite number.
    """
    if isinstance(bias, str):
        match = _PERCENTILE.match(bias.strip())
        if match is None:
            raise ValueError(f"gram_bias string must look like 'p50' (a percentile), got {bias!r}")
        q = float(match.group(1))
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"gram_bias percentile must be in [0, 100], got {bias!r}")
        return q
    if isinstance(bias, bool) or not math.isfinite(float(bias)):
        raise ValueError(f"gram_bias must be a finite number or 'pNN', got {bias!r}")
    return None


def _off_diagonal_std(A: torch.Tensor) -> float:
    """Population standard deviation of the off-diagonal entries of ``A``.

    From sums over ``A`` (no copy of the ``N x N`` matrix): this runs once per image.
    """
    n = A.shape[0]
    m = n * (n - 1)
    if m == 0:
        return 0.0
    # float32 reductions (torch sums pairwise: relative error ~1e-6, plenty for a score).
    diag = A.diagonal().double()
    s1 = float(A.sum()) - float(diag.sum())
    s2 = float(torch.linalg.vector_norm(A)) ** 2 - float((diag * diag).sum())
    mean = s1 / m
    return math.sqrt(max(s2 / m - mean * mean, 0.0))


def _confidence(
    A: torch.Tensor, M: torch.Tensor, inside: torch.Tensor, similars: torch.Tensor
) -> float:
    """``share * contrast`` of the seed-set similarity (see :func:`lost`), never NaN."""
    n_similars = similars.numel()
    outside = ~inside
    if n_similars == 0 or not bool(inside.any()) or not bool(outside.any()):
        return 0.0
    # Leave out the self-similarities of the seed set: they sit wherever the seed set is and
    # would reward tiny masks.
    evidence = M.clone()
    evidence[similars] -= A.diagonal()[similars]
    positive = evidence.clamp(min=0)
    total = float(positive.sum())
    sigma = _off_diagonal_std(A)
    if not (total > 0.0 and sigma > 0.0 and math.isfinite(total) and math.isfinite(sigma)):
        return 0.0
    share = float(positive[inside].sum()) / total
    contrast = (float(evidence[inside].mean()) - float(evidence[outside].mean())) / (
        n_similars * sigma
    )
    return share * contrast


@dataclass(frozen=True)
class LostParams(base.Params):
    """LOST's parameters; the defaults are the reference's (valeoai/LOST)."""

    k_patches: int = 100
    """How many lowest-degree patches the seed expansion looks at."""
    gram_bias: float | str = 0.0
    """Constant added to the gram matrix, or ``"pNN"`` (see :func:`resolve_gram_bias`)."""
    center: bool = False
    """Subtract the mean feature of the patches in the graph first."""

    def validate(self) -> None:
        if isinstance(self.k_patches, bool) or int(self.k_patches) != self.k_patches:
            raise ValueError(f"k_patches must be an integer, got {self.k_patches!r}")
        if int(self.k_patches) < 1:
            raise ValueError(f"k_patches must be >= 1, got {self.k_patches}")
        gram_bias_percentile(self.gram_bias)


def lost(feats: Tensor, grid: base.Grid, *, exclude: base.Mask = None, **params: Any) -> LostResult:
    """Find one object with LOST.

    Args:
        feats: ``[N, D]`` patch features in row-major grid order ([CLS] and registers
            removed); any float dtype (computed in float32) on any device.
        grid: ``(h, w)``, rows and columns of the patch grid, ``h * w == N``.
        k_patches: how many lowest-degree patches the seed expansion looks at (reference 100);
            values ``>= N`` simply use every patch.
        gram_bias: constant added to every entry of the gram matrix, or ``"pNN"`` (see
            :func:`resolve_gram_bias`). The registers paper (Darcet et al., sec. 3.3) states
            that LOST on DINOv2 needs a bias added to the gram matrix without publishing the
            value (facebookresearch/dinov2 issue 381). A *negative* bias turns small positive
            similarities into non-edges: degrees shrink, fewer patches join the seed set and
            ``M > 0`` covers less of the image. ``0.0`` is the reference behaviour.
        center: subtract the mean feature (over the patches in the graph) before the gram
            matrix. ``False`` is the reference behaviour.
        exclude: optional bool ``[N]``; those patches are removed from the graph: centering,
            the percentile bias, degrees, ordering, ``k_patches`` and ``M`` only involve the
            remaining patches, and an excluded patch is never in the mask (it separates
            components like a non-positive ``M``). ``None`` or all-false gives exactly the
            plain algorithm.

    Returns:
        A :class:`LostResult`. Its ``score`` measures how much of the seed set's similarity
        points at the returned component, and how strongly, over the patches in the graph.
        With ``E = M`` minus the self-similarities of the seed set (``E[s] = M[s] - A[s, s]``
        for ``s`` in ``S``) and ``sigma`` the standard deviation of the off-diagonal entries
        of ``A``::

            share    = sum(max(E, 0) inside mask) / sum(max(E, 0))                 in [0, 1]
            contrast = (mean(E inside mask) - mean(E outside mask)) / (|S| * sigma)
            score    = share * contrast

        ``contrast`` is the average over the seed set of how much more a member resembles the
        object than the rest, in standard deviations of the gram matrix (invariant to the
        feature scale); ``share`` is low when the positive evidence is scattered over many
        components, as on noise. About 2 for a compact object with features opposite to a
        uniform background, well below 0.5 for Gaussian noise. ``0.0`` when the mask covers
        the whole graph (nothing to contrast, e.g. every similarity positive), when ``A`` has
        no spread, or when the evidence has no positive part.

    Raises:
        ValueError: bad shapes, grid mismatch, ``k_patches < 1`` or non-finite features.
        EmptyGraphError: (a ``ValueError``) every patch excluded, or a degenerate graph where
            the seed ends up outside ``M > 0``. The latter needs an empty seed set (``A`` is
            symmetric up to rounding), i.e. ``A[seed, seed] <= 0`` and no other candidate
            positive with the seed, e.g. ``N == 1`` with a zero feature or a bias ``<= -|f|^2`` (the
            reference raises a ``ValueError`` there too).
    """
    h, w, exclude = base.check_inputs(feats, grid, exclude)
    p = LostParams.build(params, "lost")
    k_patches, gram_bias, center = int(p.k_patches), p.gram_bias, bool(p.center)
    n = h * w
    device = feats.device

    if exclude is None:
        keep_idx = torch.arange(n, device=device)
    else:
        keep_idx = torch.nonzero(~exclude).flatten()
    if keep_idx.numel() == 0:
        raise base.EmptyGraphError("every patch is excluded, nothing left to discover")

    F = (feats if exclude is None else feats[keep_idx]).float()
    # One reduction instead of an elementwise pass: a NaN or inf anywhere reaches the sum.
    if not bool(torch.isfinite(F.sum())):
        raise ValueError("feats contain NaN or infinite values (or overflow float32)")
    if center:
        F = F - F.mean(dim=0, keepdim=True)

    A = F @ F.T
    bias = resolve_gram_bias(A, gram_bias)
    if bias != 0.0:
        A = A + bias

    # Degree: positive entries of each row, the diagonal left out of the count. (The
    # reference also zeroes the negative entries first; that does not change the count.)
    positive = A > 0
    # int32 accumulation: twice as fast as the default int64 over N*N booleans.
    degree = positive.sum(dim=1, dtype=torch.int32) - positive.diagonal().int()
    # Increasing degree, exactly the reference's call: the negated degree sorted in
    # descending order with torch's default (not necessarily stable) sort. Degrees are
    # integers and ties are common; the order inside a tie is whatever this torch build's
    # sort gives on this device (x86 CPU builds use a SIMD sort that does not keep index
    # order), which is also what the reference code gives on the same build and device.
    # Asking for a stable sort would pick another seed among equal-degree patches.
    order = torch.argsort(-degree.float(), descending=True)
    seed_local = order[0]
    candidates = order[:k_patches]
    similars_local = candidates[A[seed_local, candidates] > 0]
    M = A[similars_local].sum(dim=0)

    # Back to the full grid; an excluded patch is never positive.
    positive_full = torch.zeros(n, dtype=torch.bool, device=device)
    positive_full[keep_idx] = M > 0
    seed = int(keep_idx[seed_local])
    labels, _ = scipy.ndimage.label(positive_full.reshape(h, w).cpu().numpy())
    seed_label = int(labels[seed // w, seed % w])
    if seed_label == 0:
        raise base.EmptyGraphError(
            "LOST's seed is not in the positive region of the expanded similarity "
            f"(seed set of size {similars_local.numel()}): degenerate graph"
        )
    component = torch.from_numpy(labels == seed_label)
    box = mask_box(component)
    mask = component.to(device)

    inside_local = mask.reshape(-1)[keep_idx]
    score = _confidence(A, M, inside_local, similars_local)

    scores = torch.full((n,), -1.0, dtype=torch.float32, device=device)
    scores[keep_idx] = degree.float()
    return LostResult(
        seed=seed,
        similars=keep_idx[similars_local],
        scores=scores,
        mask=mask,
        box=box,
        score=score,
        gram_bias=bias,
    )


base.register(
    base.Method(
        "lost",
        lost,
        LostParams,
        defaults=base.measured_on_dinov2(features="tokens"),
        summary="LOST seed expansion (Simeoni et al., BMVC 2021)",
    )
)
