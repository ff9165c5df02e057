"""TokenCut: object discovery by a normalized cut of the patch-affinity graph.

TokenCut (Wang et al., CVPR 2022) builds a fully connected graph on the patch
features of one image and splits it with the spectral relaxation of the
normalized cut (Shi & Malik):

1. cosine similarity ``S`` of the L2-normalized patch features;
2. binary weights ``W[i, j] = 1`` where ``S[i, j] > tau``, and ``eps`` elsewhere
   (so the graph is always connected; the diagonal is kept, as in the reference);
3. degrees ``d = W.sum(1)``, ``D = diag(d)``;
4. ``y``, the eigenvector of the second smallest eigenvalue ``lambda_2`` of the
   generalized problem ``(D - W) y = lambda D y``, normalized so ``y^T D y = 1``;
5. the seed is ``argmax |y|``; ``y`` is signed so that the seed lies above the
   mean of ``y`` (the reference negates ``y`` when the seed falls on the other
   side), and the foreground is the bipartition ``y > mean(y)``, i.e. the seed's side;
6. the 4-connected component of the foreground that contains the seed is the
   object; its box is the component's extent, end exclusive.

The generalized problem is solved through the equivalent symmetric one,
``D^{-1/2} (D - W) D^{-1/2} z = lambda z`` with ``y = D^{-1/2} z``, in float64: a dense
solver for up to :data:`DENSE_MAX_PATCHES` patches (LAPACK's ``evr`` for the single
wanted eigenpair on CPU, ``torch.linalg.eigh`` on other devices), and
Lanczos (``scipy.sparse.linalg.eigsh`` on the largest eigenvalues of
``D^{-1/2} W D^{-1/2}``, whose eigenvalues are ``1 - lambda``) above that.

Ties and the eigenvector's sign. A solver may return ``y`` or ``-y``, and entries
that are equal in exact arithmetic (patches with identical rows of ``W``: a cleanly
planted object, repeated features, isolated patches) come back differing by
round-off. The reference (``numpy.argmax`` then a strict ``> mean`` split) then
picks its seed and splits patches lying at the mean by round-off and by the
solver's sign. We resolve both at a relative tolerance :data:`TIE_RTOL` (1e-9 of
``max |y|``: above solver round-off, far below real differences between patches):

- the seed is the *first* index whose ``|y|`` is within the tolerance of the
  maximum, which is ``numpy.argmax``'s rule applied to the exact values;
- a patch within the tolerance of the mean is background, whatever the sign.

Outside such ties the result is exactly the reference's, and it never depends on
the solver's sign or on the solver (dense or Lanczos, CPU or CUDA).

Score. ``score = 1 - lambda_2``. ``lambda_2`` is the relaxed normalized-cut value
of the best split (0 for a graph that falls apart into two groups linked only by
``eps`` edges), so the score is close to 1 for a cleanly separated object and
lower when no group of patches stands apart (it can even be slightly negative:
``lambda_2 <= n / (n - 1)`` for ``n`` patches, since the eigenvalues sum to at most n).
It describes the graph that was cut, so a score computed with ``exclude`` is the
separation found in the remaining patches.

Degenerate graphs raise :class:`discover.methods.base.EmptyGraphError`: fewer than 3
patches left (the reference asks for the 2nd and 3rd eigenpairs, which needs 3),
or a graph without structure, i.e. every pair of distinct patches linked (e.g. all
features identical) or no pair linked (every split is then equally good and the
eigenvector is arbitrary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import scipy.ndimage
import scipy.sparse.linalg
import torch
import torch.nn.functional as F
from torch import Tensor

import discover.methods.base as base
from discover.boxes import mask_box

__all__ = [
    "DENSE_MAX_PATCHES",
    "TIE_RTOL",
    "TokenCutParams",
    "TokenCutResult",
    "tokencut",
    "tokencut_affinity",
    "second_eigenpair",
]

#: Above this many (non-excluded) patches, ``solver="auto"`` uses Lanczos.
DENSE_MAX_PATCHES = 1600
# Measured (2-core CPU, one eigenpair): dense evr 0.14 s at 1369 patches, 0.71 s at 2304,
# 3.3 s at 4096; Lanczos 0.12 s, 0.13 s, 0.32 s, with eigenvalues equal to 1e-14.

#: Relative tolerance (of ``max |y|``) under which eigenvector entries count as tied.
TIE_RTOL = 1e-9


@dataclass(frozen=True, eq=False)
class TokenCutResult:
    """Output of :func:`tokencut` for one image.

    Attributes:
        seed: flat index (row-major, into the full ``h*w`` grid) of the patch with the
            largest ``|eigenvector|``.
        mask: bool ``[h, w]``, the 4-connected foreground component holding the seed.
        box: ``(x0, y0, x1, y1)`` of ``mask`` in patch units, end exclusive.
        score: ``1 - eigenvalue``; higher means a better separated object.
        eigenvector: float64 ``[h, w]``, the second smallest generalized eigenvector
            (``y^T D y = 1``), signed so the seed's side lies above the mean;
            excluded patches hold 0.
        bipartition: bool ``[h, w]``, the seed's side of the mean split (excluded
            patches are False).
        eigenvalue: ``lambda_2``, the second smallest generalized eigenvalue.
    """

    seed: int
    mask: Tensor
    box: tuple[int, int, int, int]
    score: float
    eigenvector: Tensor
    bipartition: Tensor
    eigenvalue: float


def tokencut_affinity(feats: Tensor, tau: float = 0.2, eps: float = 1e-5) -> Tensor:
    """TokenCut's graph weights: 1 where the cosine similarity exceeds ``tau``, else ``eps``.

    Args:
        feats: ``[n, D]`` features (any float dtype; the similarity is computed in
            float32, or float64 for float64 input).
        tau: similarity threshold for an edge.
        eps: weight of non-edges.

    Returns:
        float64 ``[n, n]`` symmetric weight matrix, on ``feats.device``.
    """
    return _weights(_edges(feats, tau), eps)


def _edges(feats: Tensor, tau: float) -> Tensor:
    """Bool ``[n, n]``: cosine similarity above ``tau`` (diagonal included)."""
    work = feats if feats.dtype == torch.float64 else feats.float()
    unit = F.normalize(work, p=2, dim=1)
    return (unit @ unit.T) > tau


def _weights(edges: Tensor, eps: float) -> Tensor:
    one = torch.ones((), dtype=torch.float64, device=edges.device)
    small = torch.full((), eps, dtype=torch.float64, device=edges.device)
    return torch.where(edges, one, small)


def second_eigenpair(weights: Tensor, *, solver: str = "auto") -> tuple[float, Tensor]:
    """Second smallest eigenpair of ``(D - W) y = lambda D y`` for a connected graph.

    Args:
        weights: float64 ``[n, n]`` symmetric nonnegative weights with positive degrees.
        solver: ``"dense"`` (LAPACK ``evr`` on CPU, ``torch.linalg.eigh`` elsewhere), ``"lanczos"``
            (``scipy.sparse.linalg.eigsh``) or ``"auto"`` (dense up to
            :data:`DENSE_MAX_PATCHES` patches).

    Returns:
        ``(lambda_2, y)`` with ``y`` float64 ``[n]`` normalized so ``y^T D y = 1``; its
        sign is whatever the solver gives.
    """
    n = weights.shape[0]
    if solver == "auto":
        solver = "dense" if n <= DENSE_MAX_PATCHES else "lanczos"
    if solver not in ("dense", "lanczos"):
        raise ValueError(f"solver must be 'auto', 'dense' or 'lanczos', got {solver!r}")
    if n < 3:
        raise ValueError(f"need at least 3 nodes, got {n}")
    weights = weights.to(torch.float64)
    inv_sqrt_deg = weights.sum(dim=1).rsqrt()
    # Normalized affinity N = D^-1/2 W D^-1/2; the Laplacian problem has eigenvalues 1 - mu(N).
    normalized = inv_sqrt_deg[:, None] * weights * inv_sqrt_deg[None, :]
    if solver == "dense":
        laplacian = torch.eye(n, dtype=torch.float64, device=weights.device) - normalized
        laplacian = 0.5 * (laplacian + laplacian.T)
        if laplacian.device.type == "cpu":
            # LAPACK's MRRR driver computes just the wanted eigenpair (several times faster
            # than a full decomposition); on accelerators the full eigh is fast already.
            values, vectors = scipy.linalg.eigh(
                laplacian.numpy(), subset_by_index=[1, 1], driver="evr"
            )
            lam = float(values[0])
            z = torch.from_numpy(np.ascontiguousarray(vectors[:, 0]))
        else:
            values, vectors = torch.linalg.eigh(laplacian)
            lam = float(values[1])
            z = vectors[:, 1]
    else:
        lam, z = _lanczos_second(normalized)
    return lam, inv_sqrt_deg * z


def _lanczos_second(normalized: Tensor) -> tuple[float, Tensor]:
    """Second largest eigenpair of the normalized affinity, as (1 - mu, z)."""
    n = normalized.shape[0]
    device = normalized.device

    def matvec(x: np.ndarray) -> np.ndarray:
        vec = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        return (normalized @ vec.to(device)).cpu().numpy()

    operator = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    start = np.random.default_rng(0).standard_normal(n)  # fixed start: deterministic output
    mus, zs = scipy.sparse.linalg.eigsh(operator, k=2, which="LA", v0=start, tol=1e-12)
    second = int(np.argmin(mus))
    z = torch.from_numpy(np.ascontiguousarray(zs[:, second])).to(device)
    return 1.0 - float(mus[second]), z / torch.linalg.vector_norm(z)


@dataclass(frozen=True)
class TokenCutParams(base.Params):
    """TokenCut's parameters; the defaults are the reference's (YangtaoWANG95/TokenCut)."""

    tau: float = 0.2
    """Cosine-similarity threshold for an edge."""
    eps: float = 1e-5
    """Weight of non-edges (keeps the graph connected)."""
    solver: str = "auto"
    """Eigensolver: ``auto``, ``dense`` or ``lanczos`` (see :func:`second_eigenpair`)."""
    center: bool = False
    """Subtract the mean feature of the patches in the graph first (not in the reference)."""

    def validate(self) -> None:
        if not 0.0 < float(self.tau) < 1.0:
            raise ValueError(f"tau must be in (0, 1) (a cosine similarity), got {self.tau}")
        if not float(self.eps) > 0:
            raise ValueError(f"eps must be positive (it keeps the graph connected), got {self.eps}")
        if self.solver not in ("auto", "dense", "lanczos"):
            raise ValueError(f"solver must be 'auto', 'dense' or 'lanczos', got {self.solver!r}")


def tokencut(
    feats: Tensor, grid: base.Grid, *, exclude: base.Mask = None, **params: Any
) -> TokenCutResult:
    """Discover the main object of one image with TokenCut.

    Args:
        feats: ``[N, D]`` patch features, ``N = h*w`` row-major, [CLS] and registers
            removed (the reference uses the keys of the last attention layer).
        grid: ``(h, w)`` patch grid.
        tau: cosine-similarity threshold for an edge (reference default 0.2).
        eps: weight of non-edges (reference default 1e-5).
        exclude: optional bool ``[N]`` of patches left out of the graph; they are
            never part of the mask, and the connected component cannot cross them.
        solver: eigensolver, see :func:`second_eigenpair`.
        center: subtract the mean feature of the patches in the graph before the cosine
            similarities (not in the reference; it restores a signed graph on DINOv2's
            keys, all mutually similar above ``tau`` otherwise, but the calibrated DINOv2
            default is uncentred queries).

    Returns:
        A :class:`TokenCutResult`.

    Raises:
        ValueError: malformed inputs.
        EmptyGraphError: fewer than 3 patches left, or every pair of remaining
            patches linked / none linked (no cut structure).
    """
    h, w, exclude = base.check_inputs(feats, grid, exclude)
    if not feats.is_floating_point():
        raise ValueError(f"feats must be a float tensor, got {feats.dtype}")
    if not bool(torch.isfinite(feats).all()):
        raise ValueError("feats contains NaN or infinite values")
    p = TokenCutParams.build(params, "tokencut")
    tau, eps, solver, center = float(p.tau), float(p.eps), p.solver, bool(p.center)
    device = feats.device
    if exclude is None:
        kept = torch.arange(h * w, device=device)
    else:
        kept = torch.nonzero(~exclude).reshape(-1)
    n = int(kept.numel())
    if n == 0:
        raise base.EmptyGraphError("tokencut: every patch is excluded")
    if n < 3:
        raise base.EmptyGraphError(f"tokencut: needs at least 3 patches in the graph, got {n}")

    graph_feats = feats[kept]
    if center:
        graph_feats = graph_feats.float() - graph_feats.float().mean(dim=0, keepdim=True)
    edges = _edges(graph_feats, tau)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=device)
    linked = edges & off_diagonal
    if bool(linked.eq(off_diagonal).all()):
        raise base.EmptyGraphError(
            f"tokencut: all {n} patches are mutually similar (cosine > tau={tau}); "
            "the graph has no cut structure"
        )
    if not bool(linked.any()):
        raise base.EmptyGraphError(
            f"tokencut: no two patches are similar (cosine > tau={tau}); "
            "the graph has no cut structure"
        )

    lam, vec = second_eigenpair(_weights(edges, eps), solver=solver)
    if not bool(torch.isfinite(vec).all()) or not np.isfinite(lam):
        raise base.EmptyGraphError("tokencut: the eigensolver returned non-finite values")

    magnitude = vec.abs()
    tol = TIE_RTOL * float(magnitude.max())
    seed_local = int(torch.nonzero(magnitude >= magnitude.max() - tol)[0])
    centred = vec - vec.mean()
    if bool(centred[seed_local] < 0):
        vec, centred = -vec, -centred
    side = centred > tol

    full_vec = torch.zeros(h * w, dtype=torch.float64, device=device)
    full_vec[kept] = vec
    full_side = torch.zeros(h * w, dtype=torch.bool, device=device)
    full_side[kept] = side
    seed = int(kept[seed_local])

    side_np = full_side.reshape(h, w).cpu().numpy()
    labels, _ = scipy.ndimage.label(side_np)
    seed_label = labels[seed // w, seed % w]
    if seed_label == 0:  # cannot happen: the seed is at least |y|max / n above the mean
        raise base.EmptyGraphError("tokencut: the seed fell outside the foreground")
    component = labels == seed_label
    mask = torch.from_numpy(component).to(device)
    return TokenCutResult(
        seed=seed,
        mask=mask,
        box=mask_box(mask),
        score=1.0 - lam,
        eigenvector=full_vec.reshape(h, w),
        bipartition=full_side.reshape(h, w),
        eigenvalue=lam,
    )


base.register(
    base.Method(
        "tokencut",
        tokencut,
        TokenCutParams,
        defaults=base.measured_on_dinov2(features="queries"),
        summary="TokenCut normalized cut (Wang et al., CVPR 2022)",
    )
)
