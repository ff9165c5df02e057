from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_voc import write_coco20k, write_voc_tree

from discover.corloc import CorLocAccumulator, is_correct
from discover.datasets import load_dataset

GT = np.array([[0, 0, 10, 10]], dtype=np.int64)


# ----------------------------------------------------------------------------- is_correct


def test_identical_box_is_correct() -> None:
    assert is_correct([0, 0, 10, 10], GT)


def test_touching_boxes_do_not_overlap() -> None:
    assert not is_correct([10, 0, 20, 10], GT)  # shared edge only
    assert not is_correct([10, 10, 20, 20], GT)  # shared corner only
    assert not is_correct([10, 0, 20, 10], GT, threshold=1e-6)


def test_containment() -> None:
    assert not is_correct([2, 2, 8, 8], GT)  # 36 / 100
    assert is_correct([1, 1, 9, 9], GT)  # 64 / 100
    assert not is_correct([-10, -10, 20, 20], GT)  # gt inside a 30x30 box: 100 / 900
    assert is_correct([0, 0, 10, 10], np.array([[0, 0, 12, 12]]))  # 100 / 144


def test_exactly_half_counts_with_integer_boxes_like_the_reference() -> None:
    # geometric IoU 50/100; with integer boxes LOST's formula runs in float32, where the
    # 1e-7 stabilisers vanish and the IoU is exactly 0.5, so >= 0.5 holds.
    assert is_correct([0, 0, 10, 5], GT)
    assert is_correct(np.array([0, 0, 10, 5]), torch.tensor([[0, 0, 10, 10]]))
    # the same boxes in float64 keep the stabilisers: just below 0.5
    assert not is_correct(np.array([0.0, 0.0, 10.0, 5.0]), GT.astype(np.float64))
    # one pixel less is a clear miss
    assert not is_correct([0, 0, 10, 4], GT)


def test_any_gt_box_is_enough_and_empty_gt_is_a_miss() -> None:
    gts = np.array([[50, 50, 60, 60], [0, 0, 10, 10], [100, 0, 110, 10]])
    assert is_correct([1, 0, 10, 10], gts)
    assert not is_correct([20, 20, 30, 30], gts)
    assert not is_correct([0, 0, 10, 10], np.zeros((0, 4), dtype=np.int64))
    assert not is_correct([0, 0, 10, 10], [])


def test_threshold_is_inclusive_and_configurable() -> None:
    pred = [0, 0, 10, 7]  # IoU 0.7
    assert is_correct(pred, GT, threshold=0.5)
    assert not is_correct(pred, GT, threshold=0.75)


# ----------------------------------------------------------------------------- accumulator


def _four_images() -> CorLocAccumulator:
    acc = CorLocAccumulator()
    # a: hit (1 of 2 gt boxes found)
    assert acc.add("a", [0, 0, 10, 10], [[0, 0, 10, 10], [20, 20, 30, 30]])
    # b: miss
    assert not acc.add("b", [[50, 50, 60, 60]], [[0, 0, 10, 10]])
    # c: the top box misses, the second one hits: CorLoc uses the top box only,
    #    recall counts both boxes
    assert not acc.add("c", [[50, 50, 60, 60], [0, 0, 10, 10]], [[0, 0, 10, 10]])
    # d: failed image, even a perfect box does not count
    assert not acc.add("d", [0, 0, 10, 10], [[0, 0, 10, 10]], error="cannot decode image")
    return acc


def test_accumulator_hand_computed() -> None:
    acc = _four_images()
    assert acc.total == 4 and len(acc) == 4
    assert acc.correct == 1
    assert acc.corloc == pytest.approx(0.25)
    assert acc.gt_total == 5
    assert acc.gt_hit == 2  # a's first box, c's second box
    assert acc.recall == pytest.approx(2 / 5)
    assert acc.failures == [("d", "cannot decode image")]
    assert acc.localized == {"a": True, "b": False, "c": False, "d": False}


def test_accumulator_no_prediction_and_no_gt() -> None:
    acc = CorLocAccumulator()
    assert not acc.add("nopred", None, [[0, 0, 10, 10]])
    assert not acc.add("emptypred", np.zeros((0, 4)), [[0, 0, 10, 10]])
    assert not acc.add("nogt", [0, 0, 10, 10], np.zeros((0, 4), dtype=np.int64))
    assert acc.total == 3 and acc.correct == 0
    assert [i for i, _ in acc.failures] == ["nopred", "emptypred"]
    assert acc.gt_total == 2 and acc.gt_hit == 0


