"""The ``discover`` command line: a thin typer shell over the library.

discover boxes PATH... [--out results.jsonl] [--viz DIR] ...   box images
discover eval --dataset voc07 --root PATH --out DIR ...        CorLoc on a benchmark
discover inspect PATH... --out DIR [--compare MODEL]            token norms, attention
discover models                                                 supported models
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from discover.backbone import DEFAULT_MODEL, FEATURE_KINDS, PRECISIONS, list_models
from discover.errors import RegdiscoverError
from discover.outputs import FORMATS

if TYPE_CHECKING:
    from discover.pipeline import Discoverer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Unsupervised object discovery (LOST, TokenCut) with register-aware ViT features.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class UsageFailure(Exception):
    """A user error reported as one line with exit code 2."""


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if not speed else f"{speed:.2f} img/s", style="cyan")


def progress_bar() -> Progress:
    """The progress bar used by long commands (stderr, images/s and ETA)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=err,
        transient=False,
    )


# -- shared options ----------------------------------------------------------------------
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="timm model name (discover models).")]
CheckpointOpt = Annotated[
    Path | None, typer.Option("--checkpoint", help="Local weights file (offline).")
]
FeaturesOpt = Annotated[
    str, typer.Option("--features", help=f"Features: {', '.join(FEATURE_KINDS)}.")
]
MethodOpt = Annotated[str, typer.Option("--method", help="Discovery method: lost or tokencut.")]
KPatchesOpt = Annotated[int, typer.Option("--k-patches", help="LOST: seed expansion size.")]
GramBiasOpt = Annotated[
    str | None,
    typer.Option(
        "--gram-bias",
        help="LOST: bias added to the gram matrix: a number, 'pNN' (minus the NN-th "
        "percentile of the similarities) or 'auto' (the model's calibrated default).",
    ),
]
CenterOpt = Annotated[
    bool | None,
    typer.Option(
        "--center/--no-center",
        help="Subtract the image's mean feature before the graph (default: per model).",
    ),
]
TauOpt = Annotated[float, typer.Option("--tau", help="TokenCut: similarity threshold.")]
MaxObjOpt = Annotated[int, typer.Option("--max-objects", help="Objects per image.")]
MinScoreOpt = Annotated[
    float | None, typer.Option("--min-score", help="Drop objects scoring below this.")
]
MaxSizeOpt = Annotated[
    int | None, typer.Option("--max-size", help="Resize so the longer side is <= S pixels.")
]
MaxPatchesOpt = Annotated[
    int,
    typer.Option(
        "--max-patches",
        help="Without --max-size, downscale images whose patch grid exceeds this (0: never).",
    ),
]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[
    str, typer.Option("--precision", help=f"Precision: {', '.join(PRECISIONS)}.")
]
ThreadsOpt = Annotated[
    int | None, typer.Option("--threads", help="CPU threads for torch (default: torch's).")
]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Image-decoding threads.")]
TTROpt = Annotated[
    str | None,
    typer.Option(
        "--test-time-registers",
        help="Add a test-time register to a model without registers: 'auto' or a neuron JSON.",
    ),
]


def _method_params(
    method: str, k_patches: int, gram_bias: str | None, center: bool | None, tau: float
) -> dict:
    if method == "lost":
        params: dict = {"k_patches": k_patches}
        if gram_bias is not None and gram_bias != "auto":
            params["gram_bias"] = _parse_bias(gram_bias)
        if center is not None:
            params["center"] = center
        return params
    if method == "tokencut":
        params = {"tau": tau}
        if center is not None:
            params["center"] = center
        return params
    return {}


def _parse_bias(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        if text.startswith("p"):
            return text
        raise UsageFailure(f"--gram-bias must be a number, 'pNN' or 'auto', got {text!r}") from None


def _discoverer(
    model: str, *, checkpoint: Path | None, max_patches: int, **options: object
) -> Discoverer:
    """The Discoverer of ``boxes`` and ``eval``; a bad option value is a usage error.

    (Imported lazily, like every heavy module here, so ``--help`` stays fast.)
    """
    from discover.pipeline import Discoverer

    try:
        return Discoverer(
            model,
            checkpoint=str(checkpoint) if checkpoint else None,
            max_patches=max_patches or None,
            **options,
        )
    except ValueError as e:  # a bad option value (features, device, k-patches...)
        raise UsageFailure(str(e)) from None


def _setup_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))


