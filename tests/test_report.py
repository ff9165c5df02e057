"""The HTML report (discover.report, ``discover report`` and ``discover boxes --report``).

Fast tests read the page with the standard library's HTML parser: its cards, counts,
settings, escaping, the pictures beside it (drawn once, redrawn when their image or boxes
change), every output format, image paths and one-line errors. The last test opens the
page in a real headless Chromium (driven by Playwright) and clicks through it; it skips
when no browser or driver is installed (see :func:`chromium`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from conftest import save, scene
from PIL import Image

from discover.outputs import FORMATS, open_writer, settings_path
from discover.report import write_report
from discover.runs import Events

WEIRD = 'photos/<b>&"x".png'
SETTINGS = {"model": "vit_test", "method": "lost", "method_params": {"k_patches": 100},
            "max_size": None, "note": "</script><script>alert(1)</script>"}  # fmt: skip


def rec(name, boxes=(), scores=(), error=None, size=(140, 112)):
    return {
        "image": name,
        "width": None if error else size[0],
        "height": None if error else size[1],
        "boxes": [list(b) for b in boxes],
        "scores": list(scores),
        "seed": [1, 1] if boxes else None,
        "error": error,
    }


BOX = (42, 28, 98, 84)
RECORDS = [
    rec("photos/a.png", [BOX], [5.0]),
    rec("photos/b.png", [BOX, (0, 0, 140, 112)], [0.3, 0.2]),
    rec("photos/c.jpg", error="empty file (0 bytes)"),
    rec("photos/d.png"),
    rec(WEIRD, [BOX], [2.0]),
    rec("photos/gone.png", [BOX], [1.0]),
    rec("photos/e.png", [(10, 10, 60, 50)], [0.9]),
]
PRESENT = [r["image"] for r in RECORDS if r["image"] not in ("photos/gone.png", "photos/c.jpg")]
KINDS = {"photos/c.jpg": "failed", "photos/d.png": "nobox"}


def make_run(folder: Path, fmt: str = "jsonl") -> Path:
    """Images under ``folder/photos`` and an output of :data:`RECORDS` written from
    ``folder`` (so its sidecar records ``folder`` as the run's working directory)."""
    for name in PRESENT:
        save(folder / name, scene(140, 112, BOX))
    (folder / "photos" / "c.jpg").write_bytes(b"")
    return write_output(folder, fmt, RECORDS)


def write_output(folder: Path, fmt: str, records: list[dict]) -> Path:
    out = folder / ("results" if fmt == "voc" else f"results.{fmt}")
    here = os.getcwd()
    os.chdir(folder)
    try:
        with open_writer(out.name, fmt, settings=SETTINGS) as w:
            for r in records:
                w.write(r)
    finally:
        os.chdir(here)
    return out


class Page(HTMLParser):
    """The cards of a report page (attributes and texts) and every tag seen."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.cards: list[dict] = []
        self.tags: list[tuple[str, dict]] = []
        self.in_cards = False
        self._div: str | None = None
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "main":
            self.in_cards = True
        elif tag == "figure":
            self.cards.append({**a, "name": "", "meta": "", "img": None, "href": None, "tags": []})
        elif self.in_cards and self.cards:
            card = self.cards[-1]
            card["tags"].append(tag)
            if tag == "img":
                card["img"] = a
            elif tag == "a":
                card["href"] = a.get("href")
            elif tag == "div":
                self._div = a.get("class")

    def handle_endtag(self, tag):
        if tag == "main":
            self.in_cards = False
        if tag == "div":
            self._div = None

    def handle_data(self, data):
        self.text.append(data)
        if self.in_cards and self.cards and self._div:
            key = self._div.split()[-1]
            self.cards[-1][key] = self.cards[-1].get(key, "") + data

    def card(self, name: str) -> dict:
        return next(c for c in self.cards if c["name"] == name)


def read_page(summary) -> Page:
    return Page(summary.page.read_text(encoding="utf-8"))


class Recorder(Events):
    def __init__(self) -> None:
        self.started: list[tuple[int, str]] = []
        self.advanced = 0
        self.warnings: list[str] = []

    def start(self, total, description):
        self.started.append((total, description))

    def advance(self, status):
        self.advanced += 1

    def warn(self, text):
        self.warnings.append(text)


# -- the page -------------------------------------------------------------------------------
def test_page_has_a_card_per_record_with_counts_settings_and_pictures(tmp_path, monkeypatch):
    results = make_run(tmp_path / "run")
    monkeypatch.chdir(tmp_path)  # the report runs elsewhere: names start at the run's cwd
    events = Recorder()
    s = write_report(results, out=tmp_path / "rep", events=events)
    assert s.page == tmp_path / "rep" / "index.html"
    assert (s.images, s.boxes, s.failures, s.no_box) == (7, 6, 1, 1)
    assert s.missing == 1  # gone.png (the run could not read c.jpg either: not counted)
    assert s.drawn == len(PRESENT) and s.up_to_date == 0
    assert events.started == [(7, "report")] and events.advanced == 7
    assert len(events.warnings) == 1 and "1 of 7 images" in events.warnings[0]
    assert "photos/gone.png: image not found" in events.warnings[0]

    page = read_page(s)
    assert [c["name"] for c in page.cards] == [r["image"] for r in RECORDS]
    for c, r in zip(page.cards, RECORDS, strict=True):
        assert c["data-kind"] == KINDS.get(r["image"], "ok")
        top = max(r["scores"]) if r["scores"] else None
        assert (float(c["data-score"]) if c["data-score"] else None) == top
    for name in PRESENT:  # a lazy thumbnail beside the page, linking to a full-size figure
        card = page.card(name)
        img = card["img"]
        assert img["loading"] == "lazy" and img["src"].startswith("thumbs/")
        assert (s.page.parent / img["src"]).is_file()
        full = s.page.parent / unquote(card["href"])
        assert card["href"].startswith("full/") and full.is_file()
        with Image.open(full) as im:
            assert im.size == (140, 112)  # full size
    assert page.card("photos/gone.png")["img"] is None
    assert page.card("photos/gone.png")["none"] == "image not found"
    assert page.card("photos/c.jpg")["err"] == "empty file (0 bytes)"
    assert "image not readable" in page.card("photos/c.jpg")["none"]
    text = " ".join(page.text)
    for fact in ("7 images", "6 boxes", "1 failures", "1 no box", "1 images missing"):
        assert fact in " ".join(text.split())
    assert "vit_test" in text and "k_patches=100" in text and str(tmp_path / "run") in text
    # every boxed image's top score, and the default threshold is their lower quartile
    tops = [5.0, 0.3, 2.0, 1.0, 0.9]
    threshold = next(a for t, a in page.tags if a.get("id") == "threshold")
    assert float(threshold["value"]) == pytest.approx(np.percentile(tops, 25), rel=1e-3)


def test_names_and_settings_are_escaped(tmp_path):
    results = make_run(tmp_path)
    s = write_report(results, out=tmp_path / "rep")
    raw = s.page.read_text(encoding="utf-8")
    page = Page(raw)
    assert page.card(WEIRD)["meta"].startswith("1 box")  # the name is text, whole
    assert all("b" not in c["tags"] for c in page.cards)  # no <b> element came from it
    assert "<b>&" not in raw and "&lt;b&gt;&amp;&quot;x&quot;.png" in raw
    assert raw.count("<script>") == 1  # the page's own; the setting's is text
    assert "&lt;/script&gt;&lt;script&gt;alert(1)" in raw
    # the page needs nothing from a network: no URL with a scheme, no inlined blobs
    urls = [a.get("src") or a.get("href") for _, a in page.tags if a.get("src") or a.get("href")]
    assert urls and all(":" not in u for u in urls)
    assert "base64" not in raw and "http://" not in raw and "https://" not in raw
    assert "<style>" in raw and "<link" not in raw


def test_thumbnails_are_drawn_once_and_redrawn_when_their_image_or_boxes_change(tmp_path):
    results = make_run(tmp_path)
    rep = tmp_path / "rep"
    first = write_report(results, out=rep)
    thumbs = {p.name: p.stat().st_mtime_ns for p in (rep / "thumbs").glob("*.jpg")}
    fulls = {p.name: p.stat().st_mtime_ns for p in (rep / "full").glob("*.jpg")}
    assert len(thumbs) == len(fulls) == first.drawn == len(PRESENT)

    again = write_report(results, out=rep)
    assert again.drawn == 0 and again.up_to_date == len(PRESENT)
    assert {p.name: p.stat().st_mtime_ns for p in (rep / "thumbs").glob("*.jpg")} == thumbs
    assert {p.name: p.stat().st_mtime_ns for p in (rep / "full").glob("*.jpg")} == fulls
    assert read_page(again).cards == read_page(first).cards

    # new boxes for a.png (a re-run of boxes), and e.png replaced by another picture
    changed = [dict(r, boxes=[[0, 0, 70, 56]]) if r["image"] == "photos/a.png" else r
               for r in RECORDS]  # fmt: skip
    results = write_output(tmp_path, "jsonl", changed)
    old_a = read_page(first).card("photos/a.png")["img"]["src"]
    save(tmp_path / "photos" / "e.png", scene(140, 112, (0, 0, 30, 30)))
    os.utime(tmp_path / "photos" / "e.png", ns=(1, 10**18))  # another time for certain
    third = write_report(results, out=rep)
    assert third.drawn == 2 and third.up_to_date == len(PRESENT) - 2
    page = read_page(third)
    assert page.card("photos/a.png")["img"]["src"] != old_a
    assert not (rep / old_a).exists()  # what nothing shows any more is deleted
    now = {p.name for p in (rep / "thumbs").glob("*.jpg")}
    assert len(now) == len(PRESENT) and len(now & set(thumbs)) == len(PRESENT) - 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_output_format_gives_the_same_cards(tmp_path, fmt):
    results = make_run(tmp_path, fmt)
    s = write_report(results, out=tmp_path / "rep")
    page = read_page(s)
    assert [c["name"] for c in page.cards] == [r["image"] for r in RECORDS]
    kinds = [c["data-kind"] for c in page.cards]
    assert kinds == [KINDS.get(r["image"], "ok") for r in RECORDS]
    assert [c["data-score"] for c in page.cards] == ["5.0", "0.3", "", "", "2.0", "1.0", "0.9"]
    assert "b.png" in page.card("photos/b.png")["img"]["alt"]
    assert page.card("photos/b.png")["meta"].startswith("2 boxes · top 0.3 (0.2)")
    assert (s.images, s.boxes, s.failures, s.no_box, s.missing) == (7, 6, 1, 1, 1)
    assert "vit_test" in " ".join(page.text)


def test_coco_without_its_sidecar_takes_the_settings_from_its_info(tmp_path, monkeypatch):
    results = make_run(tmp_path, "coco")
    settings_path(results, "coco").unlink()
    monkeypatch.chdir(tmp_path)  # no recorded cwd: names start at the current folder
    page = read_page(write_report(results, out=tmp_path / "rep"))
    assert "vit_test" in " ".join(page.text)
    assert page.card("photos/a.png")["img"] is not None


def test_images_root_overrides_the_recorded_working_directory(tmp_path):
    results = make_run(tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "run" / "photos", moved / "photos")
    events = Recorder()
    s = write_report(results, out=tmp_path / "rep", events=events)
    assert s.missing == len(RECORDS) - 1 and "--images-root" in events.warnings[-1]
    assert all(c["img"] is None for c in read_page(s).cards)
    s = write_report(results, out=tmp_path / "rep", images_root=moved)
    assert s.missing == 1 and s.drawn == len(PRESENT)


def test_a_changed_image_size_is_noted_on_its_card(tmp_path):
    results = make_run(tmp_path)
    save(tmp_path / "photos" / "a.png", scene(70, 56, (0, 0, 10, 10)))
    s = write_report(results, out=tmp_path / "rep")
    note = "the image is 70x56 now, the run saw 140x112"
    assert read_page(s).card("photos/a.png")["note"] == note
    assert read_page(write_report(results, out=tmp_path / "rep")).card("photos/a.png")["note"] == (
        note  # kept by a re-run that draws nothing
    )


# -- the command line ---------------------------------------------------------------------
def _one_error_line(err: str, *words: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w in lines[0], (w, err)


def test_report_command_and_its_one_line_errors(tmp_path, run_cli):
    results = make_run(tmp_path)
    code, _, err = run_cli("report", results, "--out", tmp_path / "rep")
    assert code == 0, err
    assert "report of 7 images" in err and str(tmp_path / "rep" / "index.html") in err
    code, _, err = run_cli("report", results)  # default folder: beside the results
    assert code == 0 and (tmp_path / "results.jsonl.report" / "index.html").is_file()

    (tmp_path / "file").write_text("x")
    (tmp_path / "junk.jsonl").write_text("not json\n{also not\n")
    (tmp_path / "odd.txt").write_text("{}\n")
    for args, words in [
        (["report", tmp_path / "nope.jsonl"], ["nope.jsonl", "no such"]),
        (["report", results, "--format", "xml"], ["--format"]),
        (["report", tmp_path / "odd.txt"], ["cannot tell the format"]),
        (["report", results, "--format", "voc"], ["not a voc output"]),
        (["report", results, "--out", tmp_path / "file"], ["is a file"]),
        (["report", results, "--images-root", tmp_path / "file"], ["--images-root"]),
        (["report", tmp_path / "junk.jsonl"], ["no jsonl record"]),
        (["report", tmp_path / "photos", "--format", "voc"], ["not a regdiscover VOC"]),
    ]:
        code, _, err = run_cli(*args)
        assert code == 2, (args, err)
        _one_error_line(err, *words)


def test_boxes_report_links_the_viz_pictures(tmp_path, run_cli, fast_models, checkpoint):
    from conftest import CLI_METHOD_OPTS, MODEL

    imgs = tmp_path / "imgs"
    save(imgs / "a.png", scene(140, 112, BOX))
    save(imgs / "a.jpg", scene(140, 112, (0, 0, 56, 56)), quality=95)  # same stem
    (imgs / "bad.png").write_bytes(b"")
    model = ["--model", MODEL, "--checkpoint", checkpoint, *CLI_METHOD_OPTS]
    out, viz, rep = tmp_path / "r.csv", tmp_path / "viz", tmp_path / "rep"
    code, _, err = run_cli("boxes", imgs, "--format", "csv", "--out", out, "--viz", viz,
                           "--report", rep, *model)  # fmt: skip
    assert code == 0, err
    assert "report of 3 images" in err and "1 failures" in err
    page = read_page(write_report(out, out=rep))
    index = {json.loads(line)["image"]: json.loads(line)["png"]
             for line in (viz / "index.jsonl").read_text().splitlines()}  # fmt: skip
    assert len(index) == 2
    for name, png in index.items():  # each boxed image links its own --viz picture
        href = page.card(name)["href"]
        assert href == f"../viz/{png}" and (rep / href).resolve() == (viz / png).resolve()
    assert not list((rep / "full").iterdir())  # nothing drawn twice
    assert page.card((imgs / "bad.png").as_posix())["data-kind"] == "failed"

    code, _, err = run_cli("boxes", imgs, "--out", out, "--report", tmp_path / "r.csv", *model)
    assert code == 2
    _one_error_line(err, "is a file")


def test_boxes_interrupted_writes_no_report(
    tmp_path, run_cli, fast_models, checkpoint, interrupt_run
):
    from conftest import CLI_METHOD_OPTS, MODEL

    for i in range(3):
        save(tmp_path / "imgs" / f"{i}.png", scene(140, 112, BOX))
    model = ["--model", MODEL, "--checkpoint", checkpoint, *CLI_METHOD_OPTS]
    args = ["boxes", tmp_path / "imgs", "--out", tmp_path / "r.jsonl", "--report", tmp_path / "rep"]
    interrupt_run(1)
    code, _, err = run_cli(*args, *model)
    assert code == 130 and "report of" not in err
    assert not (tmp_path / "rep" / "index.html").exists()
    interrupt_run(None)
    code, _, err = run_cli(*args, "--resume", *model)
    assert code == 0, err
    assert len(read_page(write_report(tmp_path / "r.jsonl", out=tmp_path / "rep")).cards) == 3


# -- in a browser ---------------------------------------------------------------------------
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync"]  # fmt: skip


def chromium() -> str:
    """A Chromium to drive: ``$REGDISCOVER_CHROMIUM``, else one on the PATH (Debian's
    ``chromium`` package, or Chrome). Skips the test when there is none, or no Playwright."""
    pytest.importorskip("playwright.sync_api", reason="the Python package playwright is needed")
    for candidate in (os.environ.get("REGDISCOVER_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome", "google-chrome-stable"):  # fmt: skip
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    pytest.skip("no Chromium found (apt-get install chromium, or set $REGDISCOVER_CHROMIUM)")


def test_the_page_in_a_headless_browser(tmp_path):
    exe = chromium()
    from playwright.sync_api import sync_playwright

    results = make_run(tmp_path)
    s = write_report(results, out=tmp_path / "rep")
    problems: list[str] = []
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=exe, headless=True, args=BROWSER_ARGS,
            viewport={"width": 1200, "height": 3000},
        )  # fmt: skip
        try:
            page = ctx.new_page()
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.on("requestfailed", lambda r: problems.append(f"failed: {r.url}"))
            page.on("request", lambda r: r.url.startswith("file:") or problems.append(r.url))
            page.goto(s.page.resolve().as_uri())
            page.wait_for_load_state("load")

            def shown() -> list[str]:
                return page.eval_on_selector_all(
                    ".card:not([hidden]) .name", "els => els.map(e => e.textContent)"
                )

            assert page.locator(".card").count() == len(RECORDS)
            assert shown() == [r["image"] for r in RECORDS]
            page.wait_for_function(
                "() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
            )  # every thumbnail loads (a wrong path or the page's CSP would stop it)
            assert page.locator(".card img").count() == len(PRESENT)

            page.select_option("#sort", "desc")
            assert shown() == ["photos/a.png", WEIRD, "photos/gone.png", "photos/e.png",
                               "photos/b.png", "photos/c.jpg", "photos/d.png"]  # fmt: skip
            page.select_option("#sort", "asc")
            assert shown() == ["photos/b.png", "photos/e.png", "photos/gone.png", WEIRD,
                               "photos/a.png", "photos/c.jpg", "photos/d.png"]  # fmt: skip

            page.click("button[data-filter=failed]")
            assert shown() == ["photos/c.jpg"] and page.inner_text("#shown") == "1"
            page.click("button[data-filter=nobox]")
            assert shown() == ["photos/d.png"]
            page.click("button[data-filter=low]")
            page.fill("#threshold", "1.5")
            assert shown() == ["photos/b.png", "photos/e.png", "photos/gone.png"]
            assert page.inner_text("#n-low") == "3"
            page.fill("#threshold", "0.25")
            assert shown() == [] and page.inner_text("#n-low") == "0"
            page.click("button[data-filter=all]")
            page.select_option("#sort", "file")
            assert shown() == [r["image"] for r in RECORDS]
            assert page.locator(".card.low").count() == 0
        finally:
            ctx.close()
    assert problems == []
