"""FOUND's training-free step (discover.methods.found) against a re-statement of the
reference (valeoai/FOUND ``bkg_seg.compute_img_bkg_seg`` and
``misc.get_bbox_from_segmentation_labels``)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

from discover.methods import EmptyGraphError, get_method
from discover.methods.found import found


def _reference(att: torch.Tensor, feats: torch.Tensor, grid, th: float = 0.3):
    """The reference on one image: ``att`` [nh, N] (the [CLS] row, patches only),
    ``feats`` [N, nh * dim] keys. Returns (background mask, box in patches)."""
    nh, n = att.shape
    h, w = grid
    a = att[None].reshape(1, nh, h, w)
    threshold = torch.mean(a.reshape(1, -1), dim=1)
    q = torch.sum(a.reshape(1, nh, h * w) > threshold[:, None, None], axis=2) / (h * w)
    beta = torch.log(torch.sum(q + 1e-10, dim=1)[:, None] / (q + 1e-10))
    descs = feats[None].reshape(1, -1, nh, feats.shape[1] // nh) * beta[:, None, :, None]
    descs = F.normalize(descs.reshape(1, -1, feats.shape[1]), dim=-1, p=2)
    cos = torch.bmm(descs, descs.permute(0, 2, 1))
    a = a * beta[:, :, None, None]
    ref = torch.argmin(torch.sum(a, axis=1).reshape(1, -1), dim=-1)
    bkg = cos[torch.arange(1), ref, :].reshape(h, w) > th
    objects, _ = scipy.ndimage.label((~bkg).numpy())
    fg = objects.flatten()[objects.flatten() != 0]
    if fg.size == 0:
        return bkg, None
    lab = np.bincount(fg).argmax()
    ys, xs = np.where(objects == lab)
    return bkg, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


def _case(rng: np.random.Generator, h: int, w: int, heads: int = 3, dim: int = 8):
    n = h * w
    feats = rng.normal(size=(n, heads * dim))
    # a planted object: a block of patches sharing a direction
    y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
    obj = np.zeros((h, w), bool)
    obj[y0 : y0 + rng.integers(2, h - y0 + 1), x0 : x0 + rng.integers(2, w - x0 + 1)] = True
    feats[obj.reshape(-1)] += 3 * rng.normal(size=heads * dim)
    feats[~obj.reshape(-1)] += 2 * rng.normal(size=heads * dim)
    logits = rng.normal(size=(heads, n + 1)) + 2.0 * np.r_[0, obj.reshape(-1)][None]
    att = torch.softmax(torch.tensor(logits), dim=-1)[:, 1:].float()
    return torch.tensor(feats).float(), att


def test_matches_the_reference_on_random_images():
    rng = np.random.default_rng(0)
    compared = 0
    for i in range(60):
        h, w = int(rng.integers(3, 12)), int(rng.integers(3, 12))
        feats, att = _case(rng, h, w)
        th = float(rng.choice([0.1, 0.3, 0.5]))
        bkg, box = _reference(att, feats, (h, w), th)
        if box is None:
            with pytest.raises(EmptyGraphError):
                found(feats, (h, w), cls_attention=att, bkg_th=th)
            continue
        res = found(feats, (h, w), cls_attention=att, bkg_th=th)
        assert torch.equal(res.background, bkg), i
        assert res.box == box, i
        assert bool(res.mask.reshape(-1)[res.seed])  # the seed of the object is in it
        assert bool(res.background.reshape(-1)[res.background_seed])
        assert 0.0 < res.score <= 1.0
        compared += 1
    assert compared > 40


def test_ties_in_the_seed_and_the_largest_component_go_to_the_first():
    h, w, heads = 4, 6, 2
    att = torch.full((heads, h * w), 0.1)
    att[:, 5] = att[:, 17] = 0.01  # two least-attended patches: the first one is the seed
    feats = torch.zeros(h * w, heads * 4)
    feats[:, 0] = 1.0  # background direction
    left = [(1, 0), (1, 1)]
    right = [(2, 4), (2, 5)]  # two object blobs of equal size
    for r, c in left + right:
        feats[r * w + c] = torch.tensor([0.0, 1.0] + [0.0] * 6)
    res = found(feats, (h, w), cls_attention=att)
    assert res.background_seed == 5
    assert res.box == (0, 1, 2, 2)  # the lower label (raster order) wins the tie


def test_exclude_registers_and_errors():
    rng = np.random.default_rng(3)
    feats, att = _case(rng, 6, 7)
    feats[:3] = 5 * torch.tensor(rng.normal(size=24)).float()  # a second object, top left
    first = found(feats, (6, 7), cls_attention=att)
    second = found(feats, (6, 7), cls_attention=att, exclude=first.mask.reshape(-1))
    assert not bool((second.mask & first.mask).any())
    assert second.background_seed == first.background_seed  # background stays background
    assert get_method("found").needs == {"cls_attention"}
    with pytest.raises(ValueError, match="multiple of"):
        found(feats[:, :5], (6, 7), cls_attention=att)
    with pytest.raises(ValueError, match="cls_attention must be"):
        found(feats, (6, 7), cls_attention=att[:, :-1])
    with pytest.raises(ValueError, match="bkg_th"):
        found(feats, (6, 7), cls_attention=att, bkg_th=1.5)
    with pytest.raises(EmptyGraphError):
        found(feats, (6, 7), cls_attention=att, exclude=torch.ones(42, dtype=torch.bool))
