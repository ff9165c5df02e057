"""Runs: box a list of images into an output, or evaluate on a benchmark.

What ``discover boxes``, ``discover eval``, ``scripts/eval_voc.py`` and
``scripts/bench.py`` share, so that each is a thin shell: options are checked before any
work, the model is loaded before the output is touched, ``--resume`` matches images by
their resolved paths and refuses other settings, parts of a ``torchrun`` run are merged,
``--viz`` pictures are drawn, and Ctrl-C ends the run with everything finished kept.

Every option defaults to ``None`` here, meaning "the library's default": the
:class:`~discover.pipeline.Discoverer` and the method's calibrated defaults decide. The
caller reports progress through an :class:`Events` object (the CLI draws a rich
progress bar with it).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from discover.errors import RegdiscoverError, UsageError, first_line
from discover.events import Events, Tally
from discover.images import iter_image_paths
from discover.methods import get_method
from discover.methods.base import default_method
from discover.models import DEFAULT_MODEL, spec_for
from discover.outputs import (
    FORMATS,
    VIZ_INDEX,
    OutputError,
    check_folder_target,
    open_writer,
    result_record,
    settings_path,
    unique_stem,
)

__all__ = [
    "BoxesSummary",
    "EvalSummary",
    "Events",
    "UsageError",
    "box_images",
    "build_discoverer",
    "evaluate",
    "method_params",
]

BOX_DEFAULTS: dict[str, Any] = {}
"""Defaults of ``discover boxes`` that differ from the Discoverer's (none: the
Discoverer's are the calibrated ones, input size included)."""
EVAL_DEFAULTS: dict[str, Any] = {"max_size": None}
"""``discover eval`` keeps the benchmark protocol: images at their native size."""


# -- options ----------------------------------------------------------------------------------
def method_params(
    model: str | None,
    method: str | None,
    named: Mapping[str, Any] | None = None,
    pairs: Sequence[str] = (),
) -> dict[str, Any]:
    """The method parameters the user gave, converted and checked one by one.

    Args:
        model: the model name (its family picks the default method).
        method: the method name, or ``None`` for the family's default.
        named: ``{param: value}`` from named options (``--k-patches``...); ``None`` values
            are dropped (not given), text values are converted by the method's
            :class:`~discover.methods.base.Params`.
        pairs: ``KEY=VALUE`` strings (``--param``).

    Raises:
        UsageError: an unknown method or parameter, or a bad value (naming the option).
    """
    name = method or default_method(spec_for(model or DEFAULT_MODEL).family)
    try:
        m = get_method(name)
    except ValueError as e:
        raise UsageError(str(e)) from None
    out: dict[str, Any] = {}
    given: list[tuple[str, str, Any]] = [
        (f"--{k.replace('_', '-')}", k, v) for k, v in (named or {}).items() if v is not None
    ]
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--param must look like KEY=VALUE, got {pair!r}")
        given.append((f"--param {key.strip()}", key.strip(), text))
    for label, key, value in given:
        if isinstance(value, str) and value.strip().lower() == "auto":
            continue  # the calibrated default
        try:
            if key not in m.params.names():
                raise ValueError(
                    f"{m.name} has no parameter {key!r} (its parameters: "
                    f"{', '.join(m.params.names()) or 'none'})"
                )
            if isinstance(value, str):
                value = m.params.parse(key, value)
            m.params.build({key: value}, m.name)  # check this value alone
        except ValueError as e:
            raise UsageError(f"{label}: {e}") from None
        out[key] = value
    return out


METHOD_OPTIONS = ("k_patches", "gram_bias", "center", "tau")
"""The method parameters that have an option of their own (``--k-patches``...)."""


def command_options(opts: dict[str, Any]) -> dict[str, Any]:
    """The options of ``discover boxes`` / ``eval`` as the run functions take them: the
    method parameters (named options and ``--param KEY=VALUE``) checked against the
    method and gathered in ``method_params`` (``--max-size 0``, the native size, is kept
    as 0: ``None`` would mean the command's default size)."""
    opts = dict(opts)
    named = {k: opts.pop(k, None) for k in METHOD_OPTIONS}
    if named["center"] is not None:
        named["center"] = "true" if named["center"] else "false"
    pairs = opts.pop("param", None) or []
    opts["method_params"] = method_params(opts.get("model"), opts.get("method"), named, pairs)
    return opts  # max_size 0 stays 0: the native size, explicitly (None: the default)