# -- commands ----------------------------------------------------------------------------
@app.command()
def boxes(
    paths: Annotated[
        list[Path], typer.Argument(help="Image files or folders.", show_default=False)
    ],
    out_path: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="Output file (folder for --format voc). Default: results.<fmt>."
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help=f"One of {', '.join(FORMATS)}.")] = "jsonl",
    model: ModelOpt = DEFAULT_MODEL,
    checkpoint: CheckpointOpt = None,
    features: FeaturesOpt = "keys",
    method: MethodOpt = "lost",
    k_patches: KPatchesOpt = 100,
    gram_bias: GramBiasOpt = None,
    center: CenterOpt = None,
    tau: TauOpt = 0.2,
    max_objects: MaxObjOpt = 1,
    min_score: MinScoreOpt = None,
    max_size: MaxSizeOpt = None,
    max_patches: MaxPatchesOpt = 9216,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    threads: ThreadsOpt = None,
    workers: WorkersOpt = 2,
    test_time_registers: TTROpt = None,
    viz: Annotated[
        Path | None, typer.Option("--viz", help="Write one PNG per image with its boxes here.")
    ] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend folders.")] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip images already in the output.")
    ] = False,
) -> None:
    """Discover the main object(s) in images and write their boxes."""
    from discover.distributed import DistContext
    from discover.outputs import open_writer, result_record
    from discover.pipeline import iter_image_paths

    if fmt not in FORMATS:
        raise UsageFailure(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        files = iter_image_paths(paths, recursive=recursive)
    except FileNotFoundError as e:
        raise UsageFailure(str(e)) from None
    if not files:
        where = ", ".join(str(p) for p in paths)
        raise UsageFailure(f"no images found in {where} (extensions: jpg, png, bmp, tif, webp)")
    if out_path is None:
        out_path = Path("results" if fmt == "voc" else f"results.{fmt}")
    if viz is not None:
        try:
            viz.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UsageFailure(f"cannot create the --viz folder {viz}: {_reason(e)}") from None
    dist = DistContext.from_env(device)
    names = {f: f.as_posix() for f in files}
    part = dist.part_path(out_path)
    done = dist.prepare_output(out_path, fmt, resume=resume)
    try:
        writer = open_writer(part, fmt, resume=resume)
    except (OSError, ValueError) as e:
        raise UsageFailure(f"cannot write output {part}: {_reason(e)}") from None
    with writer:
        todo = dist.shard(files, key=lambda f: names[f], done=done | writer.done)
        skipped = len(files) - len(todo) if dist.world_size == 1 else None
        if skipped:
            _say(err, f"resume: {skipped} image(s) already in {part}, {len(todo)} to go")
        _setup_threads(threads)
        params = _method_params(method, k_patches, gram_bias, center, tau)
        disc = _discoverer(
            model,
            checkpoint=checkpoint,
            method=method,
            device=dist.device,
            batch_size=batch_size,
            features=features,
            precision=precision,
            max_size=max_size,
            max_patches=max_patches,
            max_objects=max_objects,
            min_score=min_score,
            num_workers=workers,
            test_time_registers=test_time_registers,
            keep_images=viz is not None,
            **params,
        )
        viz_stems: dict[str, str] = {}
        n_boxes = n_fail = n_done = 0
        t0 = time.perf_counter()
        interrupted = False
        with progress_bar() as bar:
            task = bar.add_task("boxing", total=len(todo), status="")
            try:
                for res in disc.run(todo):
                    name = names[Path(res.path)]
                    writer.write(result_record(res, name))
                    n_done += 1
                    if res.error:
                        n_fail += 1
                        _warn(bar.console, f"{name}: {res.error}")
                    n_boxes += len(res.detections)
                    if viz is not None and res.error is None:
                        try:
                            _save_viz(viz, name, res, viz_stems)
                        except OSError as e:
                            _warn(bar.console, f"{name}: no --viz image: {_reason(e)}")
                    bar.update(task, advance=1, status=f"{n_boxes} boxes, {n_fail} failed")
            except KeyboardInterrupt:
                interrupted = True
    dist.merge_outputs(out_path, fmt)
    dt = time.perf_counter() - t0
    rate = n_done / dt if dt > 0 else 0.0
    target = out_path if dist.is_main else part
    msg = (
        f"{n_done} images, {n_boxes} boxes, {n_fail} failures in {dt:.1f} s "
        f"({rate:.2f} img/s) -> {target}"
    )
    if interrupted:
        _say(err, f"interrupted: {msg} (run again with --resume to finish)")
        raise typer.Exit(130)
    if dist.is_main:
        _say(err, msg)


def _save_viz(folder: Path, name: str, res, stems: dict[str, str]) -> None:  # noqa: ANN001
    from discover.outputs import unique_stem
    from discover.viz import draw_result, save_png

    stem = unique_stem(name, stems)  # a.jpg and a.png must not share a.png
    save_png(folder / f"{stem}.png", draw_result(res.extras["image"], res))


@app.command("eval")
def eval_(
    dataset: Annotated[str, typer.Option("--dataset", help="voc07, voc12 or coco20k.")],
    root: Annotated[Path, typer.Option("--root", help="Dataset folder (see README).")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path("out/eval"),
    coco_list: Annotated[
        Path | None,
        typer.Option("--coco-list", help="coco20k: path to coco_20k_filenames.txt."),
    ] = None,
    ann_file: Annotated[
        Path | None, typer.Option("--ann-file", help="coco20k: instances_train2014.json.")
    ] = None,
    model: ModelOpt = DEFAULT_MODEL,
    checkpoint: CheckpointOpt = None,
    features: FeaturesOpt = "keys",
    method: MethodOpt = "lost",
    k_patches: KPatchesOpt = 100,
    gram_bias: GramBiasOpt = None,
    center: CenterOpt = None,
    tau: TauOpt = 0.2,
    max_objects: MaxObjOpt = 1,
    min_score: MinScoreOpt = None,
    no_hard: Annotated[
        bool, typer.Option("--no-hard", help="Drop difficult/truncated objects (VOC).")
    ] = False,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="First N images only.")
    ] = None,
    max_size: MaxSizeOpt = None,
    max_patches: MaxPatchesOpt = 9216,
    batch_size: BatchOpt = 1,
    device: DeviceOpt = "cpu",
    precision: PrecisionOpt = "fp32",
    threads: ThreadsOpt = None,
    workers: WorkersOpt = 2,
    test_time_registers: TTROpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Skip images already in OUT/boxes.jsonl.")
    ] = False,
) -> None:
    """CorLoc of single-object discovery on VOC07, VOC12 or COCO20k trainval."""
    from discover.datasets import load_dataset
    from discover.distributed import DistContext
    from discover.evaluate import EvalRun

    try:
        ds = load_dataset(dataset, root, coco_list=coco_list, no_hard=no_hard, ann_file=ann_file)
    except ValueError as e:  # unknown dataset name, --no-hard with coco20k
        raise UsageFailure(str(e)) from None
    if len(ds) == 0:
        raise UsageFailure(f"{dataset} at {root} has no image to evaluate")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageFailure(f"cannot create output folder {out_dir}: {_reason(e)}") from None
    dist = DistContext.from_env(device)
    _setup_threads(threads)
    params = _method_params(method, k_patches, gram_bias, center, tau)
    disc = _discoverer(
        model,
        checkpoint=checkpoint,
        method=method,
        device=dist.device,
        batch_size=batch_size,
        features=features,
        precision=precision,
        max_size=max_size,
        max_patches=max_patches,
        max_objects=max_objects,
        min_score=min_score,
        num_workers=workers,
        test_time_registers=test_time_registers,
        **params,
    )
    settings = {
        "model": model,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "features": features,
        "method": method,
        "method_params": disc.method_params,
        "max_objects": max_objects,
        "min_score": min_score,
        "no_hard": no_hard,
        "limit": limit,
        "max_size": max_size,
        "precision": disc.backbone.precision,
        "test_time_registers": test_time_registers,
        "batch_size": batch_size,
        "device": str(disc.backbone.device),
    }
    samples = list(ds)[:limit] if limit is not None else list(ds)
    done = dist.prepare_output(out_dir / "boxes.jsonl", "jsonl", resume=resume)
    run = EvalRun(
        ds,
        disc,
        out_dir,
        settings=settings,
        resume=resume,
        samples=dist.shard(samples, key=lambda s: s.image_id, done=done),
        boxes_name=dist.part_path(Path("boxes.jsonl")).name,
    )
    n = len(run.samples)
    with progress_bar() as bar:
        task = bar.add_task(f"{ds.name} {method}", total=n, status="")
        records = run.run()
        try:
            for rec in records:
                if rec.record.get("error") and not rec.resumed:
                    _warn(bar.console, f"{rec.record['image']}: {rec.record['error']}")
                acc = run.acc
                bar.update(
                    task,
                    advance=1,
                    status=f"CorLoc {100 * acc.corloc:.2f} ({acc.correct}/{acc.total})",
                )
        except KeyboardInterrupt:
            records.close()  # flushes and closes boxes.jsonl
            _say(
                err,
                f"interrupted after {run.acc.total} images, kept in {run.boxes_path} "
                "(run again with --resume to finish)",
            )
            raise typer.Exit(130) from None
    acc = dist.merge_eval(out_dir, run, samples)
    if dist.is_main:
        path = run.write_summary()
        acc = run.acc
        _say(
            err,
            f"{ds.name}: CorLoc {100 * acc.corloc:.2f} ({acc.correct}/{acc.total}), "
            f"object recall {100 * acc.recall:.2f}, {len(acc.failures)} failures, "
            f"{run.elapsed:.1f} s -> {path}",
        )


