"""Tests of discover.boxes: pixel mapping, corloc IoU, plain IoU, suppression, mask boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision
from conftest import U32

from discover.boxes import box_iou, mask_box, pairwise_iou, patch_box_to_pixels, suppress

# --------------------------------------------------------------------------------------
# Independent re-statements of the LOST reference for comparison.


def _ref_iou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    # datasets.bbox_iou of valeoai/LOST with x1y1x2y2=True, written out term by term.
    b2 = box2.T
    inter = (torch.min(box1[2], b2[2]) - torch.max(box1[0], b2[0])).clamp(0) * (
        torch.min(box1[3], b2[3]) - torch.max(box1[1], b2[1])
    ).clamp(0)
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1] + eps
    w2, h2 = b2[2] - b2[0], b2[3] - b2[1] + eps
    return inter / (w1 * h1 + w2 * h2 - inter + eps)


def _ref_pixels(box, patch: int, height: int, width: int):
    # detect_box's rescaling with scales = [patch, patch] and initial size (H, W).
    x0, y0, x1, y1 = box
    pred = [patch * x0, patch * y0, patch * x1, patch * y1]
    pred[2] = min(pred[2], width)
    pred[3] = min(pred[3], height)
    return tuple(pred)


# --------------------------------------------------------------------------------------
# mask_box


def test_mask_box_end_exclusive():
    m = torch.zeros(6, 9, dtype=torch.bool)
    m[2:4, 3:8] = True
    m[5, 4] = True
    assert mask_box(m) == (3, 2, 8, 6)
    assert mask_box(m.numpy()) == (3, 2, 8, 6)
    single = torch.zeros(3, 3, dtype=torch.bool)
    single[0, 2] = True
    assert mask_box(single) == (2, 0, 3, 1)
    assert all(isinstance(v, int) for v in mask_box(single))


def test_mask_box_errors():
    with pytest.raises(ValueError, match="no true cell"):
        mask_box(torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="2-D"):
        mask_box(torch.ones(2, 2, 2, dtype=torch.bool))


# --------------------------------------------------------------------------------------
# patch_box_to_pixels


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("height, width", [(333, 517), (517, 333), (224, 224)])
def test_pixels_match_reference_and_clip_padding(patch, height, width):
    rows, cols = math.ceil(height / patch), math.ceil(width / patch)
    full = (0, 0, cols, rows)
    assert patch_box_to_pixels(full, patch, (width, height)) == (0, 0, width, height)
    rng = np.random.default_rng(patch + height)
    for _ in range(50):
        x0, x1 = sorted(rng.choice(cols + 1, size=2, replace=False).tolist())
        y0, y1 = sorted(rng.choice(rows + 1, size=2, replace=False).tolist())
        box = (x0, y0, x1, y1)
        got = patch_box_to_pixels(box, patch, (width, height))
        assert got == _ref_pixels(box, patch, height, width)
        assert all(type(v) is int for v in got)


def test_pixels_interior_box_and_clipping_values():
    # 333 rows x 517 columns, patch 14: 24 x 37 patches, padded to 336 x 518.
    assert patch_box_to_pixels((2, 3, 5, 7), 14, (517, 333)) == (28, 42, 70, 98)
    assert patch_box_to_pixels((30, 20, 37, 24), 14, (517, 333)) == (420, 280, 517, 333)
    # Patch 16: 21 x 33 patches, padded to 336 x 528; only the end coordinates are clipped.
    assert patch_box_to_pixels((32, 20, 33, 21), 16, (517, 333)) == (512, 320, 517, 333)
    assert patch_box_to_pixels(torch.tensor([1, 1, 2, 2]), 16, (517, 333)) == (16, 16, 32, 32)


def test_pixels_rectangular_patch_is_height_width():
    # (patch_height, patch_width) = (14, 16): x by 16, y by 14.
    assert patch_box_to_pixels((1, 2, 3, 4), (14, 16), (1000, 1000)) == (16, 28, 48, 56)


def test_pixels_scale_back_to_original_clips_first():
    # Network input 517 x 333 resized from a 1034 x 999 original: scale = (2, 3).
    got = patch_box_to_pixels((30, 20, 37, 24), 14, (517, 333), scale=(2.0, 3.0))
    assert got == (840.0, 840.0, 1034.0, 999.0)
    assert all(type(v) is float for v in got)
    got = patch_box_to_pixels((1, 1, 2, 2), 16, (517, 333), scale=(0.5, 1.0))
    assert got == (8.0, 16.0, 16.0, 32.0)


def test_pixels_errors():
    with pytest.raises(ValueError):
        patch_box_to_pixels((1, 2, 3), 16, (100, 100))
    with pytest.raises(ValueError):
        patch_box_to_pixels((1, 2, 3, 4), 0, (100, 100))


# --------------------------------------------------------------------------------------
# box_iou (corloc formula)


def test_iou_identical_touching_contained():
    assert float(box_iou([10, 20, 110, 220], [[10, 20, 110, 220]])[0]) == 1.0
    # LOST's stabiliser (1e-7 on each height and the union) is visible on a unit box:
    # 1 / (1 + 3e-7), up to the few roundings of the formula (4 u)
    unit = float(box_iou([0, 0, 1, 1], [[0, 0, 1, 1]])[0])
    assert unit == pytest.approx(1 / (1 + 3e-7), rel=4 * U32)
    touching = box_iou([0, 0, 10, 10], [[10, 0, 20, 10], [0, 10, 10, 20], [10, 10, 20, 20]])
    assert touching.tolist() == [0.0, 0.0, 0.0]
    far = box_iou([0, 0, 10, 10], [[50, 50, 60, 60]])
    assert far.tolist() == [0.0]
    inner = box_iou([20, 20, 40, 40], [[0, 0, 80, 80]])
    assert float(inner[0]) == pytest.approx(400 / 6400, rel=2 * U32)  # exact areas, 1 division
    outer = box_iou([0, 0, 80, 80], [[20, 20, 40, 40]])
    assert torch.equal(inner, outer)


def test_iou_dtype_follows_reference_promotion():
    ints = box_iou([0, 0, 200, 100], [[0, 0, 100, 100]])
    assert ints.dtype == torch.float32
    floats = box_iou(np.array([0.0, 0.0, 200.0, 100.0]), np.array([[0.0, 0.0, 100.0, 100.0]]))
    assert floats.dtype == torch.float64


def test_iou_exact_half_decision_matches_reference():
    # Geometric IoU exactly 0.5. With int64 boxes (the reference's predictions and ground
    # truth) the arithmetic is float32, where eps vanishes for large boxes: a hit. The same
    # boxes in float64 fall just below 0.5. Small boxes keep the eps even in float32.
    big = box_iou([0, 0, 200, 100], [[0, 0, 100, 100]])
    assert float(big[0]) == 0.5 and bool(big[0] >= 0.5)
    big64 = box_iou(np.array([0.0, 0, 200, 100]), np.array([[0.0, 0, 100, 100]]))
    assert not bool(big64[0] >= 0.5)
    small = box_iou([0, 0, 2, 1], [[0, 0, 1, 1]])
    assert not bool(small[0] >= 0.5)


def _rand_int_boxes(rng: np.random.Generator, m: int) -> np.ndarray:
    xs = np.sort(rng.integers(0, 500, size=(m, 2)), axis=1)
    ys = np.sort(rng.integers(0, 500, size=(m, 2)), axis=1)
    return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)


def test_iou_equals_reference_bit_for_bit():
    rng = np.random.default_rng(0)
    half_hits = 0
    for _ in range(300):
        kind = rng.integers(0, 3)
        if kind == 0:  # pairs built to have IoU exactly 0.5: box twice as wide as the gt
            x, y = rng.integers(0, 300, size=2)
            w, h = rng.integers(1, 300, size=2)
            pred = np.array([x, y, x + 2 * w, y + h])
            gt = np.array([[x, y, x + w, y + h]])
        else:
            pred = _rand_int_boxes(rng, 1)[0]
            gt = _rand_int_boxes(rng, int(rng.integers(1, 5)))
        if kind == 2:
            pred, gt = pred.astype(np.float64) + 0.5, gt.astype(np.float64)
        ours = box_iou(pred, gt)
        ref = _ref_iou(torch.from_numpy(pred), torch.from_numpy(gt))
        assert ours.dtype == ref.dtype
        assert torch.equal(ours, ref)
        assert torch.equal(ours >= 0.5, ref >= 0.5)
        half_hits += int(kind == 0 and bool(ours[0] >= 0.5))
    assert half_hits > 0  # the float32 exact-0.5 case did occur


def test_iou_empty_and_shapes():
    out = box_iou([0, 0, 1, 1], np.zeros((0, 4), dtype=np.int64))
    assert out.shape == (0,)
    assert box_iou([0, 0, 1, 1], []).shape == (0,)
    with pytest.raises(ValueError):
        box_iou([0, 0, 1], [[0, 0, 1, 1]])
    with pytest.raises(ValueError):
        box_iou([0, 0, 1, 1], [[0, 0, 1]])


# --------------------------------------------------------------------------------------
# pairwise_iou and suppress


def _random_boxes(g: torch.Generator, n: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * 100
    wh = torch.rand(n, 2, generator=g) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_pairwise_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    a, b = _random_boxes(g, 12), _random_boxes(g, 7)
    ours = pairwise_iou(a, b)
    assert ours.shape == (12, 7)
    # No long sums: areas (2 roundings), intersection (3), union a + b - i (2, and at
    # least as large as either area, so no cancellation), one division: each IoU is
    # within ~12 u of exact, relative, on either side; IoU <= 1, so 32 u absolute.
    assert torch.allclose(ours, torchvision.ops.box_iou(a, b), rtol=0, atol=32 * U32)
    ints = torch.tensor([[0, 0, 10, 10], [5, 0, 15, 10]])
    assert pairwise_iou(ints, ints)[0, 1] == pytest.approx(50 / 150)


def test_pairwise_iou_degenerate_is_zero_not_nan():
    degenerate = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    out = pairwise_iou(degenerate, torch.cat([degenerate, torch.tensor([[0.0, 0, 1, 1]])]))
    assert out.tolist() == [[0.0, 0.0]]
    assert pairwise_iou(torch.zeros(0, 4), torch.zeros(3, 4)).shape == (0, 3)


def test_suppress_order_and_ties():
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 10],  # 0
            [1.0, 1, 11, 11],  # 1: overlaps 0 a lot
            [50.0, 50, 60, 60],  # 2
            [0.0, 0, 10, 10],  # 3: same as 0, same score
            [51.0, 50, 61, 60],  # 4: overlaps 2
        ]
    )
    scores = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.7])
    # 1 first; it removes 0 and 3. Then 4 (0.7) removes 2.
    assert suppress(boxes, scores, 0.5) == [1, 4]
    # Equal scores: the earlier index wins.
    assert suppress(boxes[[0, 3]], torch.tensor([0.5, 0.5]), 0.5) == [0]
    assert suppress(boxes[[3, 0]], torch.tensor([0.5, 0.5]), 0.5) == [0]
    # The threshold is strict: an IoU of exactly 0.5 survives a threshold of 0.5.
    pair = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 5]])
    assert suppress(pair, torch.tensor([1.0, 0.5]), 0.5) == [0, 1]
    assert suppress(pair, torch.tensor([1.0, 0.5]), 0.49) == [0]
    assert suppress(torch.zeros(0, 4), torch.zeros(0), 0.5) == []


def test_suppress_matches_torchvision_nms():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        boxes = _random_boxes(g, 30)
        scores = torch.rand(30, generator=g)
        for thr in (0.1, 0.3, 0.7):
            assert suppress(boxes, scores, thr) == torchvision.ops.nms(boxes, scores, thr).tolist()


def test_suppress_errors():
    with pytest.raises(ValueError):
        suppress(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ValueError, match="NaN"):
        suppress(torch.zeros(2, 4), torch.tensor([0.1, float("nan")]), 0.5)
