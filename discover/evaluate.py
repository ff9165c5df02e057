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

from discover.corloc import CorLocAccumulator, predictions
from discover.datasets import Dataset, Sample
from discover.errors import RegdiscoverError
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
        writer = JsonlWriter(
            self.boxes_path, resume=self.resume, settings=self.discoverer.settings()
        )
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

    def score_merged(self, samples: Sequence[Sample], reports: list[dict[str, Any]]) -> None:
        """Score the whole evaluation (``samples``) from the merged ``boxes.jsonl``.

        After a distributed run, rank 0 calls this with every rank's report: the CorLoc
        becomes that of the union of the shards, computed exactly as a resumed
        single-process run would, and each rank's own counts must agree with it.
        ``processed`` and ``elapsed`` become the union's (all ranks, the slowest one).

        Raises:
            RegdiscoverError: an image of the evaluation is in no output, or a rank
                scored an image differently from the merged boxes.
        """
        everything = list(samples)
        self.boxes_name = "boxes.jsonl"  # the merged output, no longer this rank's part
        have = {r.get("image") for r in read_jsonl(self.boxes_path)}
        absent = [s.image_id for s in everything if s.image_id not in have]
        if absent:
            raise RegdiscoverError(
                f"{len(absent)} image(s) of the evaluation are in no output (e.g. "
                f"{', '.join(absent[:3])}): run the same command again with --resume"
            )
        union = EvalRun(
            self.dataset,
            self.discoverer,
            self.out_dir,
            settings=self.settings,
            resume=True,
            samples=everything,
        )
        for _ in union.run():  # every image is stored: this only scores them
            pass
        merged = union.acc.localized
        for rep in reports:
            if "acc" not in rep:
                continue
            theirs = CorLocAccumulator.from_dict(rep["acc"]).localized
            wrong = [k for k, v in theirs.items() if merged.get(k) != v]
            if wrong:
                raise RegdiscoverError(
                    f"rank {rep['rank']} scored {len(wrong)} image(s) differently from "
                    f"the merged boxes (e.g. {wrong[0]}); is the output folder shared?"
                )
        self.acc = union.acc
        if len(reports) > 1:
            self.processed = sum(int(r["processed"]) for r in reports)
            self.elapsed = max(float(r["elapsed"]) for r in reports)
            self.settings = {**self.settings, "world_size": len(reports)}

    def report(self) -> dict[str, Any]:
        """What this process tells rank 0 at the merge (its counts and timing)."""
        return {"acc": self.acc.to_dict(), "processed": self.processed, "elapsed": self.elapsed}

    def _score(self, sample: Sample, rec: dict[str, Any]) -> bool:
        pred = predictions(rec.get("boxes"))
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
