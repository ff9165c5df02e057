"""The HTML report of a run: ``discover report RESULTS`` and ``discover boxes --report DIR``.

One static page, ``DIR/index.html``, to look at thousands of results: a card per image
with a thumbnail of its boxes, sorting by score, filters for failures (records with an
error), images without a box and low scores (a threshold set in the page), the counts,
the run's settings and a summary of its scores.

- Any output this package writes is read (:func:`discover.outputs.read_records`) with its
  settings sidecar; image names are relative to the working directory the run recorded
  (``cwd``), or to ``images_root``. A missing or unreadable image gets a card that says so.
- Pictures are files beside the page, never inlined: ``thumbs/`` (JPEG, longer side
  :data:`THUMB_SIDE`) and ``full/`` (the full-size figure, longer side at most
  :data:`FULL_MAX_SIDE`); a run's ``--viz`` PNG is linked instead when it has one. Each
  file is named by a hash of what it shows (image path, size and time, boxes, scores), so
  a re-run redraws only what changed, and deletes the pictures nothing shows any more.
- The page opens from disk (``file://``): CSS and JavaScript inline, no network (its
  Content-Security-Policy forbids it), every name and text escaped.

Drawing is :mod:`discover.viz`'s; this module reads, lays out and writes files.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from discover.errors import RegdiscoverError, UsageError, first_line
from discover.events import Events, Tally
from discover.outputs import (
    FORMATS,
    SETTINGS_FORMAT,
    VIZ_INDEX,
    OutputError,
    atomic_write,
    guess_format,
    read_jsonl,
    read_settings,
    settings_path,
    writer_class,
)

__all__ = ["ReportSummary", "check_report_dir", "default_report_dir", "write_report"]

PAGE = "index.html"
THUMBS = "thumbs"
FULL = "full"
THUMB_SIDE = 320
"""Longer side of a thumbnail, in pixels (shown at half that: sharp on dense screens)."""
FULL_MAX_SIDE = 4096
"""Full-size figures of larger images are downscaled to this longer side."""
MANIFEST = "manifest.json"
"""In ``thumbs/``: what each thumbnail's image said (size, a note), for re-runs."""
_DRAWING = 1
"""Part of every picture's hash: bump it when the drawing changes, to redraw them all."""
_OURS = re.compile(r"^[0-9a-f]{16}\.jpg$")
_BINS = 24


@dataclass(kw_only=True)
class ReportSummary(Tally):
    """What :func:`write_report` wrote (``failures``: records with an error, the run could
    not box the image)."""

    page: Path
    no_box: int = 0
    """Records without an error and without a box."""
    missing: int = 0
    """Images the run read (records without an error) that are not found, or not
    readable, now."""
    drawn: int = 0
    """Thumbnails drawn by this call."""
    up_to_date: int = 0
    """Thumbnails an earlier report had drawn already."""


@dataclass
class _Card:
    index: int
    name: str
    path: Path
    boxes: list[list[float]]
    scores: list[float | None]
    width: int | None
    height: int | None
    error: str | None
    viz: Path | None = None
    thumb: str | None = None
    full: str | None = None
    notes: list[str] = field(default_factory=list)
    missing: bool = False
    drawn: bool = False

    @property
    def top(self) -> float | None:
        finite = [s for s in self.scores if s is not None]
        return max(finite) if finite else None

    @property
    def kind(self) -> str:
        return "failed" if self.error else ("ok" if self.boxes else "nobox")

    @property
    def lost(self) -> bool:
        """The run read the image, the report cannot."""
        return self.missing and not self.error


# -- the folder ---------------------------------------------------------------------------
def default_report_dir(results: str | os.PathLike[str]) -> Path:
    """Where the report of ``results`` goes by default: ``<results>.report`` beside it."""
    p = Path(results)
    return p.with_name(p.name + ".report")