@app.command()
def inspect(
    paths: Annotated[
        list[Path], typer.Argument(help="Image files or folders.", show_default=False)
    ],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "out/inspect"
    ),
    model: ModelOpt = DEFAULT_MODEL,
    checkpoint: CheckpointOpt = None,
    compare: Annotated[
        str | None, typer.Option("--compare", help="A second model, side by side.")
    ] = None,
    compare_checkpoint: Annotated[
        Path | None, typer.Option("--compare-checkpoint", help="Weights of --compare.")
    ] = None,
    test_time_registers: Annotated[
        str | None,
        typer.Option(
            "--test-time-registers",
            help="Add test-time registers ('auto' or a neuron JSON) to --model; without "
            "--compare, the same model without them is shown beside it (before/after).",
        ),
    ] = None,
    threshold: Annotated[
        str, typer.Option("--threshold", help="Outlier norm cutoff: a number or 'auto'.")
    ] = "auto",
    max_size: MaxSizeOpt = None,
    device: DeviceOpt = "cpu",
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend folders.")] = False,
) -> None:
    """Token norms, outliers, [CLS] attention and LOST's degree map, per image (PNG + CSV)."""
    from discover.backbone import Backbone
    from discover.inspection import inspect_images, summarize
    from discover.pipeline import iter_image_paths

    try:
        files = iter_image_paths(paths, recursive=recursive)
    except FileNotFoundError as e:
        raise UsageFailure(str(e)) from None
    if not files:
        raise UsageFailure(f"no images found in {', '.join(str(p) for p in paths)}")
    thr: float | str = threshold
    if threshold != "auto":
        try:
            thr = float(threshold)
        except ValueError:
            msg = f"--threshold must be a number or 'auto', got {threshold!r}"
            raise UsageFailure(msg) from None

    def load(name: str, ckpt: Path | None, ttr: str | None) -> tuple[str, Backbone]:
        bb = Backbone(
            name, checkpoint=str(ckpt) if ckpt else None, device=device, max_size=max_size
        )
        if ttr is None:
            return name, bb
        from discover.registers import attach_test_time_registers

        attach_test_time_registers(bb, ttr)
        return f"{name} + test-time registers", bb

    backbones = [load(model, checkpoint, test_time_registers)]
    if compare is not None:
        backbones.append(load(compare, compare_checkpoint, None))
    elif test_time_registers is not None:
        backbones.insert(0, load(model, checkpoint, None))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageFailure(f"cannot create output folder {out_dir}: {_reason(e)}") from None
    with progress_bar() as bar:
        task = bar.add_task("inspecting", total=len(files), status="")

        def progress(done: int, total: int, rows: list[dict]) -> None:
            for r in rows:
                if r.get("error"):
                    bar.console.print(f"[yellow]warning[/]: {r['image']}: {r['error']}")
            bar.update(task, completed=done)

        rows = inspect_images(
            [str(f) for f in files], backbones, out_dir, threshold=thr, progress=progress
        )
    table = Table(title=f"Token norms over {len(files)} image(s) (threshold: {threshold})")
    table.add_column("model", overflow="fold")
    for col in ("images", "outlier fraction", "images with outliers", "max", "median"):
        table.add_column(col, justify="right")
    for s in summarize(rows):
        table.add_row(
            s["model"],
            str(s["images"]),
            f"{100 * s['mean_outlier_fraction']:.2f}%",
            str(s["images_with_outliers"]),
            f"{s['max_norm']:.1f}",
            f"{s['median_norm']:.1f}",
        )
    out.print(table)
    err.print(f"figures and norms.csv -> {out_dir}")


