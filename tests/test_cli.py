"""The ``discover`` command line (discover.cli): ``boxes`` end to end on a folder of good
and bad files, every output format, --viz, --recursive, --resume, --max-size, the
options, and the one-line errors with exit code 2.

Commands run in-process through ``discover.cli.main`` (the console-script entry point)
with ``sys.argv`` patched; ``fast_models`` hands out a copy of the session model instead
of building it again from the checkpoint file. One test runs the real console script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLI_METHOD_OPTS, MODEL, save, scene, write_huge_png
from PIL import Image

from discover.models import DEFAULT_MODEL
from discover.outputs import read_jsonl
from discover.pipeline import Detection, ImageResult
from discover.viz import draw_boxes, draw_result

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECT = (42, 28, 98, 84)  # in every 140x112 scene below
BOX = list(RECT)


def write_inputs(folder: Path) -> dict[str, dict]:
    """Good and bad files; returns name -> what the output must say about it."""
    folder.mkdir(parents=True, exist_ok=True)
    img = scene(140, 112, RECT)
    dark = scene(140, 112, RECT, colour=(0, 0, 0))[:, :, 0]
    expect: dict[str, dict] = {}

    def good(name, size=(140, 112), box=BOX):
        expect[name] = {"size": size, "box": box}

    save(folder / "a.png", img)
    good("a.png")
    save(folder / "B.JPG", img, quality=95)  # upper-case extension
    good("B.JPG")
    save(folder / "gray.png", dark)
    good("gray.png")
    rgba = np.dstack([img, np.full(img.shape[:2], 255, dtype=np.uint8)])
    save(folder / "rgba.png", rgba)
    good("rgba.png")
    Image.fromarray(img).quantize(colors=8).save(folder / "palette.png")
    good("palette.png")
    Image.fromarray(dark.astype(np.uint16) * 257).save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode.startswith("I")
    good("sixteen.png")
    Image.fromarray(img).convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    good("cmyk.jpg")
    upright = scene(98, 140, (28, 70, 84, 126))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright))).save(
        folder / "exif.jpg", quality=95, exif=exif
    )
    good("exif.jpg", size=(98, 140), box=[28, 70, 84, 126])

    def bad(name, reason):
        expect[name] = {"error": reason}

    (folder / "empty.jpg").write_bytes(b"")
    bad("empty.jpg", "empty file")
    noise = np.random.default_rng(0).integers(0, 255, (112, 140, 3), dtype=np.uint8)
    save(folder / "truncated.jpg", noise, quality=90)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    bad("truncated.jpg", "truncated")
    (folder / "[bold]notes.jpg").write_text("a text file, not a JPEG\n")  # rich markup in a name
    bad("[bold]notes.jpg", "not a readable image")
    save(folder / "tiny.png", np.zeros((10, 10, 3), dtype=np.uint8))
    bad("tiny.png", "smaller than one 14x14 patch")
    write_huge_png(folder / "huge.png")
    bad("huge.png", "too large: 20000x20000")
    (folder / "broken.jpg").symlink_to(folder / "gone.jpg")
    bad("broken.jpg", "broken symbolic link")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    return expect


def model_args(checkpoint: str) -> list[str]:
    return ["--model", MODEL, "--checkpoint", checkpoint, "--device", "cpu", *CLI_METHOD_OPTS]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    root = tmp_path_factory.mktemp("cli")
    return root, write_inputs(root / "imgs")


# ----------------------------------------------------------------------------- boxes


def test_boxes_jsonl_on_good_and_bad_files(inputs, run_cli, fast_models, checkpoint, monkeypatch):
    root, expect = inputs
    monkeypatch.chdir(root)
    code, out, err = run_cli(
        "boxes", "imgs", "--out", "results.jsonl", *model_args(checkpoint), "--batch-size", "2"
    )
    assert code == 0, err
    records = read_jsonl(root / "results.jsonl")
    names = [r["image"] for r in records]
    assert names == sorted(f"imgs/{n}" for n in expect)  # every image once, in order
    for r in records:
        e = expect[r["image"].removeprefix("imgs/")]
        assert set(r) == {"image", "width", "height", "boxes", "scores", "seed", "error"}
        if "error" in e:
            assert e["error"] in (r["error"] or ""), r
            assert r["boxes"] == [] and r["scores"] == [] and r["seed"] is None
            assert f"warning: {r['image']}: " in err  # verbatim, markup-like name included
        else:
            assert r["error"] is None, r
            assert (r["width"], r["height"]) == e["size"], r["image"]
            assert r["boxes"] == [e["box"]], r["image"]
            assert len(r["scores"]) == 1 and len(r["seed"]) == 2
    n_bad = sum("error" in e for e in expect.values())
    assert f"{len(expect)} images, {len(expect) - n_bad} boxes, {n_bad} failures" in err
    assert err.count("warning:") == n_bad
    assert "boxing" in err and f"{len(expect)}/{len(expect)}" in err  # the progress bar
    assert fast_models and fast_models[-1]["checkpoint"] == checkpoint


@pytest.mark.parametrize("fmt", ["coco", "csv", "voc"])
def test_boxes_other_formats(tmp_path, run_cli, fast_models, checkpoint, fmt):
    imgs = tmp_path / "imgs"
    save(imgs / "a.png", scene(140, 112, RECT))
    (imgs / "b.jpg").write_bytes(b"")
    out = tmp_path / ("voc" if fmt == "voc" else f"out.{fmt}")
    code, _, err = run_cli("boxes", imgs, "--out", out, "--format", fmt, *model_args(checkpoint))
    assert code == 0, err
    a, b = (imgs / "a.png").as_posix(), (imgs / "b.jpg").as_posix()
    if fmt == "coco":
        data = json.loads(out.read_text())
        assert [im["file_name"] for im in data["images"]] == [a, b]
        [ann] = data["annotations"]
        assert ann["image_id"] == data["images"][0]["id"] and ann["category_id"] == 1
        assert ann["bbox"] == [42, 28, 56, 56] and isinstance(ann["score"], float)
    elif fmt == "csv":
        import csv

        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        assert [(r["image"], r["x0"], r["y0"], r["x1"], r["y1"]) for r in rows] == [
            (a, "42", "28", "98", "84"),
            (b, "", "", "", ""),
        ]
        assert "empty file" in rows[1]["error"]
    else:
        import xml.etree.ElementTree as ET

        xmls = sorted(out.glob("*.xml"))
        assert len(xmls) == 2
        root = ET.parse(out / f"{a.strip('/').replace('/', '__')[:-4]}.xml").getroot()
        bb = root.find("object/bndbox")
        assert [int(bb.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")] == [43, 29, 98, 84]


def test_boxes_viz_and_recursive(tmp_path, run_cli, fast_models, checkpoint):
    imgs = tmp_path / "imgs"
    save(imgs / "a.png", scene(140, 112, RECT))
    save(imgs / "a.jpg", scene(140, 112, RECT), quality=95)  # same stem, other extension
    save(imgs / "sub" / "c.png", scene(140, 112, RECT))
    (imgs / "bad.png").write_bytes(b"")
    out, viz = tmp_path / "r.jsonl", tmp_path / "viz"
    code, _, err = run_cli("boxes", imgs, "--out", out, "--viz", viz, *model_args(checkpoint))
    assert code == 0, err
    assert len(read_jsonl(out)) == 3  # sub/ not entered
    pngs = sorted(p.name for p in viz.glob("*.png"))
    assert len(pngs) == 2  # one per boxed image; a.jpg and a.png do not overwrite each other
    drawn = np.asarray(Image.open(viz / pngs[0]).convert("RGB"))
    assert drawn.shape == (112, 140, 3)
    assert (np.abs(drawn.astype(int) - scene(140, 112, RECT)).sum(axis=2) > 30).any()
    assert ((drawn == (255, 255, 0)).all(axis=2)).sum() >= 100  # the seed patch (box on top)

    code, _, err = run_cli(
        "boxes", imgs, "--recursive", "--out", out, "--viz", viz, *model_args(checkpoint)
    )
    assert code == 0, err
    names = [r["image"] for r in read_jsonl(out)]
    assert names[-1] == (imgs / "sub" / "c.png").as_posix() and len(names) == 4
    assert len(list(viz.glob("*.png"))) == 3


def test_draw_result_overlays_exactly_the_mask_seed_and_box():
    img = np.full((56, 70, 3), 100, dtype=np.uint8)  # 4 x 5 patches of 14 px
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[1:3, 1:4] = True
    det = Detection(box=(14, 14, 56, 42), score=0.5, seed=(2, 3), mask=mask, patch_box=(1, 1, 4, 3))
    res = ImageResult("x", [det], width=70, height=56, grid=(4, 5), patch_size=14)
    out = draw_result(img, res)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (img == 100).all()  # drawn on a copy
    changed = (out != img).any(axis=2)
    # the mask (patch rows 1-2, cols 1-3: pixels y 14..41, x 14..55) is tinted all over,
    # its corners too (a bilinear upsampling of the patch mask used to round them off)
    assert changed[16:40, 16:54].all()
    assert changed[16, 16] and changed[16, 53] and changed[39, 16]
    # nothing far from the box changes
    assert not changed[:, 60:].any() and not changed[45:].any() and not changed[:10, :10].any()
    # the seed patch (row 2, col 3) is filled with the seed colour
    assert (out[30, 45] == (255, 255, 0)).all() and not (out[20, 45] == (255, 255, 0)).all()
    # twice the size: everything scales with the picture
    big = draw_result(np.full((112, 140, 3), 100, dtype=np.uint8), res)
    assert (big[60, 90] == (255, 255, 0)).all() and (big[0:20, 0:20] == 100).all()
    assert (big[33, 33] != 100).any()


def test_draw_boxes_scales_record_boxes_to_a_thumbnail():
    thumb = np.full((50, 70, 3), 100, dtype=np.uint8)  # a 700 x 500 picture at 1/10
    out = draw_boxes(thumb, [[100, 200, 400, 450], [0, 0, 700, 500]], [3.5, None], size=(700, 500))
    assert (thumb == 100).all()  # drawn on a copy
    changed = (out != thumb).any(axis=2)
    assert changed[20:45, 10].all() and changed[20:45, 39].all()  # the first box's sides
    assert changed[44, 10:40].all()
    assert not changed[25:40, 15:35].any()  # its inside is left alone
    assert changed[49, :].all() and changed[:, 69].all()  # the whole-image box, no label
    assert not changed[5:15, 45:65].any() and not changed[4:10, 4:9].any()
    # the score label sits on the first box's top-left corner, in its colour
    assert (out[12:19, 11:20] == (255, 64, 64)).all(axis=2).any()
    same = draw_boxes(thumb, [[10, 20, 40, 45]], [1.0])  # in the thumbnail's own pixels
    assert (same != thumb).any(axis=2)[20:45, 10].all()


def test_boxes_resume_after_a_torn_line_and_after_ctrl_c(
    tmp_path, run_cli, fast_models, checkpoint, interrupt_run
):
    imgs = tmp_path / "imgs"
    for i in range(5):
        save(imgs / f"{i}.png", scene(140, 112, RECT))
    out = tmp_path / "r.jsonl"
    args = ["boxes", imgs, "--out", out, *model_args(checkpoint)]
    code, _, err = run_cli(*args)
    assert code == 0, err
    full = read_jsonl(out)
    assert len(full) == 5

    # a run killed while writing its last line
    data = out.read_bytes()
    out.write_bytes(data[: data.rindex(b"\n", 0, len(data) - 1) + 9])
    assert len(read_jsonl(out)) == 4
    code, _, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert "resume: 4 done, 1 to go" in err and "1 images" in err
    assert read_jsonl(out) == full  # no duplicate, nothing missing, same answers
    assert out.read_bytes().count(b"\n") == 5

    # Ctrl-C after two images: exit 130, both kept, a hint to resume
    interrupt_run(2)
    code, _, err = run_cli(*args)
    assert code == 130
    assert "interrupted" in err and "--resume" in err
    assert read_jsonl(out) == full[:2]
    interrupt_run(None)
    code, _, err = run_cli(*args, "--resume")
    assert code == 0, err
    assert read_jsonl(out) == full


def test_boxes_max_size_on_a_huge_image(tmp_path, run_cli, fast_models, checkpoint, huge_jpeg):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    (imgs / "huge.jpg").symlink_to(huge_jpeg)
    save(imgs / "small.png", scene(280, 224, (84, 56, 196, 168)))
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(
        "boxes", imgs, "--out", out, "--max-size", "140", *model_args(checkpoint)
    )
    assert code == 0, err
    huge, small = read_jsonl(out)
    assert huge["error"] is None and (huge["width"], huge["height"]) == (20000, 20000)
    # not a rounding tolerance: at 140 px one 14-px patch is 2000 px of the original, and
    # LOST's box is made of whole patches
    assert huge["boxes"][0] == pytest.approx([8000, 6000, 14000, 12000], abs=2001)
    assert small["boxes"] == [[84, 56, 196, 168]]  # in original pixels


def test_boxes_passes_every_option_on(tmp_path, run_cli, fast_models, checkpoint, monkeypatch):
    import discover.pipeline

    seen: dict = {}
    real_init = discover.pipeline.Discoverer.__init__

    def spy(self, *args, **kwargs):
        seen.update(kwargs, model=args[0] if args else kwargs.get("model"))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(discover.pipeline.Discoverer, "__init__", spy)
    save(tmp_path / "a.png", scene(140, 112, RECT))
    code, _, err = run_cli(
        "boxes",
        tmp_path / "a.png",
        "--out",
        tmp_path / "r.jsonl",
        "--model",
        MODEL,
        "--checkpoint",
        checkpoint,
        "--method",
        "lost",
        "--features",
        "queries",
        "--k-patches",
        "7",
        "--gram-bias",
        "-0.5",
        "--no-center",
        "--max-size",
        "112",
        "--batch-size",
        "3",
        "--device",
        "cpu",
        "--workers",
        "1",
    )
    assert code == 0, err
    assert seen["model"] == MODEL and seen["checkpoint"] == checkpoint
    assert seen["features"] == "queries" and seen["max_size"] == 112
    assert (seen["batch_size"], seen["device"], seen["num_workers"]) == (3, "cpu", 1)
    assert (seen["k_patches"], seen["gram_bias"], seen["center"]) == (7, -0.5, False)
    [rec] = read_jsonl(tmp_path / "r.jsonl")
    assert rec["error"] is None and (rec["width"], rec["height"]) == (140, 112)


# ----------------------------------------------------------------------------- errors


def _one_error_line(err: str, *needles: str) -> None:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


def test_empty_folder_missing_path_and_unwritable_output(tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    (tmp_path / "only_text").mkdir()
    (tmp_path / "only_text" / "readme.txt").write_text("x")
    code, _, err = run_cli("boxes", tmp_path / "empty", "--out", tmp_path / "r.jsonl")
    assert code == 2
    _one_error_line(err, "no images found", str(tmp_path / "empty"))
    code, _, err = run_cli("boxes", tmp_path / "only_text")
    assert code == 2
    _one_error_line(err, "no images found")
    missing = tmp_path / "a very long folder name that would wrap a narrow console" / "x.jpg"
    code, _, err = run_cli("boxes", missing, "--out", tmp_path / "r.jsonl")
    assert code == 2
    _one_error_line(err, "no such file or folder", str(missing))
    save(tmp_path / "ok" / "a.png", scene(28, 28, (0, 0, 14, 14)))
    (tmp_path / "file").write_text("not a folder")
    for out in (tmp_path / "file" / "r.jsonl", tmp_path / "ok"):  # under a file; a folder
        code, _, err = run_cli("boxes", tmp_path / "ok", "--out", out)
        assert code == 2
        _one_error_line(err, "cannot", str(out))
    code, _, err = run_cli(
        "boxes", tmp_path / "ok", "--out", tmp_path / "r.jsonl", "--viz", tmp_path / "file"
    )
    assert code == 2
    _one_error_line(err, "--viz")
    code, _, err = run_cli("boxes", tmp_path / "ok", "--format", "xml")
    assert code == 2
    _one_error_line(err, "--format")


def test_a_write_failure_mid_run_is_one_line(
    tmp_path, run_cli, fast_models, checkpoint, monkeypatch
):
    import discover.outputs

    def full(self, record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(discover.outputs.JsonlWriter, "write", full)
    save(tmp_path / "a.png", scene(28, 28, (0, 0, 14, 14)))
    code, _, err = run_cli(
        "boxes", tmp_path / "a.png", "--out", tmp_path / "r.jsonl", *model_args(checkpoint)
    )
    assert code == 2
    assert err.strip().splitlines()[-1] == "error: No space left on device"


def test_bad_option_values_are_one_line_errors(tmp_path, run_cli, fast_models, checkpoint):
    save(tmp_path / "a.png", scene(28, 28, (0, 0, 14, 14)))
    out = ["--out", tmp_path / "r.jsonl"]
    base = ["boxes", tmp_path / "a.png", *out, "--model", MODEL]
    code, _, err = run_cli(*base, "--checkpoint", tmp_path / "missing.pth")
    assert code == 2
    _one_error_line(err, "checkpoint not found")
    for opt, value, needle in [
        ("--features", "nope", "features"),
        ("--k-patches", "0", "k_patches"),
        ("--gram-bias", "lots", "--gram-bias"),
        ("--batch-size", "0", "--batch-size"),
        ("--precision", "fp8", "precision"),
    ]:
        code, _, err = run_cli(*base, "--checkpoint", checkpoint, opt, value)
        assert code == 2, (opt, err)
        _one_error_line(err, needle)


def test_usage_errors_exit_2_without_a_traceback(run_cli):
    for args in (["boxes"], ["boxes", ".", "--bogus"], ["frobnicate"], ["eval", "--limit", "0"]):
        code, _, err = run_cli(*args)
        assert code == 2, args
        assert "Traceback" not in err


def test_models_lists_the_default(run_cli):
    from discover.models import MODELS

    code, out, _ = run_cli("models")
    assert code == 0 and DEFAULT_MODEL in out
    for name in MODELS:  # full names, never cut to fit an 80-column pipe
        assert name in out, name


def test_real_console_script_exit_codes(tmp_path):
    script = Path(sys.executable).parent / "discover"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "discover.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "60"}
    missing = tmp_path / "no such photos"
    proc = subprocess.run(
        [*cmd, "boxes", str(missing), "--out", str(tmp_path / "r.jsonl")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: no such file or folder: {missing}"
    assert not (tmp_path / "r.jsonl").exists()


def test_warning_lines_are_never_markup_or_wrapped(inputs):
    """A file name with rich markup must come out verbatim (it used to crash the run)."""
    from rich.console import Console

    from discover.console import warn as _warn

    console = Console(width=40, record=True, highlight=False, force_terminal=False)
    name = "imgs/[/bold] [x]notes.jpg " + "x" * 80
    _warn(console, f"{name}: not a readable image")
    text = console.export_text()
    assert text == f"warning: {name}: not a readable image\n"
