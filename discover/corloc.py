"""The CorLoc protocol of LOST / TokenCut (pure, no I/O).

CorLoc is the fraction of evaluated images whose predicted box overlaps at least one
ground-truth box with IoU >= 0.5. The IoU is LOST's own formula (with its ``1e-7``
stabilisers and torch type promotion), provided by :func:`discover.boxes.box_iou`, so a
borderline IoU is decided exactly as in the reference.

Counting rules (as in LOST's evaluation loop):

- every image passed to :meth:`CorLocAccumulator.add` is counted in the denominator;
  images that the protocol skips (``no_hard`` images without any box left) must simply
  not be added, which :mod:`discover.datasets` already does;
- an image without any ground-truth box (e.g. a COCO image whose only annotations are
  crowd boxes) counts as not localized. LOST itself would fail on such an image; none
  occurs in the COCO20k list;
- an image that could not be processed (unreadable annotation or image, method error)
  counts as evaluated and not localized, and is listed in ``failures``;
- when several boxes are predicted for an image, CorLoc uses the first one only (the
  top-scoring box); all of them count for the object-level recall.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from discover.boxes import box_iou

__all__ = ["CorLocAccumulator", "is_correct", "predictions"]

BoxLike = Sequence[float] | np.ndarray | torch.Tensor


def _as_boxes(boxes: Any) -> np.ndarray | torch.Tensor:
    """``None`` / one box ``[4]`` / boxes ``[K, 4]`` -> a ``[K, 4]`` array or tensor.

    The dtype is left as given (ints stay ints) so that :func:`box_iou` promotes exactly
    like the reference.
    """
    if boxes is None:
        return np.zeros((0, 4), dtype=np.int64)
    arr = boxes if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    if arr.ndim == 1 and arr.shape[0] == 4:
        return arr.reshape(1, 4)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"boxes must be [4] or [K, 4], got shape {tuple(arr.shape)}")
    return arr


def _hits(pred_box: Any, gt: np.ndarray | torch.Tensor, threshold: float) -> torch.Tensor:
    """bool ``[M]``: which ground-truth boxes ``pred_box`` overlaps with IoU >= threshold."""
    if len(gt) == 0:
        return torch.zeros(0, dtype=torch.bool)
    return (box_iou(pred_box, gt) >= threshold).cpu()


def predictions(boxes: Sequence[Sequence[float]] | None) -> np.ndarray | None:
    """Predicted boxes as stored in an output record, ready for :func:`is_correct`:
    ``None`` for no box; int64 when every coordinate is a whole number (the reference's
    integer arithmetic), float64 otherwise."""
    if not boxes:
        return None
    pred = np.asarray(boxes)
    if np.all(np.mod(pred, 1) == 0):
        return pred.astype(np.int64)
    return pred.astype(np.float64)


def is_correct(pred_box: BoxLike, gt_boxes: Any, threshold: float = 0.5) -> bool:
    """Whether ``pred_box`` localizes the image: IoU >= ``threshold`` with ANY gt box.

    Args:
        pred_box: ``(x0, y0, x1, y1)`` in pixels, end exclusive.
        gt_boxes: ``[M, 4]`` ground-truth boxes (or one box ``[4]``); ``M == 0`` gives False.
        threshold: IoU threshold (0.5 in the benchmarks; the comparison is ``>=``).
    """
    gt = _as_boxes(gt_boxes)
    return bool(_hits(pred_box, gt, threshold).any())


class CorLocAccumulator:
    """Counts CorLoc (and object-level recall) over images, mergeable across shards.

    Attributes:
        threshold: IoU threshold used for both CorLoc and recall.
        failures: ``(image_id, reason)`` of the images that could not be evaluated
            (an ``error`` was given) or for which no box was predicted; all of them are
            counted as not localized.
        gt_total: ground-truth boxes seen; ``gt_hit``: those hit by any predicted box.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = float(threshold)
        self._localized: dict[str, bool] = {}
        self.failures: list[tuple[str, str]] = []
        self.gt_total = 0
        self.gt_hit = 0

    # ------------------------------------------------------------------ counting

    def add(
        self,
        image_id: str,
        pred_boxes: Any,
        gt_boxes: Any,
        error: str | None = None,
    ) -> bool:
        """Record one evaluated image; returns whether it is localized.

        Args:
            image_id: unique id of the image (adding the same id twice is an error).
            pred_boxes: the predicted box ``[4]``, or boxes ``[K, 4]`` best first, or
                ``None`` / empty when the method gave nothing.
            gt_boxes: ground-truth boxes ``[M, 4]`` (after the dataset's conventions).
            error: why the image could not be processed; it is then counted as not
                localized whatever ``pred_boxes`` holds.

        Raises:
            ValueError: ``image_id`` was already added, or a box array has a bad shape.
        """
        image_id = str(image_id)
        if image_id in self._localized:
            raise ValueError(f"image {image_id!r} was already added")
        gt = _as_boxes(gt_boxes)
        preds = _as_boxes(None if error is not None else pred_boxes)

        if error is not None:
            self.failures.append((image_id, str(error)))
        elif len(preds) == 0:
            self.failures.append((image_id, "no box predicted"))

        hit = torch.zeros(len(gt), dtype=torch.bool)
        localized = False
        for k in range(len(preds)):
            hits_k = _hits(preds[k], gt, self.threshold)
            if k == 0:
                localized = bool(hits_k.any())  # CorLoc: the top box only
            hit |= hits_k

        self._localized[image_id] = localized
        self.gt_total += len(gt)
        self.gt_hit += int(hit.sum())
        return localized

    # ------------------------------------------------------------------ results

    @property
    def total(self) -> int:
        """Images evaluated (the CorLoc denominator)."""
        return len(self._localized)

    @property
    def correct(self) -> int:
        """Images localized by their first predicted box."""
        return sum(self._localized.values())

    @property
    def corloc(self) -> float:
        """``correct / total`` in 0..1 (0.0 when nothing was added)."""
        return self.correct / self.total if self.total else 0.0

    @property
    def recall(self) -> float:
        """Object-level recall: ``gt_hit / gt_total`` (0.0 without any ground-truth box)."""
        return self.gt_hit / self.gt_total if self.gt_total else 0.0

    @property
    def localized(self) -> dict[str, bool]:
        """Per-image outcome, in the order the images were added (a copy)."""
        return dict(self._localized)

    def __len__(self) -> int:
        return self.total

    def __repr__(self) -> str:
        return (
            f"CorLocAccumulator(corloc={self.corloc:.4f} ({self.correct}/{self.total}), "
            f"recall={self.recall:.4f} ({self.gt_hit}/{self.gt_total}), "
            f"failures={len(self.failures)})"
        )

    # ------------------------------------------------------------------ shards

    def merge(self, other: CorLocAccumulator) -> CorLocAccumulator:
        """Add the counts of ``other`` (another shard) into this accumulator; returns self.

        Raises:
            ValueError: different thresholds, or an image present in both.
        """
        if other.threshold != self.threshold:
            raise ValueError(
                f"cannot merge accumulators with thresholds {self.threshold} and {other.threshold}"
            )
        common = self._localized.keys() & other._localized.keys()
        if common:
            some = ", ".join(sorted(common)[:5])
            raise ValueError(f"{len(common)} image(s) counted in both shards, e.g. {some}")
        self._localized.update(other._localized)
        self.failures.extend(other.failures)
        self.gt_total += other.gt_total
        self.gt_hit += other.gt_hit
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready state (summary numbers included, for reports)."""
        return {
            "threshold": self.threshold,
            "corloc": self.corloc,
            "correct": self.correct,
            "total": self.total,
            "recall": self.recall,
            "gt_hit": self.gt_hit,
            "gt_total": self.gt_total,
            "failures": [[i, r] for i, r in self.failures],
            "localized": dict(self._localized),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CorLocAccumulator:
        """Rebuild an accumulator from :meth:`to_dict` output (summary fields are checked).

        Raises:
            ValueError: the summary numbers do not match the per-image records.
        """
        acc = cls(threshold=float(data["threshold"]))
        acc._localized = {str(k): bool(v) for k, v in data["localized"].items()}
        acc.failures = [(str(i), str(r)) for i, r in data.get("failures", [])]
        acc.gt_total = int(data["gt_total"])
        acc.gt_hit = int(data["gt_hit"])
        if not 0 <= acc.gt_hit <= acc.gt_total:
            raise ValueError(f"inconsistent recall counts {acc.gt_hit}/{acc.gt_total}")
        for key, value in (("total", acc.total), ("correct", acc.correct)):
            if key in data and int(data[key]) != value:
                raise ValueError(f"{key}={data[key]} does not match the per-image records")
        return acc
