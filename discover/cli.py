"""The ``discover`` command line: a thin typer shell over :mod:`discover.runs`.

discover boxes PATH... [--out results.jsonl] [--viz DIR] ...   box images
discover eval --dataset voc07 --root PATH --out DIR ...        CorLoc on a benchmark
discover inspect PATH... --out DIR [--compare MODEL]            token norms, attention
discover find-registers PATH... --out FILE                      test-time register neurons
discover report RESULTS [--out DIR] [--images-root DIR]         an HTML page of the results
discover models                                                 supported models

Every option is declared once (the groups below) and defaults to ``None``: the library
owns the defaults. Heavy modules are imported inside the commands so ``--help`` is fast.
"""

from __future__ import annotations

import sys

try:  # Ctrl-C while the command line starts (the rest imports inside the commands)
    import functools
    import inspect as pyinspect
    from pathlib import Path
    from typing import Annotated, Any

    import typer

    from discover.console import (
        Bar,
        err,
        print_models,
        print_norms,
        print_single_results,
        run_app,
        say,
    )
    from discover.errors import Interrupted
except KeyboardInterrupt:
    sys.stderr.write("interrupted\n")
    raise SystemExit(130) from None

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Unsupervised object discovery (LOST, TokenCut...) with register-aware ViT features.",
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"max_content_width": 120, "help_option_names": ["-h", "--help"]},
)


_METAVARS = {str: "TEXT", int: "N", float: "X", Path: "PATH"}


def _val(kind: Any, *names: str, **kw: Any) -> Any:
    """An option of type ``kind`` (required or with a default in the signature)."""
    base = next((k for k in _METAVARS if kind in (k, k | None)), None)
    if base is not None:
        kw.setdefault("metavar", _METAVARS[base])
    elif kind not in (bool, bool | None):
        kw.setdefault("metavar", "KEY=VALUE")
    return Annotated[kind, typer.Option(*names, **kw)]


def _opt(kind: Any, *names: str, **kw: Any) -> Any:
    """An option that defaults to ``None``: the library's default."""
    return _val(kind | None, *names, show_default=False, **kw)


def _flag(*names: str, help: str) -> Any:  # noqa: A002 - typer's word
    return Annotated[bool, typer.Option(*names, help=help)]


MODEL_OPTIONS = {
    "model": _opt(str, "--model", "-m", help="timm model name (see discover models)."),
    "checkpoint": _opt(Path, "--checkpoint", help="Local weights file (offline)."),
    "device": _opt(str, "--device", help="cpu (default), cuda, cuda:N or mps."),
    "max_size": _opt(
        int, "--max-size", help="Longer side at most N px (0: native). Boxes: 336; eval: native."
    ),
    "test_time_registers": _opt(
        str, "--test-time-registers", help="For a model without registers: 'auto' or a JSON."
    ),
}
_PRECISION_HELP = "fp32 (default); bf16 (on a CPU only with native bf16, else fp32); fp16 (GPU)."
RUN_OPTIONS = {
    "features": _opt(
        str,
        "--features",
        help="keys, queries, values, tokens; keys_rope, queries_rope for rotary models such "
        "as DINOv3 (default: per method).",
    ),
    "layer": _opt(int, "--layer", help="Block the features come from (default: the last, -1)."),
    "method": _opt(str, "--method", help="Discovery method (default: per model family)."),
    "k_patches": _opt(str, "--k-patches", help="LOST: seed expansion size (100)."),
    "gram_bias": _opt(str, "--gram-bias", help="LOST: a number, 'pNN' (a percentile) or 'auto'."),
    "center": _opt(bool, "--center/--no-center", help="Subtract the mean feature (per family)."),
    "tau": _opt(str, "--tau", help="TokenCut: similarity threshold in (0, 1) (0.2)."),
    "param": _opt(list[str], "--param", "-p", help="Any method parameter: KEY=VALUE."),
    "max_objects": _opt(int, "--max-objects", help="Objects per image (1)."),
    "min_score": _opt(float, "--min-score", help="Drop objects scoring below this."),
    "max_patches": _opt(int, "--max-patches", help="Patch budget at native size (9216; 0: none)."),
    "batch_size": _opt(int, "--batch-size", "-b", help="Images per forward pass (1)."),
    "precision": _opt(str, "--precision", help=_PRECISION_HELP),
    "threads": _opt(int, "--threads", min=1, help="CPU threads for torch (default: torch's)."),
    "num_workers": _opt(int, "--workers", min=1, help="Image-decoding threads (2)."),
    "resume": _flag("--resume", help="Skip the images already in the output."),
    "allow_settings_change": _flag("--allow-settings-change", help="--resume with new settings."),
}
PATH_OPTIONS = {"recursive": _flag("--recursive", "-r", help="Descend folders.")}
PathsArg = Annotated[
    list[Path],
    typer.Argument(help="Image files or folders.", metavar="PATH...", show_default=False),
]


