"""Tests of discover.objects (several objects per image on top of a registered method)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from discover.boxes import mask_box
from discover.methods import EmptyGraphError, Method, Params
from discover.methods import base as methods_base
from discover.methods.lost import lost
from discover.methods.tokencut import tokencut
from discover.objects import ObjectDetection, discover_objects

PLAIN = {"lost": lost, "tokencut": tokencut}
H, W = 14, 16
BOX_1 = (3, 2, 6, 5)  # x0, y0, x1, y1
BOX_2 = (9, 8, 14, 12)


def _box_mask(box, h=H, w=W):
    m = torch.zeros(h, w, dtype=torch.bool)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = True
    return m


def _two_objects(noise=0.1, seed=0, d=32):
    """Uniform background ``b``; objects ``-b + 2u`` and ``-b - 2u`` (u orthogonal to b):
    each object is dissimilar to the background and to the other object."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g, dtype=torch.float64))
    b, u = q[:, 0].float(), q[:, 1].float()
    f = b.repeat(H, W, 1)
    f[_box_mask(BOX_1)] = -b + 2 * u
    f[_box_mask(BOX_2)] = -b - 2 * u
    f = f + noise * torch.randn(H, W, d, generator=g)
    return f.reshape(H * W, d), (H, W)


@pytest.mark.parametrize("method", ["lost", "tokencut"])
def test_finds_both_planted_objects(method):
    feats, grid = _two_objects()
    dets = discover_objects(feats, grid, method=method, max_objects=2)
    assert len(dets) == 2
    assert {d.box for d in dets} == {BOX_1, BOX_2}
    for d in dets:
        assert isinstance(d, ObjectDetection)
        assert torch.equal(d.mask, _box_mask(d.box))
        assert d.box == d.result.box and d.seed == d.result.seed
        assert bool(d.mask.reshape(-1)[d.seed])
    assert {d.step for d in dets} == {0, 1}
    assert dets[0].score >= dets[1].score
    # Searching for more finds nothing better than the two objects (or stops early).
    more = discover_objects(feats, grid, method=method, max_objects=4)
    assert [d.box for d in more[:2]] == [d.box for d in dets]
    assert all(d.score < min(x.score for x in dets) for d in more[2:])


@pytest.mark.parametrize("method", ["lost", "tokencut"])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_object_is_the_plain_method(method, seed):
    g = torch.Generator().manual_seed(seed)
    cases = [_two_objects(seed=seed), (torch.randn(H * W, 24, generator=g), (H, W))]
    for feats, grid in cases:
        plain = PLAIN[method](feats, grid)
        (det,) = discover_objects(feats, grid, method=method, max_objects=1)
        assert det.box == plain.box and det.seed == plain.seed and det.score == plain.score
        assert torch.equal(det.mask, plain.mask)
        assert det.step == 0


@pytest.mark.parametrize("method", ["lost", "tokencut"])
def test_min_score_abstains(method):
    feats, grid = _two_objects()
    dets = discover_objects(feats, grid, method=method, max_objects=3)
    assert dets, "precondition"
    best = dets[0].score
    assert discover_objects(feats, grid, method=method, max_objects=3, min_score=best + 1) == []
    assert discover_objects(feats, grid, method=method, max_objects=1, min_score=best + 1) == []
    kept = discover_objects(feats, grid, method=method, max_objects=3, min_score=0.5)
    assert all(d.score >= 0.5 for d in kept)
    assert {d.box for d in kept} == {BOX_1, BOX_2}


def test_lost_background_object_dropped_by_min_score():
    feats, grid = _two_objects()
    dets = discover_objects(feats, grid, method="lost", max_objects=3)
    # LOST's third search covers the whole remaining background: score 0, listed last.
    assert len(dets) == 3 and dets[-1].score == 0.0 and dets[-1].box == (0, 0, W, H)
    assert len(discover_objects(feats, grid, method="lost", max_objects=3, min_score=0.1)) == 2


def test_user_exclude_applies_to_every_search():
    feats, grid = _two_objects()
    excl = _box_mask(BOX_2).reshape(-1)
    for method in ("lost", "tokencut"):
        dets = discover_objects(feats, grid, method=method, max_objects=3, exclude=excl)
        assert dets[0].box == PLAIN[method](feats, grid, exclude=excl).box
        assert all(not bool((d.mask & _box_mask(BOX_2)).any()) for d in dets)
        assert BOX_1 in {d.box for d in dets}


# A scripted method, to test the loop, the suppression and the ordering exactly.


@dataclass
class _Fake:
    seed: int
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float


