"""The consensus method (discover.methods.vote) on members whose answers are known."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from discover.boxes import mask_box
from discover.methods import EmptyGraphError, Method, Params, register, unregister
from discover.methods.vote import vote


@dataclass(frozen=True, eq=False)
class _R:
    seed: int
    mask: torch.Tensor
    box: tuple
    score: float


def _box_mask(x0, y0, x1, y1, h=8, w=8):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.fixture
def members():
    answers = {
        "_a": _box_mask(0, 0, 4, 4),
        "_b": _box_mask(1, 1, 4, 4),
        "_c": _box_mask(5, 5, 8, 8),  # the odd one out
        "_none": None,
    }

    def make(name):
        def fn(feats, grid, *, exclude=None, **params):
            m = answers[name]
            if m is None:
                raise EmptyGraphError("nothing")
            return _R(int(torch.nonzero(m.reshape(-1))[0]), m, mask_box(m), 1.0)

        return fn

    for name in answers:
        register(Method(name, make(name), Params))
    yield answers
    for name in answers:
        unregister(name)


FEATS = torch.zeros(64, 4)


def test_box_mode_keeps_the_proposal_the_others_agree_with(members):
    res = vote(FEATS, (8, 8), members="_c,_a,_b,_none")
    assert res.chosen == "_a" and res.box == (0, 0, 4, 4)
    assert set(res.proposals) == {"_a", "_b", "_c"}  # _none found nothing: no vote
    # _a vs (_c, _b): IoU 0 and 9/16
    assert res.score == pytest.approx((0 + 9 / 16) / 2)


def test_mask_mode_keeps_the_patches_with_a_quorum(members):
    res = vote(FEATS, (8, 8), members="_a,_b,_c", mode="mask", quorum=2)
    assert res.box == (1, 1, 4, 4) and res.chosen == "votes"
    assert int(res.mask.sum()) == 9
    res = vote(FEATS, (8, 8), members="_a,_b,_c", mode="mask", quorum=1)
    assert res.box == (0, 0, 4, 4)  # the largest component of the union
    with pytest.raises(EmptyGraphError):
        vote(FEATS, (8, 8), members="_a,_c", mode="mask", quorum=2)


def test_bad_parameters(members):
    with pytest.raises(ValueError, match="at least two"):
        vote(FEATS, (8, 8), members="_a")
    with pytest.raises(ValueError, match="quorum"):
        vote(FEATS, (8, 8), members="_a,_b", mode="mask", quorum=3)
    with pytest.raises(EmptyGraphError):
        vote(FEATS, (8, 8), members="_none,_none")
