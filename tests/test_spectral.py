"""Deep spectral localisation (discover.methods.spectral) against a re-statement of the
reference (lukemelas/deep-spectral-segmentation, ``get_eigenvectors_from_features`` with
``which_matrix='laplacian'`` and ``get_bbox_from_patch_mask``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.linalg import eigh
from skimage.measure import label as measure_label

from discover.methods import EmptyGraphError
from discover.methods.spectral import spectral


def _reference(feats: torch.Tensor, grid):
    f = F.normalize(feats.double(), p=2, dim=-1)
    a = (f @ f.T).numpy()
    W = a * (a > 0)
    W = W / W.max()
    d = W @ np.ones(W.shape[0])
    d[d < 1e-12] = 1.0
    D = np.diag(d)
    # The reference calls eigsh(D - W, k=2, sigma=0, which="LM", M=D): the same two
    # smallest generalised eigenpairs, which a dense solver gives without shift-invert.
    vals, vecs = eigh(D - W, D)
    y = vecs[:, 1]
    mask = (y > 0).reshape(grid).astype(np.uint8)
    if 0.5 < mask.mean() < 1.0:
        mask = 1 - mask
    elif mask.sum() == 0:
        mask = 1 - mask
    labels = measure_label(mask)
    lab = np.argmax(np.bincount(labels.flat)[1:]) + 1
    ys, xs = np.where(labels == lab)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), y


def test_matches_the_reference_on_planted_objects():
    rng = np.random.default_rng(0)
    compared = 0
    for i in range(40):
        h, w = int(rng.integers(4, 11)), int(rng.integers(4, 11))
        base = rng.normal(size=16)
        feats = base + 0.6 * rng.normal(size=(h * w, 16))
        y0, x0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
        obj = np.zeros((h, w), bool)
        obj[y0 : y0 + rng.integers(1, 4), x0 : x0 + rng.integers(1, 5)] = True
        feats[obj.reshape(-1)] += 2.5 * rng.normal(size=16)
        t = torch.tensor(feats)
        box, y = _reference(t, (h, w))
        if abs((y > 0).mean() - 0.5) < 1e-9:
            continue  # a sign the reference leaves to its solver
        res = spectral(t.float(), (h, w))
        assert res.box == box, i
        assert bool(res.mask.reshape(-1)[res.seed])
        compared += 1
    assert compared >= 30


def test_exclude_and_errors():
    rng = np.random.default_rng(1)
    feats = torch.tensor(rng.normal(size=(30, 8))).float()
    first = spectral(feats, (5, 6))
    second = spectral(feats, (5, 6), exclude=first.mask.reshape(-1))
    assert not bool((second.mask & first.mask).any())
    with pytest.raises(EmptyGraphError):
        spectral(feats, (5, 6), exclude=torch.arange(30) > 1)
    zero = feats.clone()
    zero[3] = 0
    with pytest.raises(ValueError, match="zero norm"):
        spectral(zero, (5, 6))