def _scripted(monkeypatch, script):
    """Register method "_scripted": call k returns script[k] = (mask, score), or raises
    EmptyGraphError when script[k] is None. Returns the list of excludes it received."""
    received: list = []

    def fn(feats, grid, *, exclude=None, **params):
        received.append(None if exclude is None else exclude.clone())
        item = script[len(received) - 1]
        if item is None:
            raise EmptyGraphError("scripted: nothing left")
        mask, score = item
        seed = int(torch.nonzero(mask.reshape(-1))[0])
        return _Fake(seed=seed, mask=mask, box=mask_box(mask), score=score)

    monkeypatch.setitem(methods_base._REGISTRY, "_scripted", Method("_scripted", fn, Params))
    return received


def _checker(box, parity):
    m = _box_mask(box, 8, 8)
    ii, jj = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    return m & ((ii + jj) % 2 == parity)


FEATS = torch.zeros(64, 4)


def test_loop_excludes_previous_masks_and_suppresses(monkeypatch):
    a = _checker((0, 0, 4, 4), 0)  # a and b are disjoint but have the same box
    b = _checker((0, 0, 4, 4), 1)
    c = _box_mask((5, 5, 8, 8), 8, 8)
    received = _scripted(monkeypatch, [(a, 0.5), (b, 0.9), (c, 0.5), None])
    dets = discover_objects(FEATS, (8, 8), method="_scripted", max_objects=10)
    assert received[0] is None  # first call exactly as the plain method
    assert torch.equal(received[1], a.reshape(-1))
    assert torch.equal(received[2], (a | b).reshape(-1))
    assert torch.equal(received[3], (a | b | c).reshape(-1))
    # b suppresses a (IoU 1 > 0.5, lower score); sorted by score.
    assert [(d.step, d.score) for d in dets] == [(1, 0.9), (2, 0.5)]
    # With a threshold of 1 nothing is suppressed; equal scores keep discovery order.
    received = _scripted(monkeypatch, [(a, 0.5), (b, 0.9), (c, 0.5), None])
    dets = discover_objects(FEATS, (8, 8), method="_scripted", max_objects=10, iou_threshold=1)
    assert [d.step for d in dets] == [1, 0, 2]


def test_loop_stops(monkeypatch):
    a = _box_mask((0, 0, 2, 2), 8, 8)
    b = _box_mask((4, 4, 6, 6), 8, 8)
    c = _box_mask((0, 6, 2, 8), 8, 8)
    script = [(a, 0.8), (b, 0.2), (c, 0.9)]
    received = _scripted(monkeypatch, script)
    assert len(discover_objects(FEATS, (8, 8), method="_scripted", max_objects=2)) == 2
    assert len(received) == 2  # stops at max_objects
    received = _scripted(monkeypatch, script)
    dets = discover_objects(FEATS, (8, 8), method="_scripted", max_objects=3, min_score=0.5)
    assert [d.step for d in dets] == [2, 0]  # b (0.2) is dropped, the search goes on to c
    assert len(received) == 3
    assert torch.equal(received[2], (a | b).reshape(-1))  # b's patches left the graph
    _scripted(monkeypatch, [(a, 0.8), None, (c, 0.9)])
    dets = discover_objects(FEATS, (8, 8), method="_scripted", max_objects=3)
    assert [d.step for d in dets] == [0]  # stops at EmptyGraphError
    _scripted(monkeypatch, [None])
    with pytest.raises(EmptyGraphError):  # ... which propagates from the first search
        discover_objects(FEATS, (8, 8), method="_scripted", max_objects=3)


def test_method_returning_excluded_patches_is_an_error(monkeypatch):
    a = _box_mask((0, 0, 2, 2), 8, 8)
    _scripted(monkeypatch, [(a, 0.8), (a, 0.7)])
    with pytest.raises(RuntimeError, match="excluded"):
        discover_objects(FEATS, (8, 8), method="_scripted", max_objects=2)


def test_argument_validation():
    feats, grid = _two_objects()
    with pytest.raises(ValueError, match="max_objects"):
        discover_objects(feats, grid, max_objects=0)
    with pytest.raises(ValueError, match="unknown method"):
        discover_objects(feats, grid, method="nope")
    with pytest.raises(ValueError, match="iou_threshold"):
        discover_objects(feats, grid, iou_threshold=1.5)
    with pytest.raises(ValueError, match="min_score"):
        discover_objects(feats, grid, min_score=float("nan"))
    with pytest.raises(ValueError, match="exclude"):
        discover_objects(feats, grid, exclude=torch.zeros(H * W))
