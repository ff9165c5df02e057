"""What the command line shows: the progress bar, one-line messages and tables (rich).

The CLI (:mod:`discover.cli`) parses; this module draws; :mod:`discover.runs` does the
work and reports to a :class:`Bar` through the :class:`discover.runs.Events` methods.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

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

from discover.errors import Interrupted, RegdiscoverError, first_line

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)


def say(console: Console, text: str, label: str = "") -> None:
    """Print one line: ``label`` (rich markup), then ``text`` taken literally (a file name
    such as ``[draft].jpg`` is not markup; a newline in it is shown as ``\\n``) and never
    wrapped, so logs keep one line each."""
    console.print(label + escape(text.replace("\r", "\\r").replace("\n", "\\n")), soft_wrap=True)


def warn(console: Console, text: str) -> None:
    say(console, text, "[yellow]warning[/]: ")


def error(text: str) -> None:
    say(err, text, "[red]error[/]: ")


def _one_line_warnings(default: Callable[..., Any]) -> Callable[..., Any]:
    """A ``warnings.showwarning`` printing the package's own warnings (e.g. "this CPU has
    no native bf16 support; using fp32") as one ``warning:`` line; others as before."""
    package = os.path.dirname(os.path.abspath(__file__))

    def show(message: Any, category: Any, filename: str, lineno: int, *args: Any) -> None:
        if os.path.abspath(filename).startswith(package + os.sep):
            warn(err, str(message))
        else:
            default(message, category, filename, lineno, *args)

    return show


def run_app(app: Callable[..., Any]) -> int:
    """Run the typer ``app`` (a command line) and return its exit code; every way it can
    end that is not a success prints exactly one line on stderr first:

    - a bad option, value or argument (click's usage errors) and every error the package
      raises on purpose (:class:`~discover.errors.RegdiscoverError`): ``error: ...``, 2;
    - the environment failing mid-run (disk full, a lost mount: ``OSError``): 2;
    - Ctrl-C, at any moment of a command (imports, model loading, the run):
      ``interrupted`` (or what the run kept, :class:`~discover.errors.Interrupted`), 130.

    ``discover`` alone prints the help, as click does (exit code 2).
    """
    import importlib

    import typer

    # click's exceptions, wherever this typer takes click from (it may vendor its own)
    click = importlib.import_module(typer.BadParameter.__module__)
    no_args = getattr(click, "NoArgsIsHelpError", ())
    try:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _one_line_warnings(warnings.showwarning)
            code = app(standalone_mode=False)
    except no_args as e:  # `discover` alone: the help, as click shows it
        e.show()
        return e.exit_code
    except click.ClickException as e:  # unknown option, bad value, missing argument...
        ctx = getattr(e, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        error(e.format_message() + hint)
        return e.exit_code
    except (getattr(click, "Abort", typer.Abort), typer.Abort):  # end of input at a prompt
        say(err, "aborted")
        return 1
    except Interrupted as e:
        say(err, str(e) or "interrupted")
        return 130
    except RegdiscoverError as e:
        error(str(e))
        return 2
    except OSError as e:  # the environment failed us mid-run (disk full, lost mount...)
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        error(f"{where}{e.strerror or first_line(e)}")
        return 2
    except KeyboardInterrupt:
        say(err, "interrupted")
        return 130
    if code == 130:  # typer turns a Ctrl-C inside a command into 130, silently
        say(err, "interrupted")
    return int(code or 0)


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task) -> Text:  # noqa: ANN001 - rich's Task
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if not speed else f"{speed:.2f} img/s", style="cyan")


class Bar:
    """:class:`discover.runs.Events` drawn as a rich progress bar on stderr."""

    def __init__(self, console: Console | None = None) -> None:
        self.progress = Progress(
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
            console=console or err,
            transient=False,
        )
        self.task: Any = None

    def start(self, total: int, description: str) -> None:
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, status="")

    def advance(self, status: str) -> None:
        self.progress.update(self.task, advance=1, status=status)

    def warn(self, text: str) -> None:
        warn(self.progress.console, text)

    def info(self, text: str) -> None:
        say(self.progress.console, text)

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.task is not None:
            self.progress.stop()


def print_single_results(records: Sequence[dict[str, Any]]) -> None:
    """The boxes of each record, one line per image (for a run on a single image)."""
    for rec in records:
        pairs = zip(rec["boxes"], rec["scores"], strict=True)
        shown = ", ".join(f"{b} ({sc:.2f})" for b, sc in pairs)
        say(err, f"{rec['image']}: {shown or rec['error'] or 'no box'}")


def print_report(r: Any) -> None:
    """The line that ends ``discover report`` (a :class:`discover.report.ReportSummary`)."""
    say(err, f"report of {r.images} images ({r.boxes} boxes, {r.failures} failures, "
             f"{r.no_box} without a box, {r.missing} images missing; {r.drawn} thumbnails "
             f"drawn, {r.up_to_date} up to date) -> {r.page}")  # fmt: skip


def print_norms(rows: Sequence[dict[str, Any]], images: int, threshold: str) -> None:
    """The summary table of ``discover inspect``."""
    table = Table(title=f"Token norms over {images} image(s) (threshold: {threshold})")
    table.add_column("model", overflow="fold")
    for col in ("images", "outlier fraction", "images with outliers", "max", "median"):
        table.add_column(col, justify="right")
    for s in rows:
        table.add_row(
            s["model"],
            str(s["images"]),
            f"{100 * s['mean_outlier_fraction']:.2f}%",
            str(s["images_with_outliers"]),
            f"{s['max_norm']:.1f}",
            f"{s['median_norm']:.1f}",
        )
    out.print(table)


def print_models(specs: Sequence[Any]) -> None:
    """The table of ``discover models``."""
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