@app.command("find-registers")
def find_registers(
    paths: Annotated[
        list[Path], typer.Argument(help="Image files or folders.", show_default=False)
    ],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="Neuron JSON to write.")],
    model: ModelOpt = DEFAULT_MODEL,
    checkpoint: CheckpointOpt = None,
    layer: Annotated[
        int | None, typer.Option("--layer", help="Block whose output norms define outliers.")
    ] = None,
    threshold: Annotated[
        str,
        typer.Option("--threshold", help="Outlier norm: a number, 'auto' or 'quantile:Q'."),
    ] = "auto",
    top_k: Annotated[int, typer.Option("--top-k", help="Neurons to keep.")] = 10,
    max_layer: Annotated[
        int | None, typer.Option("--max-layer", help="Last block whose neurons may be kept.")
    ] = None,
    max_size: MaxSizeOpt = None,
    device: DeviceOpt = "cpu",
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Descend folders.")] = False,
) -> None:
    """Find the register neurons of a model without registers (for --test-time-registers)."""
    from discover.backbone import Backbone
    from discover.images import read_image
    from discover.pipeline import iter_image_paths
    from discover.registers import find_register_neurons

    try:
        files = iter_image_paths(paths, recursive=recursive)
    except FileNotFoundError as e:
        raise UsageFailure(str(e)) from None
    if not files:
        raise UsageFailure(f"no images found in {', '.join(str(p) for p in paths)}")
    thr: float | str = threshold
    try:
        thr = float(threshold)
    except ValueError:
        pass
    bb = Backbone(
        model, checkpoint=str(checkpoint) if checkpoint else None, device=device, max_size=max_size
    )
    images = []
    for f in files:
        try:
            images.append(read_image(f).array)
        except RegdiscoverError as e:
            err.print(f"[yellow]warning[/]: {f}: {e} (skipped)")
    found = find_register_neurons(
        bb, images, layer=layer, threshold=thr, top_k=top_k, max_layer=max_layer
    )
    found.images = [f.as_posix() for f in files]
    found.model = model
    try:
        found.save(out_file)
    except OSError as e:
        raise UsageFailure(f"cannot write {out_file}: {_reason(e)}") from None
    layers = sorted({layer for layer, _ in found.neurons})
    err.print(
        f"{len(found.neurons)} register neurons in blocks {layers} "
        f"(outliers: block {found.layer}, norm > {found.threshold:.2f}) -> {out_file}"
    )