def with_options(*groups: dict[str, Any]):
    """Add the option ``groups`` to a command; it receives them as one ``opts`` dict."""
    shared = {k: v for g in groups for k, v in g.items()}
    kw = pyinspect.Parameter.KEYWORD_ONLY
    extra = [
        pyinspect.Parameter(
            k, kw, default=False if ann.__origin__ is bool else None, annotation=ann
        )
        for k, ann in shared.items()
    ]

    def deco(fn):
        sig = pyinspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "opts"]

        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            opts = {k: kwargs.pop(k) for k in shared}
            return fn(**kwargs, opts=opts)

        wrapper.__signature__ = sig.replace(parameters=[*own, *extra])
        return wrapper

    return deco


# -- commands ----------------------------------------------------------------------------
@app.command()
@with_options(MODEL_OPTIONS, RUN_OPTIONS, PATH_OPTIONS)
def boxes(
    paths: PathsArg,
    out_path: _opt(Path, "--out", "-o", help="Output file (a folder for voc; results.FMT).") = None,
    fmt: _val(str, "--format", metavar="FMT", help="jsonl, coco, csv or voc.") = "jsonl",
    viz: _opt(Path, "--viz", help="Write one PNG per image with its boxes here.") = None,
    report: _opt(Path, "--report", help="Then write an HTML report of the output here.") = None,
    *,
    opts: dict[str, Any],
) -> None:
    """Discover the main object(s) in images and write their boxes."""
    from discover.runs import box_images, command_options

    opts = command_options(opts)
    with Bar() as bar:
        s = box_images(paths, out=out_path, fmt=fmt, viz=viz, report=report, events=bar, **opts)
    print_single_results(s.results)  # a single image: show its boxes
    if s.interrupted:
        raise Interrupted(f"interrupted: {s.message()} (run again with --resume to finish)")
    if s.is_main:
        say(err, s.message())
    if s.report is not None:
        from discover.console import print_report

        print_report(s.report)


@app.command()
def report(
    results: Annotated[Path, typer.Argument(metavar="RESULTS", help="An output of boxes.")],
    out: _opt(Path, "--out", "-o", help="Report folder (default: RESULTS.report).") = None,
    fmt: _opt(str, "--format", help="jsonl, coco, csv or voc (default: from RESULTS).") = None,
    images_root: _opt(Path, "--images-root", help="Where the image names start.") = None,
) -> None:
    """A static HTML page of a run's results: thumbnails, sort by score, filters."""
    from discover.console import print_report
    from discover.report import write_report

    with Bar() as bar:
        print_report(write_report(results, out=out, fmt=fmt, images_root=images_root, events=bar))


