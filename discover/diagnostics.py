"""Diagnostics of the registers effect: token norms, [CLS] attention and LOST's internals.

Darcet et al. (*Vision Transformers Need Registers*, ICLR 2024) show that large ViTs
trained long enough (DINOv2 among them) repurpose a few low-information patch tokens as
global scratch space: those tokens come out of the last blocks with a norm several times
that of the others (the paper's models: above ~150 where ordinary tokens sit below ~100),
they attract the [CLS] attention and they spoil methods built on local features such as
LOST. Adding register tokens moves that role off the patches. This module measures it on
one image at a time; everything here is a pure function on tensors (no I/O).

Outlier detection
-----------------
:func:`find_outliers` takes either a fixed cutoff (the paper's 150 for its models) or
``"auto"``, the data-driven rule of :func:`outlier_threshold`. A fixed cutoff does not
carry over between models: the norm scale depends on the model size, its training and
the layer (facebookresearch/dinov2 issue 373 reports no token above 150 in the released
ViT-g), so the default adapts to each image's own norm distribution.

The automatic threshold is a robust z-score on the *log* of the patch norms with a
ratio floor::

    m     = median(log n)
    sigma = 1.4826 * median(|log n - m|)          (MAD, scaled to a Gaussian's std)
    t     = exp(m + max(k * sigma, log(min_ratio)))   (k = 5, min_ratio = 2 by default)

i.e. a token is an outlier when its norm is both at least ``min_ratio`` times the median
norm and more than ``k`` robust standard deviations above it on a log scale. Logs make
the rule invariant to the norm scale of the model, and the median and MAD ignore the
outliers themselves as long as they are a minority (the paper's are a few percent). The
two terms guard against the two ways a unimodal map could trip a z-score: the ratio floor
covers tight maps whose MAD is tiny (trained ViT-S/14 DINOv2: every token within ~1.4x of
the median), the ``k * sigma`` term covers wide ones (on the sample photos a random-init
network puts its largest tokens at 2-4.4x the median, but the spread is wide too and the
cutoff lands at 3.7-16x). Artifacts several times the median norm, as in the paper's
histograms, pass both on a typical map; when a model's ordinary norms are themselves very
spread out, only tokens far outside the bulk are flagged, and a fixed threshold is the
better tool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from discover.methods.lost import LostResult, lost

__all__ = [
    "AUTO_K",
    "AUTO_MIN_RATIO",
    "AttentionMaps",
    "LostDiagnostics",
    "NormStats",
    "cls_attention_maps",
    "find_outliers",
    "lost_diagnostics",
    "norm_stats",
    "outlier_threshold",
    "resolve_threshold",
]

AUTO_K = 5.0
"""Robust standard deviations (of the log norms) above the median for ``"auto"``."""
AUTO_MIN_RATIO = 2.0
"""``"auto"`` never flags a token whose norm is below this multiple of the median norm."""
_EPS = 1e-12


def outlier_threshold(
    norms: torch.Tensor, *, k: float = AUTO_K, min_ratio: float = AUTO_MIN_RATIO
) -> float:
    """The data-driven norm cutoff above which a token counts as a high-norm outlier.

    Args:
        norms: token norms, any shape (taken as one population, e.g. the ``[h, w]`` patch
            norms of one image; leave the [CLS] and register tokens out).
        k: how many robust standard deviations (``1.4826 * MAD``) of the log norms above
            their median the cutoff lies at least.
        min_ratio: the cutoff is at least this multiple of the median norm (``> 1``).

    Returns:
        ``exp(m + max(k * sigma, log(min_ratio)))`` with ``m`` the median and ``sigma`` the
        scaled MAD of ``log(norms)`` (see the module docstring). Norms are clamped at
        ``1e-12`` before the log. ``inf`` for an empty input.

    Raises:
        ValueError: non-finite norms, a negative ``k`` or ``min_ratio <= 1``.
    """
    if k < 0 or not math.isfinite(k):
        raise ValueError(f"k must be a non-negative number, got {k}")
    if not min_ratio > 1.0 or not math.isfinite(min_ratio):
        raise ValueError(f"min_ratio must be a number > 1, got {min_ratio}")
    x = norms.detach().reshape(-1).double()
    if x.numel() == 0:
        return math.inf
    if not bool(torch.isfinite(x).all()):
        raise ValueError("norms contain NaN or infinite values")
    logs = x.clamp(min=_EPS).log()
    # torch.median returns the lower of the two middle values for an even count; use the
    # usual mean of the two (as numpy does) so the rule does not depend on that choice.
    m = float(logs.quantile(0.5))
    sigma = 1.4826 * float((logs - m).abs().quantile(0.5))
    return math.exp(m + max(k * sigma, math.log(min_ratio)))


def find_outliers(norms: torch.Tensor, threshold: float | str = "auto") -> torch.Tensor:
    """Flag the high-norm tokens.

    Args:
        norms: token norms, any shape.
        threshold: a number (a token is an outlier when its norm is strictly above it,
            e.g. the paper's ``150``), a string holding a number, or ``"auto"`` for
            :func:`outlier_threshold` computed on ``norms`` itself.

    Returns:
        bool tensor of the shape and device of ``norms``.
    """
    return norms > resolve_threshold(norms, threshold)


def resolve_threshold(norms: torch.Tensor, threshold: float | str = "auto") -> float:
    """The numeric cutoff :func:`find_outliers` uses for ``threshold`` on ``norms``."""
    if isinstance(threshold, str):
        text = threshold.strip().lower()
        if text == "auto":
            return outlier_threshold(norms)
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"threshold must be a number or 'auto', got {threshold!r}") from None
    else:
        value = float(threshold)
    if math.isnan(value):
        raise ValueError("threshold must not be NaN")
    return value


# -- token norms ----------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class NormStats:
    """Token norms of one image, split by token kind, and its high-norm outliers.

    Attributes:
        patch_norms: float ``[h, w]``, L2 norm of every output patch token (last block,
            before the final norm).
        cls_norms: float ``[C]`` ([CLS] token(s); ``C`` is 1 for every supported model).
        register_norms: float ``[R]``, the model's registers then the test-time ones;
            empty without registers.
        outliers: bool ``[h, w]``, patches above ``threshold``.
        threshold: the cutoff used (fixed or from :func:`outlier_threshold` on the patch
            norms of this image).
    """

    patch_norms: torch.Tensor
    cls_norms: torch.Tensor
    register_norms: torch.Tensor
    outliers: torch.Tensor
    threshold: float

    @property
    def num_outliers(self) -> int:
        return int(self.outliers.sum())

    @property
    def outlier_fraction(self) -> float:
        """Share of the patch tokens flagged as outliers."""
        n = self.outliers.numel()
        return self.num_outliers / n if n else 0.0

    @property
    def max_norm(self) -> float:
        """Largest patch-token norm."""
        return float(self.patch_norms.max())

    @property
    def median_norm(self) -> float:
        """Median patch-token norm (mean of the two middle values for an even count)."""
        return float(self.patch_norms.double().quantile(0.5))

    @property
    def outlier_positions(self) -> list[tuple[int, int]]:
        """``(row, col)`` of every outlier patch, row-major order."""
        return [(int(r), int(c)) for r, c in torch.nonzero(self.outliers).tolist()]


def _split_check(t: int, num_cls: int, num_registers: int, grid: tuple[int, int]) -> None:
    h, w = (int(v) for v in grid)
    if num_cls < 1 or num_registers < 0 or h < 1 or w < 1:
        raise ValueError(
            f"bad token layout: num_cls={num_cls}, num_registers={num_registers}, grid={grid}"
        )
    if t != num_cls + num_registers + h * w:
        raise ValueError(
            f"{t} tokens, expected {num_cls} [CLS] + {num_registers} registers + "
            f"{h}x{w} patches = {num_cls + num_registers + h * w}"
        )


def norm_stats(
    token_norms: torch.Tensor,
    grid: tuple[int, int],
    *,
    num_cls: int = 1,
    num_registers: int = 0,
    threshold: float | str = "auto",
) -> NormStats:
    """Split one image's token norms into [CLS], registers and the patch map; find outliers.

    Args:
        token_norms: float ``[T]``, one row of :attr:`discover.backbone.Features.token_norms`
            (token order: [CLS], registers, patches row-major).
        grid: ``(h, w)`` patches.
        num_cls: leading [CLS] tokens (``Backbone.num_cls``).
        num_registers: register tokens after them (``Backbone.num_registers``: the model's
            own plus test-time ones).
        threshold: see :func:`find_outliers`; ``"auto"`` is computed on the patch norms
            only, so registers (high-norm by design) never move the cutoff.
    """
    if token_norms.ndim != 1:
        raise ValueError(f"token_norms must be 1-D [T], got shape {tuple(token_norms.shape)}")
    _split_check(token_norms.shape[0], num_cls, num_registers, grid)
    h, w = (int(v) for v in grid)
    n = token_norms.float()
    n_pre = num_cls + num_registers
    patches = n[n_pre:].reshape(h, w)
    cut = resolve_threshold(patches, threshold)
    return NormStats(
        patch_norms=patches,
        cls_norms=n[:num_cls],
        register_norms=n[num_cls:n_pre],
        outliers=patches > cut,
        threshold=cut,
    )


# -- [CLS] attention --------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class AttentionMaps:
    """The [CLS] query's attention of the last block for one image, per head.

    Attributes:
        full: float ``[heads, T]``, the softmax row over every token ([CLS], registers,
            patches), each head summing to 1.
        patches: float ``[heads, h, w]``, the patch columns of ``full`` as they are (with
            the register columns in the softmax: each head sums to ``1 - cls - registers``).
        patches_no_registers: float ``[heads, h, w]``, the patch part after dropping the
            register columns and renormalising over the [CLS] and patch columns, i.e.
            ``full[:, j] / (full[:, cls].sum() + full[:, patches].sum())`` -- the same as a
            softmax of the [CLS] logits restricted to [CLS] and patch keys. Each head sums to
            ``1 - cls_no_registers.sum()``.
        cls: float ``[heads, C]``, attention of [CLS] to the [CLS] token(s) in ``full``.
        cls_no_registers: float ``[heads, C]``, the same after the renormalisation of
            ``patches_no_registers`` (with it, each head sums to 1).
        registers: float ``[heads, R]``, attention to each register in ``full``.
    """

    full: torch.Tensor
    patches: torch.Tensor
    patches_no_registers: torch.Tensor
    cls: torch.Tensor
    cls_no_registers: torch.Tensor
    registers: torch.Tensor

    @property
    def register_mass(self) -> torch.Tensor:
        """float ``[heads]``, the share of each head's attention going to the registers."""
        return self.registers.sum(dim=-1)

    def mean_map(self, *, registers: bool = False, head: int | None = None) -> torch.Tensor:
        """One ``[h, w]`` map: a single ``head`` or the mean over heads.

        ``registers=False`` uses :attr:`patches_no_registers`, ``True`` :attr:`patches`.
        """
        maps = self.patches if registers else self.patches_no_registers
        if head is not None:
            if not -maps.shape[0] <= head < maps.shape[0]:
                raise ValueError(f"head must be in [0, {maps.shape[0]}), got {head}")
            return maps[head]
        return maps.mean(dim=0)


def cls_attention_maps(
    cls_attention: torch.Tensor,
    grid: tuple[int, int],
    *,
    num_cls: int = 1,
    num_registers: int = 0,
) -> AttentionMaps:
    """Split one image's [CLS] attention row into [CLS], register and patch parts.

    Args:
        cls_attention: float ``[heads, T]``, one image of
            :attr:`discover.backbone.Features.cls_attention`, i.e. ``softmax(q_cls k^T /
            sqrt(d))`` of the last block computed from the hooked q/k (timm's fused
            attention kernel never materialises the matrix).
        grid: ``(h, w)`` patches.
        num_cls, num_registers: the token layout (see :func:`norm_stats`).
    """
    if cls_attention.ndim != 2:
        raise ValueError(
            f"cls_attention must be 2-D [heads, T], got shape {tuple(cls_attention.shape)}"
        )
    heads, t = cls_attention.shape
    _split_check(t, num_cls, num_registers, grid)
    h, w = (int(v) for v in grid)
    a = cls_attention.float()
    n_pre = num_cls + num_registers
    cls_part = a[:, :num_cls]
    reg_part = a[:, num_cls:n_pre]
    patch_part = a[:, n_pre:]
    kept = cls_part.sum(dim=1, keepdim=True) + patch_part.sum(dim=1, keepdim=True)
    kept = kept.clamp(min=torch.finfo(a.dtype).tiny)
    return AttentionMaps(
        full=a,
        patches=patch_part.reshape(heads, h, w),
        patches_no_registers=(patch_part / kept).reshape(heads, h, w),
        cls=cls_part,
        cls_no_registers=cls_part / kept,
        registers=reg_part,
    )


# -- LOST internals -------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LostDiagnostics:
    """LOST's seed-expansion intermediates on one image, as maps.

    Attributes:
        degree: float ``[h, w]``, each patch's degree (positive similarities with the other
            patches); the seed is the lowest-degree patch.
        seed: ``(row, col)`` of the seed patch.
        expansion: bool ``[h, w]``, the expanded seed set ``S`` (the seed's positively
            correlated patches among the ``k_patches`` lowest-degree ones).
        mask: bool ``[h, w]``, the 4-connected component of the seed in ``M > 0``.
        box: ``(x0, y0, x1, y1)`` in patches, end exclusive.
        result: the full :class:`discover.methods.lost.LostResult`.
    """

    degree: torch.Tensor
    seed: tuple[int, int]
    expansion: torch.Tensor
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    result: LostResult


def lost_diagnostics(feats: torch.Tensor, grid: tuple[int, int], **params) -> LostDiagnostics:
    """Run :func:`discover.methods.lost.lost` on ``[N, D]`` patch features and keep its internals.

    ``params`` go to :func:`discover.methods.lost.lost` (``k_patches``, ``gram_bias``, ``center``,
    ``exclude``). Raises what it raises (``EmptyGraphError`` on a degenerate graph).
    """
    res = lost(feats, grid, **params)
    h, w = (int(v) for v in grid)
    expansion = torch.zeros(h * w, dtype=torch.bool, device=res.scores.device)
    expansion[res.similars] = True
    return LostDiagnostics(
        degree=res.scores.reshape(h, w),
        seed=(res.seed // w, res.seed % w),
        expansion=expansion.reshape(h, w),
        mask=res.mask,
        box=res.box,
        result=res,
    )