def check_report_dir(out: str | os.PathLike[str]) -> Path:
    """Fail now (one line) when the report folder cannot be made; creates nothing."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise UsageError(f"--report/--out {p} is a file; the report is a folder")
    parent = p
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"cannot create the report folder {p}: {parent} is not writable")
    return p


# -- reading the run ----------------------------------------------------------------------
def _read_run(results: Path, fmt: str | None) -> tuple[str, list[dict], int, dict | None]:
    if not results.exists():
        raise UsageError(f"{results}: no such results file or folder")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    try:
        fmt = fmt or guess_format(results)
    except OutputError as e:
        raise UsageError(str(e)) from None
    if results.is_dir() != (fmt == "voc"):
        kind = "a folder" if results.is_dir() else "a file"
        raise UsageError(f"{results} is {kind}, not a {fmt} output")
    cls = writer_class(fmt)
    try:
        corrupt = cls.read(results).corrupt
        records = cls.records(results)
        if fmt == "voc" and not (results / "index.jsonl").is_file():
            raise OutputError("no index.jsonl: not a regdiscover VOC folder")
    except (OSError, ValueError, KeyError, TypeError, IndexError, SyntaxError) as e:
        raise UsageError(f"cannot read {results} as {fmt}: {first_line(e)}") from None
    if corrupt and not records:
        raise UsageError(f"{results} holds no {fmt} record regdiscover can read")
    sidecar = read_settings(results, fmt)
    while (
        sidecar
        and isinstance(sidecar.get("settings"), dict)
        and (sidecar["settings"].get("format") == SETTINGS_FORMAT)
    ):  # merged by an older version, which nested the sidecar in a second one
        sidecar = sidecar["settings"]
    if sidecar is None and fmt == "coco":  # COCO keeps the settings in its info too
        info = cls.read(results).extra.get("info") or {}
        if isinstance(info.get("settings"), dict):
            sidecar = {"settings": info["settings"]}
    return fmt, records, corrupt, sidecar


def _cards(records: Sequence[Mapping[str, Any]], root: Path) -> list[_Card]:
    cards = []
    for i, rec in enumerate(records):
        name = str(rec.get("image"))
        boxes = [list(b) for b in rec.get("boxes") or [] if isinstance(b, list | tuple)]
        scores = list(rec.get("scores") or [])[: len(boxes)]
        scores += [None] * (len(boxes) - len(scores))
        cards.append(
            _Card(
                index=i,
                name=name,
                path=root / name,  # an absolute name stays as it is
                boxes=boxes,
                scores=[_finite(s) for s in scores],
                width=_int(rec.get("width")),
                height=_int(rec.get("height")),
                error=str(rec["error"]) if rec.get("error") else None,
            )
        )
    return cards


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


def _int(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _viz_pictures(sidecar: Mapping[str, Any] | None) -> dict[str, Path]:
    """``{image name: --viz PNG}`` of the run, for the pictures that are still there."""
    folder = (sidecar or {}).get("viz")
    if not isinstance(folder, str) or not (Path(folder) / VIZ_INDEX).is_file():
        return {}
    found = {}
    for line in read_jsonl(Path(folder) / VIZ_INDEX):  # the last picture of an image wins
        if isinstance(line.get("image"), str) and isinstance(line.get("png"), str):
            found[line["image"]] = Path(folder) / Path(line["png"]).name
    return {name: p for name, p in found.items() if p.is_file()}


# -- pictures -----------------------------------------------------------------------------
def _key(card: _Card, stat: os.stat_result, what: str, side: int) -> str:
    facts = [_DRAWING, what, side, str(card.path), stat.st_size, stat.st_mtime_ns,
             card.width, card.height, card.boxes, card.scores]  # fmt: skip
    return hashlib.sha1(json.dumps(facts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _pictures(card: _Card, out: Path, manifest: dict[str, Any], side: int) -> dict[str, Any]:
    """Make (or find up to date) the card's thumbnail and full-size figure; returns the
    card's manifest entry (``None`` when there is no picture)."""
    from discover.images import read_image, resize_longer_side
    from discover.viz import draw_boxes, encode_jpeg

    try:
        stat = card.path.stat()
    except FileNotFoundError:
        card.missing = True
        card.notes.append("image not found")
        return {}
    except OSError as e:
        card.missing = True
        card.notes.append(f"image not readable: {e.strerror or first_line(e)}")
        return {}
    tkey = _key(card, stat, "thumb", side)
    thumb = out / THUMBS / f"{tkey}.jpg"
    full = None if card.viz is not None else out / FULL / f"{_key(card, stat, 'full', 0)}.jpg"
    card.thumb = f"{THUMBS}/{thumb.name}"
    card.full = f"{FULL}/{full.name}" if full is not None else _href(card.viz, out)
    known = manifest.get(tkey)
    if known is not None and thumb.is_file() and (full is None or full.is_file()):
        card.notes.extend(known.get("notes", []))
        return {tkey: known}
    try:
        loaded = read_image(card.path, max_side=FULL_MAX_SIDE if full is not None else side)
    except RegdiscoverError as e:
        card.missing = True
        card.thumb = card.full = None
        card.notes.append(f"image not readable: {e}")
        return {}
    size = (card.width, card.height) if card.width and card.height else loaded.original_size
    notes = []
    if card.width and card.height and loaded.original_size != (card.width, card.height):
        w, h = loaded.original_size
        notes.append(f"the image is {w}x{h} now, the run saw {card.width}x{card.height}")
    if full is not None:
        atomic_write(full, encode_jpeg(draw_boxes(loaded.array, card.boxes, card.scores,
                                                  size=size), quality=90))  # fmt: skip
    small = loaded.array
    if max(small.shape[:2]) > side:
        small = resize_longer_side(small, side)
    atomic_write(thumb, encode_jpeg(draw_boxes(small, card.boxes, card.scores, size=size)))
    card.drawn = True
    card.notes.extend(notes)
    return {tkey: {"notes": notes}}