def build_discoverer(options: Mapping[str, Any], defaults: Mapping[str, Any] | None = None):
    """A :class:`~discover.pipeline.Discoverer` from options where ``None`` = default.

    ``options`` holds Discoverer keywords (``model``, ``checkpoint``, ``method``,
    ``device``...) plus ``method_params`` (a dict) and ``threads``; ``defaults`` fills
    the options left ``None`` (the command's own defaults). A bad value is a
    :class:`UsageError`; weights that cannot be loaded raise their own error.
    """
    from discover.pipeline import Discoverer

    opts = {**(defaults or {}), **{k: v for k, v in options.items() if v is not None}}
    threads = opts.pop("threads", None)
    params = dict(opts.pop("method_params", None) or {})
    if threads is not None:
        if int(threads) < 1:
            raise UsageError(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(int(threads))
    if opts.get("checkpoint") is not None:
        opts["checkpoint"] = str(opts["checkpoint"])
    try:
        return Discoverer(**opts, **params)
    except ValueError as e:  # a bad option value (features, device, k-patches...)
        raise UsageError(str(e)) from None


def check_options(options: Mapping[str, Any]) -> None:
    """The cheap checks of the Discoverer options, before any path is read or model
    loaded: a bad device, precision, feature kind or size is one line, at once."""
    from discover.backbone import check_feature_kind, resolve_device, resolve_precision

    try:
        device = resolve_device(options.get("device") or "cpu")
        if options.get("precision") is not None:
            with warnings.catch_warnings():  # the Backbone tells what it falls back to
                warnings.simplefilter("ignore")
                resolve_precision(options["precision"], device)
        if options.get("features") is not None:
            check_feature_kind(options["features"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    for key, low in (("threads", 1), ("num_workers", 0), ("batch_size", 1), ("max_objects", 1),
                     ("max_patches", 0)):  # fmt: skip
        value = options.get(key)
        if value is not None and int(value) < low:
            flag = "--workers" if key == "num_workers" else f"--{key.replace('_', '-')}"
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    score = options.get("min_score")
    if score is not None and math.isnan(float(score)):
        raise UsageError("--min-score must be a number, got nan")
    size = options.get("max_size")
    patch = spec_for(options.get("model") or DEFAULT_MODEL).patch_size or 1
    if size is not None and size != 0 and size < patch:
        raise UsageError(f"--max-size {size} is smaller than one {patch}-pixel patch of the model")


# -- boxing -----------------------------------------------------------------------------------
@dataclass(kw_only=True)
class BoxesSummary(Tally):
    """What a :func:`box_images` run did (``images``: processed in this run, not counting
    those resumed)."""

    output: Path
    skipped: int = 0
    """Images already in the output (``--resume``)."""
    interrupted: bool = False
    is_main: bool = True
    results: list[dict[str, Any]] = field(default_factory=list)
    """The records of this run when it boxed a single image (for the CLI to print)."""
    report: Any = None
    """The :class:`~discover.report.ReportSummary` when a report was asked for."""

    @property
    def rate(self) -> float:
        return self.images / self.elapsed if self.elapsed > 0 else 0.0

    def message(self) -> str:
        """The run in one line (the CLI's summary)."""
        return (
            f"{self.images} images, {self.boxes} boxes, {self.failures} failures in "
            f"{self.elapsed:.1f} s ({self.rate:.2f} img/s) -> {self.output}"
        )


def box_images(
    paths: Iterable[str | os.PathLike[str]],
    *,
    out: str | os.PathLike[str] | None = None,
    fmt: str = "jsonl",
    recursive: bool = False,
    resume: bool = False,
    allow_settings_change: bool = False,
    viz: str | os.PathLike[str] | None = None,
    report: str | os.PathLike[str] | None = None,
    events: Events | None = None,
    discoverer: Any = None,
    **options: Any,
) -> BoxesSummary:
    """Discover objects in image files and folders and write their boxes.

    Args:
        paths: image files or folders (``recursive`` descends into sub-folders).
        out: the output file (a folder for ``voc``); default ``results.<fmt>``.
        fmt: ``jsonl``, ``coco``, ``csv`` or ``voc``.
        resume: skip the images already in the output (matched by resolved path) and
            append; refused when the output was written with other settings unless
            ``allow_settings_change``.
        viz: write one PNG per image with its boxes into this folder.
        report: write the HTML report of the whole output into this folder at the end
            (:func:`discover.report.write_report`; not after an interruption).
        events: progress callbacks.
        discoverer: an already built Discoverer (then the model options are ignored).
        **options: Discoverer options (``None`` = default), ``method_params`` and
            ``threads``.

    Returns:
        A :class:`BoxesSummary`; an interrupted run (Ctrl-C) returns with
        ``interrupted`` set and every finished image in the output.

    Raises:
        UsageError: bad options or paths, an output that cannot be written or resumed.
        WeightsError: the model cannot be loaded.
    """
    from discover.distributed import DistContext

    events = events or Events()
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if out is not None and os.fspath(out) == "-":
        raise UsageError("--out -: writing to standard output is not supported; give a file")
    if discoverer is None:
        check_options(options)
    try:
        files = iter_image_paths(paths, recursive=recursive)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if not files:
        where = ", ".join(str(p) for p in paths)
        raise UsageError(f"no images found in {where} (extensions: jpg, png, bmp, tif, webp)")
    default_out = "results" if fmt == "voc" else f"results.{fmt}"
    out_path = Path(out) if out is not None else Path(default_out)
    viz_dir = Path(viz) if viz is not None else None
    if viz_dir is not None:  # checked now, created with its first picture
        try:
            check_folder_target(viz_dir)
        except (OSError, OutputError) as e:
            raise UsageError(f"cannot create the --viz folder {viz_dir}: {_reason(e)}") from None
    if report is not None:
        from discover.report import check_report_dir

        check_report_dir(report)
    dist = DistContext.from_env(options.get("device") or "cpu")
    part = dist.part_path(out_path)
    try:  # checks the target now; creates or truncates nothing before the first record
        writer = open_writer(part, fmt, resume=resume)
    except (OSError, OutputError) as e:
        raise UsageError(f"cannot write output {part}: {_reason(e)}") from None
    if discoverer is None:  # a model that cannot load leaves the output alone
        discoverer = build_discoverer({**options, "keep_images": viz_dir is not None}, BOX_DEFAULTS)
    else:
        discoverer.keep_images = discoverer.keep_images or viz_dir is not None
    settings = discoverer.settings()
    writer.settings = settings
    if viz_dir is not None:  # for the report: which picture belongs to which image
        writer.sidecar_extra["viz"] = str(viz_dir.resolve())
    done_elsewhere = dist.prepare_output(out_path, fmt, resume=resume)
    summary = BoxesSummary(output=out_path if dist.is_main else part, is_main=dist.is_main)
    with writer:
        if resume:
            _check_resumed_settings(writer, part, fmt, settings, allow_settings_change, events)
        base = writer.base_cwd  # where the output's relative names start from
        done = {_resolved(name, base) for name in writer.done | done_elsewhere}
        names: dict[str, Path] = {}
        for f in files:  # one entry per file, however it was named
            names.setdefault(_resolved(f.as_posix(), os.getcwd()), f)
        todo = dist.shard(
            [f for k, f in names.items() if k not in done], key=lambda f: f.as_posix()
        )
        summary.skipped = len(files) - len(todo) if dist.world_size == 1 else 0
        if resume and dist.world_size == 1:
            corrupt = f", {writer.corrupt} unreadable line(s) skipped" if writer.corrupt else ""
            events.info(f"resume: {summary.skipped} done, {len(todo)} to go in {part}{corrupt}")
        viz_stems: dict[str, str] = {}
        t0 = time.perf_counter()
        events.start(len(todo), "boxing")
        try:
            for res in discoverer.run(todo):
                name, typed = _output_name(res.path, base), Path(res.path).as_posix()
                record = result_record(res, name)
                writer.write(record)
                summary.images += 1
                summary.boxes += len(res.detections)
                if len(files) == 1:
                    summary.results.append(record)
                if res.error:
                    summary.failures += 1
                    events.warn(f"{typed}: {res.error}")
                elif viz_dir is not None:
                    try:
                        _save_viz(viz_dir, name, res, viz_stems)
                    except OSError as e:
                        events.warn(f"{typed}: no --viz image: {_reason(e)}")
                events.advance(f"{summary.boxes} boxes, {summary.failures} failed")
        except KeyboardInterrupt:
            summary.interrupted = True
        summary.elapsed = time.perf_counter() - t0
    dist.merge_outputs(out_path, fmt)
    if report is not None and dist.is_main and not summary.interrupted:
        from discover.report import write_report

        summary.report = write_report(out_path, fmt=fmt, out=report, events=events)
    return summary


def _save_viz(folder: Path, name: str, res: Any, stems: dict[str, str]) -> None:
    from discover.viz import draw_result, save_png

    stem = unique_stem(name, stems)  # a.jpg and a.png must not share a.png
    save_png(folder / f"{stem}.png", draw_result(res.extras["image"], res))
    with open(folder / VIZ_INDEX, "a", encoding="utf-8") as f:
        f.write(json.dumps({"image": name, "png": f"{stem}.png"}) + "\n")


def _resolved(name: str, base: str) -> str:
    """The absolute form of an image name written relative to ``base``, its folders free of
    symbolic links and ``..``: the key that matches an image however it was typed. The
    file's own name is kept, so two links to one file stay two images."""
    p = Path(base, name)  # an absolute name ignores base
    return os.path.join(os.path.realpath(p.parent), p.name)


def _output_name(path: str, base: str) -> str:
    """How image ``path`` (as typed, relative to the current directory) is named in an
    output whose relative names start from ``base``: as typed when ``base`` is the
    current directory or the path is absolute, else relative to ``base``, so that every
    name of one output starts from the same place."""
    p = Path(path)
    if p.is_absolute() or os.path.realpath(base) == os.path.realpath(os.getcwd()):
        return p.as_posix()
    try:
        return Path(os.path.relpath(os.path.abspath(p), base)).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return Path(os.path.abspath(p)).as_posix()


def _check_resumed_settings(
    writer: Any,
    part: Path,
    fmt: str,
    settings: dict[str, Any],
    allow: bool,
    events: Events,
) -> None:
    if not writer.done:
        return
    prev = writer.previous_settings
    if prev is None:
        events.warn(
            f"resume: {part} records no settings ({settings_path(part, fmt).name} is "
            "missing): cannot check that they match this run's"
        )
        return
    old = _canonical(prev.get("settings"))
    new = _canonical(settings)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if not changed or allow:
        if changed:
            events.warn(f"resume: settings changed ({', '.join(changed)}); mixing them as asked")
        return
    diff = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
    raise UsageError(
        f"--resume: {part} was written with other settings ({diff}); pass "
        "--allow-settings-change to mix them, or write to another --out"
    )


def _canonical(settings: Any) -> dict[str, Any]:
    return json.loads(json.dumps(settings or {}, sort_keys=True, default=str))


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return first_line(e)


# -- evaluation -------------------------------------------------------------------------------
@dataclass
class EvalSummary:
    """What an :func:`evaluate` run did (``run`` is the :class:`~discover.evaluate.EvalRun`)."""

    run: Any
    dataset: str
    interrupted: bool = False
    is_main: bool = True
    summary_path: Path | None = None
    box_issues: int = 0
    """Ground-truth boxes inverted or outside their image (kept; see ``summary.json``)."""

    def message(self) -> str:
        """The evaluation in one line (the CLI's summary)."""
        acc = self.run.acc
        if self.interrupted:
            return f"{acc.total} images kept in {self.run.boxes_path}"
        flagged = f", {self.box_issues} ground-truth boxes flagged" if self.box_issues else ""
        return (
            f"{self.dataset}: CorLoc {100 * acc.corloc:.2f} ({acc.correct}/{acc.total}), "
            f"object recall {100 * acc.recall:.2f}, {len(acc.failures)} failures{flagged}, "
            f"{self.run.elapsed:.1f} s -> {self.summary_path}"
        )


def evaluate(
    dataset: str,
    root: str | os.PathLike[str],
    *,
    out_dir: str | os.PathLike[str] = "out/eval",
    split: str = "trainval",
    coco_list: str | os.PathLike[str] | None = None,
    ann_file: str | os.PathLike[str] | None = None,
    no_hard: bool = False,
    limit: int | None = None,
    resume: bool = False,
    allow_settings_change: bool = False,
    events: Events | None = None,
    discoverer: Any = None,
    on_record: Callable[[Any], None] | None = None,
    **options: Any,
) -> EvalSummary:
    """CorLoc of single-object discovery on a benchmark (VOC07, VOC12, COCO20k, or any
    VOC-layout tree such as the development set), written to ``out_dir``.

    ``out_dir/boxes.jsonl`` gets one line per image as it goes and ``summary.json`` the
    settings and the score. Images run at their native size unless ``max_size`` is
    given (the benchmark protocol). See :func:`box_images` for ``options``.

    Raises:
        UsageError: bad options or an unusable dataset.
    """
    from discover.datasets import load_dataset
    from discover.distributed import DistContext
    from discover.evaluate import EvalRun

    events = events or Events()
    if discoverer is None:
        check_options(options)
    try:
        ds = load_dataset(
            dataset, root, coco_list=coco_list, no_hard=no_hard, ann_file=ann_file, split=split
        )
    except ValueError as e:  # unknown dataset name, --no-hard with coco20k
        raise UsageError(str(e)) from None
    if len(ds) == 0:
        raise UsageError(f"{dataset} at {root} has no image to evaluate")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"cannot create output folder {out}: it is a file")
    if discoverer is None:
        discoverer = build_discoverer(options, EVAL_DEFAULTS)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {_reason(e)}") from None
    dist = DistContext.from_env(options.get("device") or "cpu")
    settings = {
        **discoverer.settings(),
        "dataset": dataset,
        "split": split,
        "no_hard": no_hard,
        "limit": limit,
        "batch_size": discoverer.batch_size,
        "device": str(discoverer.backbone.device),
    }
    samples = list(ds)[:limit] if limit is not None else list(ds)
    boxes = out / "boxes.jsonl"
    done = dist.prepare_output(boxes, "jsonl", resume=resume)
    if resume and dist.world_size == 1:
        from discover.outputs import JsonlWriter

        _check_resumed_settings(
            JsonlWriter(boxes, resume=True),
            boxes,
            "jsonl",
            discoverer.settings(),
            allow_settings_change,
            events,
        )
    run = EvalRun(
        ds,
        discoverer,
        out,
        settings=settings,
        resume=resume,
        samples=dist.shard(samples, key=lambda s: s.image_id, done=done),
        boxes_name=dist.part_path(Path("boxes.jsonl")).name,
    )
    issues = ds.box_issues
    result = EvalSummary(run, ds.name, is_main=dist.is_main, box_issues=len(issues))
    if issues and dist.is_main:
        images = len({image_id for image_id, _ in issues})
        events.warn(
            f"{len(issues)} ground-truth box(es) in {images} image(s) are inverted or reach "
            f"outside their image, kept as LOST keeps them (listed in summary.json); "
            f"the first: {issues[0][0]}: {issues[0][1]}"
        )
    paths = {s.image_id: s.path for s in ds}
    events.start(len(run.samples), f"{ds.name} {discoverer.method.name}")
    records = run.run()
    try:
        for rec in records:
            if rec.record.get("error") and not rec.resumed:
                error, where = rec.record["error"], str(paths.get(rec.record["image"], ""))
                file = f" ({where})" if where and where not in error else ""
                events.warn(f"{rec.record['image']}: {error}{file}")
            if on_record is not None:
                on_record(rec)
            acc = run.acc
            events.advance(f"CorLoc {100 * acc.corloc:.2f} ({acc.correct}/{acc.total})")
    except KeyboardInterrupt:
        records.close()  # flushes and closes boxes.jsonl
        result.interrupted = True
        return result
    reports = dist.merge_outputs(boxes, "jsonl", run.report())
    if reports is not None:
        run.score_merged(samples, reports)
    if dist.is_main:
        result.summary_path = run.write_summary(ground_truth_issues=[list(i) for i in issues])
    return result


# -- inspection and register neurons ------------------------------------------------------------
@dataclass
class InspectSummary:
    images: int
    rows: list[dict[str, Any]]
    """One summary row per model (:func:`discover.inspection.summarize`)."""


def load_backbone(
    model: str | None,
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    device: str | None = None,
    max_size: int | None = None,
    test_time_registers: str | None = None,
):
    """A :class:`~discover.backbone.Backbone` (with test-time registers when asked);
    a bad option value is a :class:`UsageError`."""
    from discover.backbone import Backbone

    try:
        bb = Backbone(
            model or DEFAULT_MODEL,
            checkpoint=None if checkpoint is None else str(checkpoint),
            device=device or "cpu",
            max_size=max_size or None,
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    if test_time_registers is not None:
        from discover.registers import attach_test_time_registers

        attach_test_time_registers(bb, test_time_registers)
    return bb


def _image_files(paths: Iterable[str | os.PathLike[str]], recursive: bool) -> list[Path]:
    try:
        files = iter_image_paths(paths, recursive=recursive)
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    if not files:
        raise UsageError(f"no images found in {', '.join(str(p) for p in paths)}")
    return files


def _threshold(text: str, extra: tuple[str, ...] = ()) -> float | str:
    if text == "auto" or text.startswith(extra):
        return text
    try:
        return float(text)
    except ValueError:
        kinds = ", ".join(["a number", "'auto'", *(f"'{e}Q'" for e in extra)])
        raise UsageError(f"--threshold must be {kinds}, got {text!r}") from None


def inspect_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    out_dir: str | os.PathLike[str] = "out/inspect",
    model: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    compare: str | None = None,
    compare_checkpoint: str | os.PathLike[str] | None = None,
    test_time_registers: str | None = None,
    threshold: str = "auto",
    max_size: int | None = None,
    device: str | None = None,
    recursive: bool = False,
    events: Events | None = None,
) -> InspectSummary:
    """``discover inspect``: figures and ``norms.csv`` per image (see
    :func:`discover.inspection.inspect_images`); with ``test_time_registers`` and no
    ``compare``, the model without them is shown beside it."""
    from discover.inspection import inspect_images, summarize

    events = events or Events()
    check_options({"model": model, "device": device, "max_size": max_size})
    thr = _threshold(threshold)
    files = _image_files(paths, recursive)
    name = model or DEFAULT_MODEL
    common = {"device": device, "max_size": max_size}
    backbones = [
        (
            name + (" + test-time registers" if test_time_registers else ""),
            load_backbone(name, checkpoint, test_time_registers=test_time_registers, **common),
        )
    ]
    if compare is not None:
        backbones.append((compare, load_backbone(compare, compare_checkpoint, **common)))
    elif test_time_registers is not None:
        backbones.insert(0, (name, load_backbone(name, checkpoint, **common)))
    for label, bb in backbones:
        if bb.num_cls == 0:
            raise UsageError(
                f"inspect draws the [CLS] attention, and {label} has no [CLS] token "
                "(a global-average-pool model)"
            )
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {out}: {_reason(e)}") from None
    events.start(len(files), "inspecting")

    def progress(done: int, total: int, rows: list[dict]) -> None:
        for r in rows:
            if r.get("error"):
                events.warn(f"{r['image']}: {r['error']}")
        events.advance("")

    try:
        rows = inspect_images(
            [str(f) for f in files], backbones, out, threshold=thr, progress=progress,
            max_side=2 * max_size if max_size else None,
        )  # fmt: skip
    finally:
        for _, bb in backbones:
            bb.close()
    return InspectSummary(len(files), summarize(rows))


def find_registers(
    paths: Iterable[str | os.PathLike[str]],
    *,
    out_file: str | os.PathLike[str],
    model: str | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    layer: int | None = None,
    threshold: str = "auto",
    top_k: int = 10,
    max_layer: int | None = None,
    max_size: int | None = None,
    device: str | None = None,
    recursive: bool = False,
    test_time_registers: str | None = None,
    events: Events | None = None,
):
    """``discover find-registers``: the register neurons of a model, saved as JSON
    (:func:`discover.registers.find_register_neurons`)."""
    from discover.images import read_image
    from discover.registers import find_register_neurons

    events = events or Events()
    if test_time_registers is not None:
        raise UsageError("find-registers searches the model as it is: drop --test-time-registers")
    check_options({"model": model, "device": device, "max_size": max_size})
    thr = _threshold(threshold, ("quantile:",))
    files = _image_files(paths, recursive)
    bb = load_backbone(model, checkpoint, device=device, max_size=max_size)
    images = []
    events.start(len(files), "reading")
    for f in files:
        try:
            images.append(read_image(f, max_side=2 * max_size if max_size else None).array)
        except RegdiscoverError as e:
            events.warn(f"{f}: {e} (skipped)")
        events.advance("")
    try:
        found = find_register_neurons(
            bb, images, layer=layer, threshold=thr, top_k=top_k, max_layer=max_layer
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    found.images = [f.as_posix() for f in files]
    found.model = bb.name
    try:
        found.save(out_file)
    except OSError as e:
        raise UsageError(f"cannot write {out_file}: {_reason(e)}") from None
    return found