def test_accumulator_accepts_tensors_and_tuples() -> None:
    acc = CorLocAccumulator()
    assert acc.add("t", torch.tensor([[0, 0, 10, 10], [5, 5, 6, 6]]), torch.tensor(GT))
    assert acc.add("tuple", (0, 0, 10, 10), [(0, 0, 10, 10)])
    with pytest.raises(ValueError, match="shape"):
        acc.add("bad", [[0, 0, 10]], GT)


def test_accumulator_rejects_duplicates() -> None:
    acc = CorLocAccumulator()
    acc.add("x", [0, 0, 10, 10], GT)
    with pytest.raises(ValueError, match="already"):
        acc.add("x", [0, 0, 10, 10], GT)


def test_empty_accumulator() -> None:
    acc = CorLocAccumulator()
    assert acc.total == 0 and acc.corloc == 0.0 and acc.recall == 0.0


def test_merge_equals_single_pass() -> None:
    whole = _four_images()
    s1, s2 = CorLocAccumulator(), CorLocAccumulator()
    s1.add("a", [0, 0, 10, 10], [[0, 0, 10, 10], [20, 20, 30, 30]])
    s1.add("b", [[50, 50, 60, 60]], [[0, 0, 10, 10]])
    s2.add("c", [[50, 50, 60, 60], [0, 0, 10, 10]], [[0, 0, 10, 10]])
    s2.add("d", [0, 0, 10, 10], [[0, 0, 10, 10]], error="cannot decode image")
    merged = s1.merge(s2)
    assert merged is s1
    assert merged.to_dict() == whole.to_dict()


def test_merge_rejects_overlap_and_threshold_mismatch() -> None:
    a, b = CorLocAccumulator(), CorLocAccumulator()
    a.add("x", [0, 0, 10, 10], GT)
    b.add("x", [0, 0, 10, 10], GT)
    with pytest.raises(ValueError, match="both"):
        a.merge(b)
    with pytest.raises(ValueError, match="threshold"):
        a.merge(CorLocAccumulator(threshold=0.7))


def test_dict_round_trip_through_json() -> None:
    acc = _four_images()
    data = json.loads(json.dumps(acc.to_dict()))
    assert data["corloc"] == pytest.approx(0.25) and data["total"] == 4
    back = CorLocAccumulator.from_dict(data)
    assert back.to_dict() == acc.to_dict()
    assert back.failures == acc.failures
    data["correct"] = 3
    with pytest.raises(ValueError, match="correct"):
        CorLocAccumulator.from_dict(data)


# ----------------------------------------------------------------------------- with datasets


def test_corloc_over_voc_fixture_with_and_without_no_hard(tmp_path: Path) -> None:
    info = write_voc_tree(tmp_path)

    def run(no_hard: bool) -> CorLocAccumulator:
        acc = CorLocAccumulator()
        for s in load_dataset("voc07", info["devkit"], no_hard=no_hard):
            # predict the last box of the *full* annotation (hard ones included)
            full = info["expected"].get(s.image_id)
            pred = full["boxes"][-1] if full is not None else None
            acc.add(s.image_id, pred, s.boxes, error=s.error)
        return acc

    everything = run(no_hard=False)
    assert everything.total == 7  # malformed image counted
    assert everything.correct == 6
    assert [i for i, _ in everything.failures] == ["000031"]

    easy = run(no_hard=True)
    # 000009 (all hard) is not counted; 000012's and 000005's last boxes are hard and
    # removed from the ground truth, so those predictions now miss
    assert easy.total == 6
    assert easy.correct == 3
    assert set(easy.localized) == set(info["ids"]) - {"000009"}


def test_corloc_over_coco_fixture(tmp_path: Path) -> None:
    info = write_coco20k(tmp_path)
    acc = CorLocAccumulator()
    for s in load_dataset("coco20k", info["root"], coco_list=info["list_file"]):
        # predicting the whole image: only the crowd box would match image 42
        acc.add(s.image_id, [0, 0, s.width, s.height], s.boxes, error=s.error)
    assert acc.total == 4  # crowd-only and unannotated images are counted
    assert acc.localized["42"] is False
    assert acc.localized["314"] is False
