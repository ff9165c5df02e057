"""Tests of discover.inspection (``discover inspect``) and its figure in discover.viz."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from discover.backbone import Backbone
from discover.images import read_image
from discover.inspection import CSV_FIELDS, diagnose, inspect_images, summarize
from discover.viz import (
    INSPECT_HEADER,
    INSPECT_PAD,
    INSPECT_TITLE,
    InspectionRow,
    colorize,
    draw_inspection,
    inspection_figure_size,
    inspection_panel_shape,
)

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "samples").glob("*.jpg"))
H, W = 112, 168  # 8 x 12 patches of 14 pixels


@pytest.fixture(scope="module")
def backbones() -> list[tuple[str, Backbone]]:
    torch.manual_seed(0)
    reg = Backbone("vit_small_patch14_reg4_dinov2", pretrained=False)
    torch.manual_seed(0)
    plain = Backbone("vit_small_patch14_dinov2", pretrained=False)
    return [("reg4", reg), ("plain", plain)]


def _write_image(path: Path, sample: Path, size: tuple[int, int] = (W, H)) -> Path:
    arr = cv2.resize(read_image(sample).array, size, interpolation=cv2.INTER_AREA)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(arr, cv2.COLOR_RGB2BGR))
    return path


def _stringify(row: dict) -> dict:
    return {k: ("" if v is None else str(v)) for k, v in row.items()}


def test_inspect_writes_figures_and_csv(tmp_path, backbones):
    a = _write_image(tmp_path / "in" / "a.png", SAMPLES[0])
    broken = tmp_path / "in" / "broken.jpg"
    broken.write_bytes(b"this is not an image")
    tiny = _write_image(tmp_path / "in" / "tiny.png", SAMPLES[1], (8, 8))
    b = _write_image(tmp_path / "in" / "b.png", SAMPLES[2])
    calls = []
    out = tmp_path / "out"
    rows = inspect_images(
        [a, broken, tiny, b],
        backbones,
        out,
        panel_size=160,
        progress=lambda done, total, rs: calls.append((done, total, [r["model"] for r in rs])),
    )
    assert calls == [(i, 4, ["reg4", "plain"]) for i in (1, 2, 3, 4)]
    assert [(Path(r["image"]).name, r["model"]) for r in rows] == [
        (n, m) for n in ("a.png", "broken.jpg", "tiny.png", "b.png") for m in ("reg4", "plain")
    ]

    # One PNG per readable image, of the documented size.
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]
    expected = inspection_figure_size((H, W), 2, 160)
    ph, pw = 107, 160  # 112 * 160 / 168 = 106.7
    assert inspection_panel_shape((H, W), 160) == (ph, pw)
    assert expected == (
        INSPECT_PAD + 2 * (INSPECT_HEADER + INSPECT_TITLE + ph + INSPECT_PAD),
        INSPECT_PAD + 4 * (pw + INSPECT_PAD),
    )
    for name in ("a.png", "b.png"):
        fig = cv2.imread(str(out / name))
        assert fig is not None and fig.shape == (*expected, 3)

    # The CSV parses and holds exactly the returned rows.
    with open(out / "norms.csv", newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == CSV_FIELDS
        parsed = list(reader)
    assert parsed == [_stringify(r) for r in rows]

    by = {(Path(r["image"]).name, r["model"]): r for r in parsed}
    for img in ("a.png", "b.png"):
        for model, n_reg in (("reg4", 4), ("plain", 0)):
            r = by[(img, model)]
            assert r["error"] == ""
            assert r["grid"] == "8x12" and int(r["num_patches"]) == 96
            assert 0.0 <= float(r["outlier_fraction"]) <= 1.0
            assert float(r["median_norm"]) <= float(r["max_norm"]) < float(r["threshold"])
            regs = [float(v) for v in r["register_norms"].split(";")] if n_reg else []
            assert len(regs) == n_reg
            assert 0.0 <= float(r["register_attention"]) < 1.0
            assert (float(r["register_attention"]) > 0) == (n_reg > 0)
            x0, y0, x1, y1 = (int(v) for v in r["lost_box"].split())
            assert 0 <= x0 < x1 <= 12 and 0 <= y0 < y1 <= 8
            assert Path(r["png"]) == out / img
    for model in ("reg4", "plain"):
        assert by[("broken.jpg", model)]["error"].startswith("not a readable image")
        assert by[("broken.jpg", model)]["outlier_fraction"] == ""
        assert "smaller than one 14x14 patch" in by[("tiny.png", model)]["error"]

    summary = summarize(rows)
    assert [s["model"] for s in summary] == ["reg4", "plain"]
    assert all(s["images"] == 2 and s["failed"] == 2 for s in summary)


def test_planted_outlier_shows_up_in_csv(tmp_path, backbones):
    img = _write_image(tmp_path / "x.png", SAMPLES[3])
    reg = backbones[0][1]
    r, c = 2, 9
    token = reg.num_prefix_tokens + r * 12 + c

    def plant(module, inputs, output):
        output = output.clone()
        output[:, token] *= 100.0
        return output

    handle = reg.model.blocks[-1].register_forward_hook(plant)
    try:
        rows = inspect_images([img], backbones, tmp_path / "out")
        d = diagnose(reg, read_image(img).array)
    finally:
        handle.remove()
    by = {row["model"]: row for row in rows}
    assert by["reg4"]["num_outliers"] == 1
    assert by["reg4"]["outlier_fraction"] == pytest.approx(1 / 96, rel=1e-5)
    assert by["plain"]["num_outliers"] == 0
    assert d.norms.outlier_positions == [(r, c)]
    assert 0.0 <= by["reg4"]["outlier_attention"] <= 1.0
    # The attention share reported for the outlier is that patch's renormalised attention.
    share = float(d.attention.patches_no_registers[:, r, c].mean())
    # The same float32 arithmetic on the same pixels on both sides; the row keeps 6
    # significant digits (5e-6 relative).
    assert by["reg4"]["outlier_attention"] == pytest.approx(share, rel=1e-5, abs=1e-12)


def test_fixed_threshold_and_lost_params_are_passed_through(tmp_path, backbones):
    img = _write_image(tmp_path / "x.png", SAMPLES[4])
    rows = inspect_images(
        [img], backbones[:1], tmp_path / "out", threshold=0.0, lost_params={"k_patches": 1}
    )
    assert rows[0]["threshold"] == 0.0 and rows[0]["outlier_fraction"] == 1.0
    d = diagnose(backbones[0][1], read_image(img).array, lost_params={"k_patches": 1})
    assert int(d.lost.expansion.sum()) <= 1


def test_bad_threshold_fails_before_writing(tmp_path, backbones):
    with pytest.raises(ValueError, match="threshold"):
        inspect_images([tmp_path / "x.png"], backbones, tmp_path / "out", threshold="big")
    assert not (tmp_path / "out" / "norms.csv").exists()
    with pytest.raises(ValueError):
        inspect_images([tmp_path / "x.png"], [], tmp_path / "out")


def test_name_clashes_get_distinct_figures(tmp_path, backbones):
    p1 = _write_image(tmp_path / "one" / "x.png", SAMPLES[0])
    p2 = _write_image(tmp_path / "two" / "X.png", SAMPLES[1])
    rows = inspect_images([p1, p2], backbones[1:], tmp_path / "out")
    # one rule for every figure and output file name (discover.outputs.unique_stem): the
    # path below the inputs' common folder, flattened
    assert [Path(r["png"]).name for r in rows] == ["one__x.png", "two__X.png"]
    assert all(Path(r["png"]).is_file() for r in rows)


def test_test_time_registers_are_split_off(tmp_path, backbones):
    """Tokens declared with ``add_registers`` (inserted after the prefix) are registers."""
    plain = backbones[1][1]
    original = plain.model._pos_embed

    def with_extra(x):
        t = original(x)
        extra = torch.zeros_like(t[:, :1])
        extra[..., 0] = 3.0  # norm 3
        n = plain.model.num_prefix_tokens
        return torch.cat([t[:, :n], extra, t[:, n:]], dim=1)

    plain.model._pos_embed = with_extra
    plain.add_registers(1)
    try:
        img = _write_image(tmp_path / "x.png", SAMPLES[5])
        rows = inspect_images([img], [("plain+ttr", plain)], tmp_path / "out")
    finally:
        del plain.model._pos_embed
        plain.remove_registers(1)
    assert rows[0]["error"] == ""
    assert rows[0]["num_patches"] == 96
    assert rows[0]["register_norms"] != ""
    assert len(str(rows[0]["register_norms"]).split(";")) == 1


# -- the figure ------------------------------------------------------------------------------------
def _row(norm_value: float, label: str, outlier: tuple[int, int] | None = None) -> InspectionRow:
    img = np.full((H, W, 3), 128, dtype=np.uint8)
    outliers = np.zeros((8, 12), dtype=bool)
    if outlier is not None:
        outliers[outlier] = True
    return InspectionRow(
        label=label,
        image=img,
        patch_size=14,
        norms=np.full((8, 12), norm_value),
        outliers=outliers,
        attention=torch.rand(8, 12),
        degree=torch.arange(96.0).reshape(8, 12),
        seed=(0, 0),
        box=(0, 0, 3, 2),
        mask=torch.zeros(8, 12, dtype=torch.bool),
        expansion=torch.zeros(8, 12, dtype=torch.bool),
    )


def _panel(fig: np.ndarray, row: int, col: int, shape: tuple[int, int]) -> np.ndarray:
    ph, pw = shape
    y = INSPECT_PAD + row * (INSPECT_HEADER + INSPECT_TITLE + ph + INSPECT_PAD)
    y += INSPECT_HEADER + INSPECT_TITLE
    x = INSPECT_PAD + col * (pw + INSPECT_PAD)
    return fig[y : y + ph, x : x + pw]


def test_norm_maps_share_one_colour_scale():
    fig = draw_inspection([_row(10.0, "a", outlier=(4, 6)), _row(20.0, "b")], panel_size=168)
    assert fig.shape[:2] == inspection_figure_size((H, W), 2, 168)
    shape = inspection_panel_shape((H, W), 168)
    half = colorize(np.array([[10.0]]), 0.0, 20.0)[0, 0]
    full = colorize(np.array([[20.0]]), 0.0, 20.0)[0, 0]
    assert not np.array_equal(half, full)
    p0, p1 = _panel(fig, 0, 1, shape), _panel(fig, 1, 1, shape)
    assert np.array_equal(p0[5, 5], half) and np.array_equal(p1[5, 5], full)
    # the outlier patch (row 4, col 6 -> pixels 56..69, 84..97 at scale 1) is outlined in red
    assert np.array_equal(p0[56, 84], [255, 0, 0]) and np.array_equal(p0[62, 90], half)
    assert not (p1 == [255, 0, 0]).all(axis=-1).any()
    # first panel is the image itself
    assert (_panel(fig, 0, 0, shape) == 128).all()
    # an explicit range wins
    fig2 = draw_inspection([_row(10.0, "a")], panel_size=168, norm_range=(0.0, 10.0))
    assert np.array_equal(_panel(fig2, 0, 1, shape)[5, 5], full)


def test_draw_inspection_without_lost_and_odd_shapes():
    row = _row(5.0, "no lost")
    row.degree = None
    tall = np.zeros((300, 20, 3), dtype=np.uint8)
    row.image = tall
    row.norms = row.attention = np.zeros((22, 2))
    row.outliers = np.zeros((22, 2), dtype=bool)
    fig = draw_inspection([row], panel_size=100)
    assert fig.shape[:2] == inspection_figure_size((300, 20), 1, 100)
    assert inspection_panel_shape((300, 20), 100) == (100, 7)
    with pytest.raises(ValueError):
        draw_inspection([])


def test_summarize_per_model():
    rows = [
        {"model": "m", "outlier_fraction": 0.1, "num_outliers": 3, "max_norm": 50.0,
         "median_norm": 10.0},
        {"model": "m", "outlier_fraction": 0.0, "num_outliers": 0, "max_norm": 70.0,
         "median_norm": 20.0},
        {"model": "m", "outlier_fraction": "", "num_outliers": "", "max_norm": "",
         "median_norm": "", "error": "x"},
        {"model": "n", "outlier_fraction": "", "num_outliers": "", "max_norm": "",
         "median_norm": "", "error": "x"},
    ]  # fmt: skip
    s = {d["model"]: d for d in summarize(rows)}
    assert s["m"]["images"] == 2 and s["m"]["failed"] == 1
    assert s["m"]["mean_outlier_fraction"] == pytest.approx(0.05)
    assert s["m"]["images_with_outliers"] == 1
    assert s["m"]["max_norm"] == 70.0 and s["m"]["median_norm"] == 15.0
    assert s["n"]["images"] == 0 and math.isnan(s["n"]["mean_outlier_fraction"])