def _href(path: Path, base: Path) -> str:
    """A relative URL from the folder ``base`` to ``path``, percent-encoded."""
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
    return quote(os.fsencode(Path(rel).as_posix()))


def _read_manifest(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _prune(out: Path, used: set[str]) -> None:
    """Delete the pictures of earlier reports that this one does not show."""
    for sub in (THUMBS, FULL):
        folder = out / sub
        if folder.is_dir():
            for f in folder.iterdir():
                if _OURS.match(f.name) and f"{sub}/{f.name}" not in used:
                    f.unlink(missing_ok=True)


# -- the report ---------------------------------------------------------------------------
def write_report(
    results: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    fmt: str | None = None,
    images_root: str | os.PathLike[str] | None = None,
    thumb_side: int = THUMB_SIDE,
    workers: int | None = None,
    events: Events | None = None,
) -> ReportSummary:
    """Write the HTML report of the output ``results`` (a folder for ``voc``).

    Args:
        results: any output of ``discover boxes`` (JSONL, COCO, CSV, VOC folder).
        out: the report folder (default :func:`default_report_dir`); it gets
            ``index.html``, ``thumbs/`` and ``full/``.
        fmt: the output's format (default: from its name or layout).
        images_root: the folder the image names are relative to (default: the working
            directory the run recorded, else the current one).
        thumb_side: longer side of the thumbnails, in pixels.
        workers: threads reading and drawing images (default: up to 4).
        events: progress callbacks (one :meth:`~discover.events.Events.advance` per image).

    Raises:
        UsageError: a missing or unreadable output, a bad format, a report folder that
            cannot be made, an ``images_root`` that is not a folder.
    """
    t0 = time.perf_counter()
    events = events or Events()
    results = Path(results)
    fmt, records, corrupt, sidecar = _read_run(results, fmt)
    out_dir = check_report_dir(out if out is not None else default_report_dir(results))
    if out_dir.resolve() == results.resolve():
        raise UsageError(f"the report cannot go into the results folder {results} itself")
    if images_root is not None and not Path(images_root).is_dir():
        raise UsageError(f"--images-root {images_root} is not a folder")
    cwd = (sidecar or {}).get("cwd")
    root = Path(images_root or (cwd if isinstance(cwd, str) and cwd else os.getcwd()))
    cards = _cards(records, root)
    viz = _viz_pictures(sidecar)
    for card in cards:
        card.viz = viz.get(card.name)
    if corrupt:
        events.warn(f"{results}: {corrupt} unreadable line(s) or row(s) skipped")
    try:
        (out_dir / THUMBS).mkdir(parents=True, exist_ok=True)
        (out_dir / FULL).mkdir(exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the report folder {out_dir}: {first_line(e)}") from None
    old = _read_manifest(out_dir / THUMBS / MANIFEST)
    manifest: dict[str, Any] = {}
    summary = ReportSummary(page=out_dir / PAGE, images=len(cards))
    events.start(len(cards), "report")
    pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1))
    try:
        for card, entry in zip(
            cards, pool.map(lambda c: _pictures(c, out_dir, old, thumb_side), cards), strict=True
        ):
            manifest.update(entry)
            summary.drawn += card.drawn
            summary.up_to_date += bool(card.thumb) and not card.drawn
            summary.missing += card.lost
            events.advance(f"{summary.drawn} drawn, {summary.up_to_date} up to date")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    summary.boxes = sum(len(c.boxes) for c in cards)
    summary.failures = sum(c.kind == "failed" for c in cards)
    summary.no_box = sum(c.kind == "nobox" for c in cards)
    if summary.missing:
        first = next(c for c in cards if c.lost)
        events.warn(
            f"{summary.missing} of {len(cards)} images not found or not readable under {root} "
            f"(e.g. {first.name}: {first.notes[0]}); pass --images-root if they moved"
        )
    page = render_page(cards, results=results, fmt=fmt, sidecar=sidecar, root=root)
    atomic_write(summary.page, page.encode("utf-8", "replace"))
    atomic_write(out_dir / THUMBS / MANIFEST, json.dumps(manifest))
    _prune(out_dir, {c.thumb for c in cards if c.thumb} | {c.full for c in cards if c.full})
    summary.elapsed = time.perf_counter() - t0
    return summary