@app.command()
def models() -> None:
    """List the supported models (patch size, width, registers)."""
    specs = list_models()
    table = Table(title="Supported models (any timm ViT name also works)")
    # Names are what users copy: never truncated, even on a narrow or piped console.
    table.add_column("model", no_wrap=True, min_width=max(len(s.name) for s in specs))
    for col in ("family", "patch", "dim", "registers", "note"):
        table.add_column(col)
    for s in specs:
        table.add_row(s.name, s.family, str(s.patch_size), str(s.dim), str(s.registers), s.note)
    # Piped or captured output has no width of its own: do not squeeze it into 80 columns.
    console = out if out.is_terminal else Console(highlight=False, width=150)
    console.print(table)


def _say(console: Console, text: str, label: str = "") -> None:
    """Print one line: ``label`` (rich markup), then ``text`` taken literally (a file name
    such as ``[draft].jpg`` is not markup) and never wrapped, so logs keep one line each."""
    console.print(label + escape(text), soft_wrap=True)


def _warn(console: Console, text: str) -> None:
    _say(console, text, "[yellow]warning[/]: ")


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def main() -> None:
    """Console-script entry point: every expected failure is one line, exit code 2.

    Typer runs in standalone mode, so its own usage errors (unknown option, missing
    argument, bad value) print their message and exit with 2, and ``typer.Exit(code)``
    and Ctrl-C (130) keep their exit codes. Our errors, raised from a command, come
    out of ``app()`` as exceptions and are reported here as one line.
    """
    try:
        app()  # always ends in SystemExit when nothing is raised
    except (UsageFailure, RegdiscoverError) as e:
        _say(err, str(e), "[red]error[/]: ")
        sys.exit(2)
    except OSError as e:  # the environment failed us mid-run (disk full, lost mount...)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _say(err, f"{where}{_reason(e)}", "[red]error[/]: ")
        sys.exit(2)
    except KeyboardInterrupt:
        _say(err, "interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
