"""The calibration harness (discover.calibration): the feature cache and its keys, and
scores that equal those of the pipeline and of ``discover eval``."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
import torch
from conftest import MODEL
from fixtures_voc import write_voc_tree

from discover import calibration as cal
from discover.backbone import Backbone
from discover.datasets import load_dataset
from discover.outputs import result_record
from discover.pipeline import Discoverer
from discover.runs import evaluate


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("calvoc")
    write_voc_tree(root)
    return root


@pytest.fixture
def bb(vit_and_checkpoint):
    return Backbone(MODEL, model=copy.deepcopy(vit_and_checkpoint[0]))


def test_cache_keys_follow_the_file_the_size_the_block_and_the_weights(tmp_path, bb, voc):
    sample = next(s for s in load_dataset("voc07", voc) if s.error is None)
    image = tmp_path / "x.jpg"
    shutil.copy(sample.path, image)
    cache = cal.FeatureCache(tmp_path / "cache", bb)
    f = cache.get(image, None, -1)
    path = cache.path(image, None, -1)
    assert path.is_file()
    assert set(f.kinds) == {"keys", "queries", "values", "tokens"}
    assert f.cls_attention.shape == (bb.num_heads, f.grid[0] * f.grid[1])
    again = cache.load(image, None, -1)
    assert torch.equal(again.kinds["keys"], f.kinds["keys"]) and again.grid == f.grid
    assert cache.path(image, 224, -1) != path and cache.path(image, None, -2) != path
    # another file content: another key (the name is the same)
    data = bytearray(image.read_bytes())
    data[-3] ^= 0xFF  # inside the JPEG's entropy-coded data, before its end marker
    image.write_bytes(bytes(data))
    fresh = cal.FeatureCache(tmp_path / "cache", bb)
    assert fresh.path(image, None, -1) != path and fresh.load(image, None, -1) is None
    # other weights: another fingerprint
    with torch.no_grad():
        bb.model.blocks[0].mlp.fc1.weight.add_(1e-3)
    assert cal.FeatureCache(tmp_path / "cache", bb).fingerprint != cache.fingerprint
    # a torn entry is recomputed, not trusted
    shutil.copy(sample.path, image)  # the first content again: its entry is found...
    assert cache.load(image, None, -1) is not None
    path.write_bytes(b"torn")  # ... and a torn entry is recomputed, not trusted
    assert cache.load(image, None, -1) is None
    assert cache.get(image, None, -1).grid == f.grid and path.stat().st_size > 100


def test_scores_equal_the_pipeline_and_discover_eval(tmp_path, bb, voc):
    samples = list(load_dataset("voc07", voc))
    cache = cal.FeatureCache(tmp_path / "cache", bb)
    for size in (None, 56):
        cal.extract_features(cache, samples, [size])
        setting = cal.Setting.of("lost", "keys", -1, size, center=True, gram_bias=0.0)
        ev = cal.evaluate_setting(setting, samples, cache)
        disc = Discoverer(backbone=bb, method="lost", features="keys", center=True, gram_bias=0.0)
        bb.max_size = size
        try:
            ok = [s for s in samples if s.error is None]
            boxes = [result_record(r, "x")["boxes"] for r in disc.run([s.path for s in ok])]
            by_id = dict(zip([s.image_id for s in ok], boxes, strict=True))
            for s, box in zip(samples, ev.boxes, strict=True):
                if s.error is None:
                    assert [box] == by_id[s.image_id], (size, s.image_id)
            run = evaluate("voc07", voc, out_dir=tmp_path / f"eval{size}", discoverer=disc)
        finally:
            bb.max_size = None
        assert run.run.acc.correct == int(ev.hits.sum())
        assert run.run.acc.total == len(samples)
        row = cal.summarize(ev, samples)
        assert row.corloc.value == pytest.approx(ev.hits.mean())
        assert row.corloc.low <= row.corloc.value <= row.corloc.high
        assert sum(n for _, n in row.strata.values()) == len(samples)


def test_baselines():
    from discover.datasets import Sample

    big = Sample("a", None, 100, 80, boxes=np.array([[0, 0, 100, 80]]))
    small = Sample("b", None, 100, 80, boxes=np.array([[20, 20, 30, 30]]))
    centred = Sample("c", None, 100, 80, boxes=np.array([[15, 12, 85, 68]]))
    whole = cal.evaluate_baseline("whole image", [big, small, centred])
    assert whole.hits.tolist() == [True, False, False]  # 70x56 of 100x80: IoU 0.49
    half = cal.evaluate_baseline("centre box (half area)", [big, small, centred])
    x0, y0, x1, y1 = half.boxes[0]
    assert (x1 - x0) * (y1 - y0) == pytest.approx(100 * 80 / 2, rel=0.01)
    assert half.hits.tolist() == [False, False, True]
    with pytest.raises(ValueError):
        cal.evaluate_baseline("nope", [big])


def test_default_grid_covers_every_method_and_size():
    grid = cal.default_grid()
    assert {s.method for s in grid} == set(cal.GRID)
    assert {s.size for s in grid} == set(cal.SIZES)
    assert len({s.label() for s in grid}) == len(grid)  # labels name settings uniquely
    lost = [s for s in grid if s.method == "lost" and s.size is None and s.features == "keys"]
    assert len(lost) == 2 * 6


def test_sweep_in_processes_equals_the_sweep_in_one(tmp_path, bb, voc):
    samples = list(load_dataset("voc07", voc))
    cache = cal.FeatureCache(tmp_path / "cache", bb)
    cal.extract_features(cache, samples, [None, 56])
    settings = cal.default_grid([None, 56], ["lost", "found"], ["keys", "values"])
    one = cal.sweep(settings, samples, cache)
    two = cal.sweep(settings, samples, cache, workers=2)
    assert [e.label for e in one] == [s.label() for s in settings] == [e.label for e in two]
    for a, b in zip(one, two, strict=True):
        assert a.boxes == b.boxes and a.hits.tolist() == b.hits.tolist()


def _row(setting: cal.Setting, hits: np.ndarray, speed: float) -> cal.Row:
    ci = cal.bootstrap_interval(hits)
    return cal.Row(setting.label(), len(hits), ci, 0.0, {}, speed, setting)


def test_departures_count_what_differs_from_the_reference():
    assert cal.departures(cal.Setting.of("lost")) == 0
    assert cal.departures(cal.Setting.of("lost", gram_bias=0.0, center=False, size=448)) == 0
    assert cal.departures(cal.Setting.of("lost", "queries", gram_bias="p30")) == 2
    assert cal.departures(cal.Setting.of("tokencut", "keys", -3, tau=0.3, center=True)) == 3


def test_selection_rule_takes_the_simplest_and_fastest_within_one_standard_error():
    rng = np.random.default_rng(0)
    best = (rng.random(200) < 0.6).astype(int)
    p = best.mean()
    se = np.sqrt(p * (1 - p) / 200)  # 3.5 points
    near = best.copy()
    near[np.flatnonzero(best)[:6]] = 0  # 3 points fewer: within one standard error
    far = best.copy()
    far[np.flatnonzero(best)[:15]] = 0  # 7.5 points fewer, though the intervals overlap
    assert best.mean() - near.mean() < se < best.mean() - far.mean()
    tuned = _row(cal.Setting.of("tokencut", "queries", tau=0.3, center=True), best, 1.0)
    simple_slow = _row(cal.Setting.of("tokencut", "queries", size=None), near, 1.0)
    simple_fast = _row(cal.Setting.of("tokencut", "queries", size=448), near, 3.0)
    reference = _row(cal.Setting.of("lost", size=224), far, 9.0)
    assert reference.corloc.overlaps(tuned.corloc)  # overlap alone would have taken it
    assert cal.best_by_rule([tuned, simple_slow, simple_fast, reference]) is simple_fast
    assert cal.best_by_rule([tuned, reference]) is tuned
    baseline = cal.Row("whole image", 200, cal.bootstrap_interval(np.ones(200)), 1.0, {}, 99.0)
    assert cal.best_by_rule([baseline, reference]) is reference  # baselines are not settings
    with pytest.raises(ValueError, match="no setting"):
        cal.best_by_rule([baseline])


def test_gallery_draws_truth_and_prediction_in_their_tiles():
    from discover import viz

    white = np.full((100, 200, 3), 255, np.uint8)
    items = [
        viz.GalleryItem(white, [(0, 0, 100, 50)], (100, 50, 200, 100), "a"),
        viz.GalleryItem(white[:50], [], None),
        viz.GalleryItem(white, [], (0, 0, 200, 100)),
    ]
    sheet = viz.gallery(items, columns=2, tile=100)
    assert sheet.shape == (200, 200, 3)
    # tile 0 (scale 0.5): truth at the top left, prediction at the bottom right, in colour
    assert tuple(sheet[0, 20]) == viz.GROUND_TRUTH_COLOUR
    assert tuple(sheet[25, 80]) == viz.PREDICTION_COLOUR
    assert (sheet[45, 30] < 60).all()  # the caption strip (bottom of a 100 x 50 tile)
    assert (sheet[10:20, 110:190] == 255).all()  # tile 1: nothing drawn
    assert tuple(sheet[100, 50]) == viz.PREDICTION_COLOUR  # tile 2: second row, first column
    with pytest.raises(ValueError):
        viz.gallery([])


def test_time_forward_times_readable_images_now(tmp_path, bb, voc):
    from discover.datasets import Sample

    samples = list(load_dataset("voc07", voc))
    cache = cal.FeatureCache(tmp_path / "cache", bb)
    missing = Sample("nope", tmp_path / "nope.jpg", 10, 10)
    seconds = cal.time_forward(cache, [missing, *samples], 56, count=2)
    assert 0 < seconds < 60
    assert cache.load(samples[0].path, 56, -1) is None  # timed, not stored
    with pytest.raises(ValueError, match="no readable sample"):
        cal.time_forward(cache, [missing], 56)
