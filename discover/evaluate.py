"""CorLoc evaluation of a :class:`~discover.pipeline.Discoverer` on a benchmark.

The I/O of an evaluation run lives here (the algorithms stay in :mod:`discover.corloc`
and the methods): ``OUT/boxes.jsonl`` gets one line per image as it is done, and
``OUT/summary.json`` the settings and the score at the end. ``resume`` re-reads
``boxes.jsonl`` and recomputes the score of the images already done from their stored
boxes, so an interrupted run continues where it stopped with the same final number.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from discover.corloc import CorLocAccumulator
from discover.datasets import Dataset, Sample
from discover.outputs import JsonlWriter, read_jsonl, result_record
from discover.pipeline import Discoverer


@dataclass
class EvalRecord:
    """One evaluated image: the output line and whether it was localized."""

    record: dict[str, Any]
    correct: bool
    resumed: bool = False


@dataclass
class EvalRun:
    """An evaluation in progress; iterate :meth:`run` to drive it."""

    dataset: Dataset
    discoverer: Discoverer
    out_dir: Path
    settings: dict[str, Any] = field(default_factory=dict)
    resume: bool = False
    limit: int | None = None
    boxes_name: str = "boxes.jsonl"
    samples: Sequence[Sample] | None = None
    """The samples this process evaluates (default: the dataset, up to ``limit``)."""

    def __post_init__(self) -> None:
        self.acc = CorLocAccumulator()
        self.elapsed = 0.0
        self.processed = 0
        if self.samples is None:
            self.samples = list(self.dataset)[: self.limit] if self.limit else list(self.dataset)

    @property
    def boxes_path(self) -> Path:
        return self.out_dir / self.boxes_name

    def run(self) -> Iterator[EvalRecord]:
        """Evaluate every sample, yielding one :class:`EvalRecord` per image as it is done.

        With ``resume``, images already in ``boxes.jsonl`` are yielded first (``resumed``)
        from their stored boxes, without running the model again.
        """
        self.out_dir.mkdir(parents=True, exist_ok=True)
        by_id = {s.image_id: s for s in self.samples}
        done: dict[str, dict[str, Any]] = {}
        if self.resume and self.boxes_path.exists():
            for rec in read_jsonl(self.boxes_path):
                if rec.get("image") in by_id:
                    done[rec["image"]] = rec
        writer = JsonlWriter(self.boxes_path, resume=self.resume)
        t0 = time.perf_counter()
        try:
            for image_id, rec in done.items():
                yield EvalRecord(rec, self._score(by_id[image_id], rec), resumed=True)
            todo = [s for s in self.samples if s.image_id not in done]
            # Ground-truth failures are recorded without running the model.
            for s in todo:
                if s.error is not None:
                    rec = _failure_record(s, s.error)
                    writer.write(rec)
                    yield EvalRecord(rec, self._score(s, rec))
            runnable = [s for s in todo if s.error is None]
            for s, res in zip(
                runnable, self.discoverer.run([s.path for s in runnable]), strict=True
            ):
                rec = result_record(res, s.image_id)
                writer.write(rec)
                self.processed += 1
                self.elapsed = time.perf_counter() - t0
                yield EvalRecord(rec, self._score(s, rec))
        finally:
            writer.close()
            self.elapsed = time.perf_counter() - t0

    def _score(self, sample: Sample, rec: dict[str, Any]) -> bool:
        boxes = rec.get("boxes") or []
        pred = np.asarray(boxes) if boxes else None
        if pred is not None and np.all(np.mod(pred, 1) == 0):
            pred = pred.astype(np.int64)  # integer boxes: the reference's arithmetic
        return self.acc.add(sample.image_id, pred, sample.boxes, error=rec.get("error"))

    def summary(self, **extra: Any) -> dict[str, Any]:
        """The summary dict written to ``summary.json``."""
        rate = self.processed / self.elapsed if self.elapsed > 0 else None
        return {
            "dataset": self.dataset.name,
            "model": self.settings.get("model", self.discoverer.backbone.name),
            "split_size": len(self.dataset),
            "evaluated": self.acc.total,
            "correct": self.acc.correct,
            "corloc": round(100.0 * self.acc.corloc, 4),
            "object_recall": round(100.0 * self.acc.recall, 4),
            "failures": [list(f) for f in self.acc.failures],
            "settings": self.settings,
            "time_s": round(self.elapsed, 3),
            "images_per_s": None if rate is None else round(rate, 4),
            **extra,
        }

    def write_summary(self, **extra: Any) -> Path:
        path = self.out_dir / "summary.json"
        path.write_text(json.dumps(self.summary(**extra), indent=2) + "\n", encoding="utf-8")
        return path


def _failure_record(sample: Sample, reason: str) -> dict[str, Any]:
    return {
        "image": sample.image_id,
        "width": sample.width,
        "height": sample.height,
        "boxes": [],
        "scores": [],
        "seed": None,
        "error": reason,
    }
