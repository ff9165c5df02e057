"""Nothing lost, nothing unbounded (issue 16), through the command line: decompression
bombs under --max-size in every command, runs that fail before their first image, resume
from anywhere, settings kept with the output, bad options, Ctrl-C at start-up.

Commands run in-process through ``discover.cli.main`` (``run_cli``); ``fast_models``
hands out the session model instead of building it again from the checkpoint file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CLI_METHOD_OPTS, MODEL, save, scene, write_lying_png
from fixtures_voc import write_voc_tree

from discover.outputs import read_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECT = (42, 28, 98, 84)


def model_args(checkpoint: str) -> list[str]:
    return ["--model", MODEL, "--checkpoint", checkpoint, "--device", "cpu", *CLI_METHOD_OPTS]


def one_error_line(err: str, *needles: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], (n, err)
    return lines[0]


# ----------------------------------------------------------------------- decompression bombs


def test_boxes_refuses_a_png_bomb_under_max_size(
    tmp_path, run_cli, fast_models, checkpoint, no_big_decode
):
    imgs = tmp_path / "imgs"
    write_lying_png(imgs / "bomb.png", 37000, 37000)
    save(imgs / "good.png", scene(140, 112, RECT))
    out = tmp_path / "r.jsonl"
    code, _, err = run_cli(
        "boxes", imgs, "--out", out, "--max-size", "140", *model_args(checkpoint)
    )
    assert code == 0, err
    bomb, good = read_jsonl(out)
    assert bomb["error"].startswith("too large: 37000x37000"), bomb
    assert "--max-size does not help" in bomb["error"]
    assert good["error"] is None and good["boxes"] == [list(RECT)]
    assert no_big_decode == []  # refused from the header: nothing was decoded


def test_eval_refuses_a_png_bomb_under_max_size(
    tmp_path, run_cli, fast_models, checkpoint, no_big_decode
):
    voc = write_voc_tree(tmp_path / "data", "2007")
    victim = voc["ids"][1]
    write_lying_png(voc["voc_dir"] / "JPEGImages" / f"{victim}.jpg", 37000, 37000)
    out = tmp_path / "eval"
    code, _, err = run_cli(
        "eval",
        "--dataset",
        "voc07",
        "--root",
        voc["devkit"],
        "--out",
        out,
        "--max-size",
        "112",
        *model_args(checkpoint),
    )
    assert code == 0, err
    by_id = {r["image"]: r for r in read_jsonl(out / "boxes.jsonl")}
    assert by_id[victim]["error"].startswith("too large: 37000x37000")
    failures = dict(map(tuple, json.loads((out / "summary.json").read_text())["failures"]))
    assert "too large" in failures[victim]
    assert no_big_decode == []


def test_inspect_advises_max_size_only_where_it_helps(
    tmp_path, run_cli, fast_models, checkpoint, huge_jpeg, no_big_decode
):
    imgs = tmp_path / "imgs"
    write_lying_png(imgs / "png120.png", 11000, 11000)  # 121 MP, a PNG: decoded whole
    (imgs / "jpeg400.jpg").symlink_to(huge_jpeg)  # 400 MP, a JPEG: decoded at 1/8 scale
    save(imgs / "good.png", scene(140, 112, RECT))
    args = ["inspect", imgs, "--model", MODEL, "--checkpoint", checkpoint]

    code, _, err = run_cli(*args, "--out", tmp_path / "native")
    assert code == 0, err
    warnings = {ln.split(":")[1].strip(): ln for ln in err.splitlines() if "warning" in ln}
    assert set(warnings) == {f"{imgs}/png120.png", f"{imgs}/jpeg400.jpg"}, err
    assert "pass --max-size to downscale it" in warnings[f"{imgs}/jpeg400.jpg"]
    assert "pass --max-size" not in warnings[f"{imgs}/png120.png"]
    assert "--max-size does not help" in warnings[f"{imgs}/png120.png"]

    code, _, err = run_cli(*args, "--max-size", "224", "--out", tmp_path / "small")
    assert code == 0, err
    warned = [ln for ln in err.splitlines() if "warning" in ln]
    assert len(warned) == 1 and "png120.png" in warned[0], err  # the JPEG is read now
    assert "pass --max-size" not in warned[0] and "too large: 11000x11000" in warned[0]
    assert len(list((tmp_path / "small").glob("*.png"))) == 2  # jpeg400 and good
    assert no_big_decode == []


# ------------------------------------------------------------- failed starts keep the output


def _snapshot(out: Path) -> dict[str, bytes]:
    """Every file of an output (a folder for voc) and its settings sidecar, by name."""
    files = sorted(out.rglob("*")) if out.is_dir() else [out]
    sidecar = out.with_name(out.name + ".settings.json")
    files += [sidecar] if sidecar.exists() else []
    return {p.name: p.read_bytes() for p in files if p.is_file()}


def _no_network(monkeypatch) -> None:
    """timm's hub download fails as it does without a network (and without a cache)."""
    import timm

    real = timm.create_model

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("[Errno -3] Temporary failure in name resolution")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "coco", "voc"])
def test_a_run_that_fails_before_its_first_image_keeps_the_output(
    tmp_path, run_cli, fast_models, checkpoint, monkeypatch, fmt
):
    imgs = tmp_path / "photos"
    save(imgs / "a.png", scene(140, 112, RECT))
    save(imgs / "b.png", scene(140, 112, RECT))
    out = tmp_path / ("keep" if fmt == "voc" else f"keep.{fmt}")
    code, _, err = run_cli("boxes", imgs, "--out", out, "--format", fmt, *model_args(checkpoint))
    assert code == 0, err
    before = _snapshot(out)
    assert len(before) >= 2  # the output and its settings (and the XMLs)
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    _no_network(monkeypatch)
    causes = {
        "the default model needs a network": ([], "cannot download the weights"),
        "a bad --checkpoint": (["--model", MODEL, "--checkpoint", text], "it is a text file"),
        "--device tpu": ([*model_args(checkpoint), "--device", "tpu"], "'tpu'"),
    }
    for cause, (args, needle) in causes.items():
        code, _, err = run_cli("boxes", imgs, "--out", out, "--format", fmt, *args)
        assert code == 2, (cause, err)
        one_error_line(err, needle)
        assert _snapshot(out) == before, cause  # not emptied, not touched


def test_an_eval_that_fails_before_its_first_image_keeps_the_output(
    tmp_path, run_cli, fast_models, checkpoint, monkeypatch
):
    voc = write_voc_tree(tmp_path / "data", "2007")
    out = tmp_path / "eval"
    base = ["eval", "--dataset", "voc07", "--root", voc["devkit"], "--out", out, "--limit", "2"]
    code, _, err = run_cli(*base, *model_args(checkpoint))
    assert code == 0, err
    before = _snapshot(out)
    assert {"boxes.jsonl", "summary.json"} <= set(before)
    _no_network(monkeypatch)
    for args, needle in [
        ([], "cannot download the weights"),
        ([*model_args(checkpoint), "--device", "tpu"], "'tpu'"),
        (["--model", MODEL, "--checkpoint", tmp_path / "gone.pth"], "checkpoint not found"),
    ]:
        code, _, err = run_cli(*base, *args)
        assert code == 2, err
        one_error_line(err, needle)
        assert _snapshot(out) == before