# -- the page -----------------------------------------------------------------------------
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt_score(s: float | None) -> str:
    return "–" if s is None else f"{s:.3g}"


def _settings_rows(results: Path, fmt: str, sidecar: dict | None, root: Path) -> list[tuple]:
    rows: list[tuple[str, Any]] = [("results", f"{results} ({fmt})")]
    if sidecar is None:
        rows.append(("settings", f"not recorded ({settings_path(results, fmt).name} is missing)"))
    else:
        for key in ("written", "regdiscover", "cwd", "viz"):
            if sidecar.get(key) is not None:
                rows.append((key, sidecar[key]))
        for key, value in (sidecar.get("settings") or {}).items():
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items()) or "defaults"
            rows.append((key, "none" if value is None else value))
    rows.append(("images root", root))
    return rows


def _distribution(tops: Sequence[float]) -> tuple[str, float]:
    """The summary of the top scores (HTML) and the page's default low-score threshold
    (their lower quartile)."""
    if not tops:
        return "<p>No scores: no image has a box.</p>", 0.0
    q = np.percentile(np.asarray(tops, dtype=np.float64), [0, 25, 50, 75, 100])
    lo, hi = float(q[0]), float(q[4])
    counts, _ = np.histogram(tops, bins=_BINS, range=(lo, hi if hi > lo else lo + 1))
    peak = max(1, int(counts.max()))
    bars = "".join(
        f'<rect x="{i * 10 + 1}" y="{60 - 58 * c / peak:.1f}" width="8" '
        f'height="{58 * c / peak:.1f}"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    w = _BINS * 10
    svg = (
        f'<svg id="hist" viewBox="0 0 {w} 72" width="{w * 1.5:.0f}" height="108" role="img" '
        f'aria-label="histogram of the top scores" data-lo="{lo!r}" data-hi="{hi!r}">{bars}'
        f'<text x="0" y="71">{_fmt_score(lo)}</text>'
        f'<text x="{w}" y="71" text-anchor="end">{_fmt_score(hi)}</text>'
        '<line id="tline" x1="0" x2="0" y1="0" y2="60"/></svg>'
    )
    text = " · ".join(
        f"{k} {_fmt_score(float(v))}"
        for k, v in zip(("min", "q1", "median", "q3", "max"), q, strict=True)
    )
    return f"<p>Top score per boxed image: {_e(text)}</p>{svg}", float(f"{q[1]:.3g}")


def _card_html(c: _Card) -> str:
    score = "" if c.top is None else repr(c.top)
    if c.thumb:
        alt = _e(f"{c.name}: {len(c.boxes)} box(es)")
        img = f'<img loading="lazy" decoding="async" src="{_e(c.thumb)}" alt="{alt}">'
        pic = f'<a class="pic" href="{_e(c.full)}" title="full-size figure">{img}</a>'
    else:
        pic = f'<div class="pic none">{_e(c.notes[0] if c.notes else "no picture")}</div>'
    if c.error:
        meta = "failed"
    elif not c.boxes:
        meta = "no box"
    else:
        n = len(c.boxes)
        meta = f"{n} box{'es' if n > 1 else ''} · top {_fmt_score(c.top)}"
        if n > 1:
            meta += " (" + ", ".join(_fmt_score(s) for s in c.scores[1:4]) + ("…" if n > 4 else "")
            meta += ")"
    if c.width and c.height:
        meta += f" · {c.width}×{c.height}"
    extra = f'<div class="err">{_e(c.error)}</div>' if c.error else ""
    extra += "".join(f'<div class="note">{_e(n)}</div>' for n in c.notes if c.thumb)
    return (
        f'<figure class="card{" lost" if c.lost else ""}" data-i="{c.index}" '
        f'data-kind="{c.kind}" data-score="{score}">'
        f'{pic}<figcaption><div class="name" title="{_e(c.path)}">{_e(c.name)}</div>'
        f'<div class="meta">{_e(meta)}</div>{extra}</figcaption></figure>'
    )


def render_page(
    cards: Sequence[_Card],
    *,
    results: Path,
    fmt: str,
    sidecar: dict[str, Any] | None,
    root: Path,
) -> str:
    """The report page (one self-contained HTML document) of ``cards``."""
    n = len(cards)
    failed = sum(c.kind == "failed" for c in cards)
    nobox = sum(c.kind == "nobox" for c in cards)
    missing = sum(c.lost for c in cards)
    boxes = sum(len(c.boxes) for c in cards)
    tops = [c.top for c in cards if c.kind == "ok" and c.top is not None]
    dist, threshold = _distribution(tops)
    settings = "".join(
        f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in _settings_rows(results, fmt, sidecar, root)
    )
    title = f"regdiscover report: {results.name}"
    stats = [("images", n), ("boxes", boxes), ("failures", failed), ("no box", nobox),
             ("images missing", missing)]  # fmt: skip
    facts = "".join(f"<li><b>{v}</b> {_e(k)}</li>" for k, v in stats)
    body = "\n".join(_card_html(c) for c in cards)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src 'self' file:; \
style-src 'unsafe-inline'; script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style></head>
<body>
<header><h1>{_e(title)}</h1><ul class="facts">{facts}</ul></header>
<section class="top">
<details class="settings" open><summary>Settings</summary><dl>{settings}</dl></details>
<div class="dist"><h2>Scores</h2>{dist}</div>
</section>
<nav class="bar">
<label>Sort <select id="sort">
<option value="file">file order</option>
<option value="desc">score, highest first</option>
<option value="asc">score, lowest first</option></select></label>
<span class="filters">
<button type="button" data-filter="all" aria-pressed="true">All <span>{n}</span></button>
<button type="button" data-filter="failed" aria-pressed="false">Failures \
<span>{failed}</span></button>
<button type="button" data-filter="nobox" aria-pressed="false">No box <span>{nobox}</span></button>
<button type="button" data-filter="low" aria-pressed="false">Low score <span id="n-low">0</span>\
</button></span>
<label>below <input id="threshold" type="number" step="any" value="{threshold!r}"></label>
<span class="shown"><span id="shown">{n}</span> of {n} shown</span>
</nav>
<main id="cards">
{body}
</main>
<script>{_JS}</script>
</body></html>
"""


_CSS = """
:root{--fg:#1d2330;--muted:#5b6475;--line:#d8dce4;--bg:#f5f6f8;--card:#fff;--accent:#2f6fdf;
--bad:#c62828;--warn:#b26a00}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;
color:var(--fg);background:var(--bg)}
header{padding:12px 20px 4px}
h1{font-size:18px;margin:0 0 6px;word-break:break-all}
h2{font-size:14px;margin:0 0 4px}
.facts{display:flex;flex-wrap:wrap;gap:6px 18px;list-style:none;margin:0;padding:0;
color:var(--muted)}
.facts b{color:var(--fg);font-size:16px}
.top{display:flex;flex-wrap:wrap;gap:12px 28px;padding:6px 20px}
.settings dl{display:grid;grid-template-columns:repeat(2,max-content minmax(0,30ch));
gap:1px 12px;margin:4px 0 0;font-size:12px}
.settings dt{font-weight:600;color:var(--muted)}
.settings dd{margin:0;overflow-wrap:anywhere}
.dist{max-width:380px}
.dist p{margin:0 0 4px;color:var(--muted)}
#hist rect{fill:#8aa6d8}
#hist text{font-size:8px;fill:var(--muted)}
#tline{stroke:var(--bad);stroke-width:1.2}
.bar{position:sticky;top:0;z-index:1;display:flex;flex-wrap:wrap;align-items:center;gap:8px 14px;
padding:8px 20px;background:rgba(245,246,248,.96);border-bottom:1px solid var(--line)}
.filters{display:flex;gap:4px}
button{font:inherit;padding:3px 10px;border:1px solid var(--line);border-radius:14px;
background:var(--card);cursor:pointer}
button[aria-pressed="true"]{background:var(--accent);border-color:var(--accent);color:#fff}
button span{font-weight:600}
select,input{font:inherit}
#threshold{width:7em}
.shown{color:var(--muted);margin-left:auto}
main{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:10px;
padding:12px 20px}
.card{margin:0;background:var(--card);border:1px solid var(--line);border-radius:6px;
overflow:hidden;content-visibility:auto;contain-intrinsic-size:auto 230px}
.card[data-kind="failed"]{border-color:var(--bad)}
.card.low{border-color:var(--warn);box-shadow:0 0 0 1px var(--warn)}
.card.lost{border-style:dashed;border-color:var(--muted)}
[hidden]{display:none!important}
.pic{display:flex;align-items:center;justify-content:center;height:160px;background:#e9ebef}
.pic img{max-width:100%;max-height:160px;display:block}
.pic.none{color:var(--muted);font-size:12px;padding:8px;text-align:center}
figcaption{padding:5px 7px 7px;font-size:12px}
.name{font-weight:600;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.meta{color:var(--muted)}
.err{color:var(--bad);word-break:break-word}
.note{color:var(--warn);word-break:break-word}
"""

_JS = """
"use strict";
(function () {
  const grid = document.getElementById("cards");
  const cards = Array.from(grid.children);
  const items = cards.map((el) => ({
    el, i: Number(el.dataset.i), kind: el.dataset.kind,
    score: el.dataset.score === "" ? null : Number(el.dataset.score),
  }));
  const sort = document.getElementById("sort");
  const input = document.getElementById("threshold");
  const nLow = document.getElementById("n-low");
  const shown = document.getElementById("shown");
  const buttons = Array.from(document.querySelectorAll("button[data-filter]"));
  const hist = document.getElementById("hist");
  const line = document.getElementById("tline");
  let filter = "all";
  const threshold = () => {
    const t = parseFloat(input.value);
    return Number.isFinite(t) ? t : -Infinity;
  };
  const low = (c, t) => c.kind === "ok" && c.score !== null && c.score < t;
  function keep(c, t) {
    if (filter === "failed") return c.kind === "failed";
    if (filter === "nobox") return c.kind === "nobox";
    if (filter === "low") return low(c, t);
    return true;
  }
  function order() {
    // file order, or by top score (images without one last, in file order)
    const how = sort.value;
    const sign = how === "desc" ? -1 : 1;
    const sorted = items.slice().sort((a, b) => {
      if (how === "file") return a.i - b.i;
      const x = a.score, y = b.score;
      if (x === null || y === null) return x === y ? a.i - b.i : x === null ? 1 : -1;
      return sign * (x - y) || a.i - b.i;
    });
    grid.replaceChildren(...sorted.map((c) => c.el));
  }
  function update() {
    const t = threshold();
    let n = 0, nl = 0;
    for (const c of items) {
      const isLow = low(c, t);
      nl += isLow;
      if (c.el.classList.contains("low") !== isLow) c.el.classList.toggle("low", isLow);
      const k = keep(c, t);
      if (c.el.hidden === k) c.el.hidden = !k;
      n += k;
    }
    nLow.textContent = String(nl);
    shown.textContent = String(n);
    if (hist && line) {
      const lo = Number(hist.dataset.lo), hi = Number(hist.dataset.hi);
      const w = hist.viewBox.baseVal.width;
      const x = hi > lo ? Math.min(w, Math.max(0, ((t - lo) / (hi - lo)) * w)) : 0;
      line.setAttribute("x1", String(x));
      line.setAttribute("x2", String(x));
    }
  }
  buttons.forEach((b) =>
    b.addEventListener("click", () => {
      filter = b.dataset.filter;
      buttons.forEach((o) => o.setAttribute("aria-pressed", String(o === b)));
      update();
    })
  );
  sort.addEventListener("change", order);
  input.addEventListener("input", update);
  order();
  update();
})();
"""
