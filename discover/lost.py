"""LOST: localizing objects with self-supervised transformers (Siméoni et al., BMVC 2021).

Also the DINO-seg baseline of the same paper (:func:`dino_seg`).

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

import numpy as np
import scipy.ndimage
import torch

from discover.boxes import mask_box
from discover.methods import EmptyGraphError, check_grid, check_inputs, register_method

__all__ = [
    "DinoSegResult",
    "LostResult",
    "dino_seg",
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
    """

    kept: torch.Tensor
    label: int
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float


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
    if isinstance(bias, str):
        match = _PERCENTILE.match(bias.strip())
        if match is None:
            raise ValueError(f"gram_bias string must look like 'p50' (a percentile), got {bias!r}")
        q = float(match.group(1))
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"gram_bias percentile must be in [0, 100], got {bias!r}")
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"A must be a square matrix, got shape {tuple(A.shape)}")
        off = _off_diagonal(A.float())
        if off.numel() == 0:
            return 0.0
        return -_percentile(off, q)
    value = float(bias)
    if not math.isfinite(value):
        raise ValueError(f"gram_bias must be finite, got {bias!r}")
    return value


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


@register_method("lost")
def lost(
    feats: torch.Tensor,
    grid: tuple[int, int],
    *,
    k_patches: int = 100,
    gram_bias: float | str = 0.0,
    center: bool = False,
    exclude: torch.Tensor | None = None,
) -> LostResult:
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
    h, w, exclude = check_inputs(feats, grid, exclude)
    n = h * w
    if int(k_patches) < 1:
        raise ValueError(f"k_patches must be >= 1, got {k_patches}")
    k_patches = int(k_patches)
    device = feats.device

    if exclude is None:
        keep_idx = torch.arange(n, device=device)
    else:
        keep_idx = torch.nonzero(~exclude).flatten()
    if keep_idx.numel() == 0:
        raise EmptyGraphError("every patch is excluded, nothing left to discover")

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
        raise EmptyGraphError(
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


def dino_seg(
    cls_attn: torch.Tensor,
    grid: tuple[int, int],
    head: int = 0,
    keep_mass: float = 0.6,
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
    h, w = check_grid(n, grid, "cls_attn")
    if not 0 <= head < n_heads:
        raise ValueError(f"head must be in [0, {n_heads}), got {head}")
    if not 0.0 < keep_mass <= 1.0:
        raise ValueError(f"keep_mass must be in (0, 1], got {keep_mass}")

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
        raise EmptyGraphError(
            f"DINO-seg selected an empty region (label {chosen} of {n_labels} components)"
        )
    box = mask_box(component)
    mask = component.to(cls_attn.device)

    total = float(att.sum())
    inside = float(att[mask.reshape(-1)].sum())
    score = inside / total if total > 0 and math.isfinite(total) else 0.0
    return DinoSegResult(kept=kept, label=chosen, mask=mask, box=box, score=score)
