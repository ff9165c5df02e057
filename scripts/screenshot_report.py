"""Screenshot of a report page in headless Chromium (how samples/figures/report.png is made).

    discover boxes samples/ --model vit_small_patch14_dinov2.imgfocus --report out/report
    python scripts/screenshot_report.py out/report/index.html samples/figures/report.png

Needs the Python package ``playwright`` (the ``test`` extra) and a Chromium: Debian's
``chromium`` package, or ``--browser PATH`` (``playwright install`` is not needed).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update",
        "--disable-sync"]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("page", type=Path, help="the report's index.html")
    ap.add_argument("png", type=Path, help="the screenshot to write")
    ap.add_argument("--browser", help="Chromium executable (default: chromium on the PATH)")
    ap.add_argument("--width", type=int, default=1200)
    ap.add_argument("--height", type=int, default=860)
    ap.add_argument("--colors", type=int, default=256, help="palette size (0: full colour)")
    a = ap.parse_args()
    exe = a.browser or shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe or not a.page.is_file():
        print(f"error: no Chromium found or no page {a.page}", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
        ctx = pw.chromium.launch_persistent_context(
            profile, executable_path=exe, headless=True, args=ARGS,
            viewport={"width": a.width, "height": a.height},
        )  # fmt: skip
        page = ctx.new_page()
        page.on("console", lambda m: m.type == "error" and errors.append(m.text))
        page.goto(a.page.resolve().as_uri())
        page.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
        a.png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(a.png))
        ctx.close()
    if a.colors:  # a palette PNG: a third of the size, for the README
        from PIL import Image

        with Image.open(a.png) as im:
            small = im.convert("RGB").quantize(a.colors, dither=Image.Dither.NONE)
        small.save(a.png, optimize=True)
    for e in errors:
        print(f"console error: {e}", file=sys.stderr)
    print(f"{a.png}: {a.png.stat().st_size // 1024} KB")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