@app.command("eval")
@with_options(MODEL_OPTIONS, RUN_OPTIONS)
def eval_(
    dataset: _val(str, "--dataset", metavar="NAME", help="voc07, voc12 or coco20k."),
    root: _val(Path, "--root", help="Dataset folder (see README)."),
    out_dir: _val(Path, "--out", "-o", help="Output folder.") = Path("out/eval"),
    split: _val(str, "--split", metavar="NAME", help="VOC image set.") = "trainval",
    coco_list: _opt(Path, "--coco-list", help="coco20k: coco_20k_filenames.txt.") = None,
    ann_file: _opt(Path, "--ann-file", help="coco20k: instances_train2014.json.") = None,
    no_hard: _flag("--no-hard", help="Drop difficult/truncated objects (VOC).") = False,
    limit: _opt(int, "--limit", min=1, help="First N images only.") = None,
    *,
    opts: dict[str, Any],
) -> None:
    """CorLoc of single-object discovery on VOC07, VOC12, COCO20k or a VOC-layout tree."""
    from discover.runs import command_options, evaluate

    opts = command_options(opts)
    with Bar() as bar:
        s = evaluate(
            dataset, root, out_dir=out_dir, split=split, coco_list=coco_list,
            ann_file=ann_file, no_hard=no_hard, limit=limit, events=bar, **opts,
        )  # fmt: skip
    if s.interrupted:
        raise Interrupted(f"interrupted: {s.message()} (run again with --resume to finish)")
    if s.is_main:
        say(err, s.message())


@app.command()
@with_options(MODEL_OPTIONS, PATH_OPTIONS)
def inspect(
    paths: PathsArg,
    out_dir: _val(Path, "--out", "-o", help="Output folder.") = Path("out/inspect"),
    compare: _opt(str, "--compare", help="A second model, side by side.") = None,
    compare_checkpoint: _opt(Path, "--compare-checkpoint", help="Weights of --compare.") = None,
    threshold: _val(
        str, "--threshold", metavar="X", help="Outlier norm: a number or 'auto'."
    ) = "auto",
    *,
    opts: dict[str, Any],
) -> None:
    """Token norms, outliers, [CLS] attention and LOST's degree map, per image (PNG + CSV).

    With --test-time-registers and no --compare, the same model without them is shown
    beside it (before / after)."""
    from discover.runs import inspect_paths

    with Bar() as bar:
        summary = inspect_paths(paths, out_dir=out_dir, compare=compare,
                                compare_checkpoint=compare_checkpoint, threshold=threshold,
                                events=bar, **opts)  # fmt: skip
    print_norms(summary.rows, summary.images, threshold)
    err.print(f"figures and norms.csv -> {out_dir}")


@app.command("find-registers")
@with_options(MODEL_OPTIONS, PATH_OPTIONS)
def find_registers(
    paths: PathsArg,
    out_file: _val(Path, "--out", "-o", help="Neuron JSON to write."),
    layer: _opt(int, "--layer", help="Block whose output norms define outliers.") = None,
    threshold: _val(
        str, "--threshold", metavar="X", help="A number, 'auto' or 'quantile:Q'."
    ) = "auto",
    top_k: _val(int, "--top-k", min=1, help="Neurons to keep.") = 10,
    max_layer: _opt(int, "--max-layer", help="Last block whose neurons may be kept.") = None,
    *,
    opts: dict[str, Any],
) -> None:
    """Find the register neurons of a model without registers (for --test-time-registers)."""
    from discover.runs import find_registers as run

    with Bar() as bar:
        found = run(paths, out_file=out_file, layer=layer, threshold=threshold, top_k=top_k,
                    max_layer=max_layer, events=bar, **opts)  # fmt: skip
    layers = sorted({layer for layer, _ in found.neurons})
    err.print(f"{len(found.neurons)} register neurons in blocks {layers} (outliers: block "
              f"{found.layer}, norm > {found.threshold:.2f}) -> {out_file}")  # fmt: skip


@app.command()
def models() -> None:
    """List the supported models (patch size, width, registers)."""
    from discover.models import list_models

    print_models(list_models())


def _version(value: bool) -> None:
    if value:
        from discover.version import __version__

        print(f"regdiscover {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Unsupervised object discovery (LOST, TokenCut...) with register-aware ViT features."""


def main() -> None:
    """Console-script entry point: one line and exit code 2 for every bad option or
    expected failure, ``interrupted`` and 130 for Ctrl-C (:func:`discover.console.run_app`)."""
    sys.exit(run_app(app))


if __name__ == "__main__":  # pragma: no cover
    main()
