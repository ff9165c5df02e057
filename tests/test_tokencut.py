"""Tests of discover.methods.tokencut against a scipy re-statement of the reference TokenCut."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import torch
import torch.nn.functional as F

import discover.methods.tokencut as tc
from discover.methods import EmptyGraphError
from discover.methods.tokencut import TokenCutResult, tokencut


def _reference(feats: torch.Tensor, grid, tau=0.2, eps=1e-5, exclude=None) -> dict:
    """The reference pipeline (generalized eigh with D, mean split, seed flip, 4-CC),
    re-stated with scipy; ``exclude`` drops rows/columns before building the graph."""
    h, w = grid
    kept = np.arange(h * w) if exclude is None else np.flatnonzero(~exclude.numpy())
    unit = F.normalize(feats[kept].float(), p=2, dim=1)
    adj = np.where((unit @ unit.T).numpy() > tau, 1.0, eps)
    deg = np.diag(adj.sum(axis=1))
    vals, vecs = scipy.linalg.eigh(deg - adj, deg, subset_by_index=[1, 2])
    y = vecs[:, 0].copy()
    split = y > y.sum() / len(y)
    seed = int(np.argmax(np.abs(y)))
    if not split[seed]:
        y = -y
        split = ~split
    full_y = np.zeros(h * w)
    full_y[kept] = y
    full_split = np.zeros(h * w, dtype=bool)
    full_split[kept] = split
    labels, _ = scipy.ndimage.label(full_split.reshape(h, w))
    return {
        "kept": kept,
        "y": full_y.reshape(h, w),
        "split": full_split.reshape(h, w),
        "labels": labels,
        "seed": int(kept[seed]),
        "vals": vals,
    }


def _component_box(labels: np.ndarray, seed: int):
    w = labels.shape[1]
    comp = labels == labels[seed // w, seed % w]
    rows, cols = np.nonzero(comp)
    return comp, (int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1)


def _random_case(rng: np.random.Generator, kind: str):
    h, w = (int(v) for v in rng.integers(5, 17, size=2))
    d = int(rng.choice([8, 16, 48]))
    if kind == "iid":
        feats = rng.standard_normal((h * w, d))
    elif kind == "smooth":
        low = torch.from_numpy(rng.standard_normal((1, d, 3, 3)))
        up = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=True)
        feats = up[0].permute(1, 2, 0).reshape(h * w, d).numpy()
        feats = feats + 0.3 * rng.standard_normal(feats.shape)
    else:  # planted rectangles on a background, with noise
        base = rng.standard_normal(d)
        feats = np.tile(base, (h, w, 1))
        for _ in range(int(rng.integers(1, 4))):
            y0, x0 = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
            y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
            feats[y0:y1, x0:x1] = rng.standard_normal(d)
        feats = feats.reshape(h * w, d) + rng.uniform(0.05, 0.8) * rng.standard_normal((h * w, d))
    tau = float(rng.choice([0.01, 0.2, 0.2, 0.4]))
    exclude = None
    if rng.random() < 0.25:
        exclude = torch.from_numpy(rng.random(h * w) < 0.2)
    return torch.from_numpy(feats).float(), (h, w), tau, exclude


def _exact_ties(ref: dict) -> dict:
    """The reference's decisions with ties taken in exact arithmetic (documented rule):
    first index among tied ``|y|``, patches tied with the mean are background."""
    h, w = ref["y"].shape
    kept = ref["kept"]
    y = ref["y"].reshape(-1)[kept]
    mag = np.abs(y)
    tol = tc.TIE_RTOL * mag.max()
    seed_local = int(np.flatnonzero(mag >= mag.max() - tol)[0])
    centred = y - y.mean()
    if centred[seed_local] < 0:
        y, centred = -y, -centred
    split = np.zeros(h * w, dtype=bool)
    split[kept] = centred > tol
    full_y = np.zeros(h * w)
    full_y[kept] = y
    labels, _ = scipy.ndimage.label(split.reshape(h, w))
    seed = int(kept[seed_local])
    comp, box = _component_box(labels, seed)
    # Unambiguous: no near-tie for the seed nor at the mean, the reference's own output.
    clear = (np.sort(mag)[-2] < mag.max() * (1 - 1e-6)) and np.abs(centred).min() > 1e-6 * mag.max()
    return {
        "seed": seed,
        "y": full_y.reshape(h, w),
        "split": split.reshape(h, w),
        "mask": comp,
        "box": box,
        "clear": clear,
    }


def test_matches_reference_on_random_and_structured_maps():
    rng = np.random.default_rng(1234)
    compared = strict = 0
    for i in range(60):
        feats, grid, tau, exclude = _random_case(rng, ("iid", "smooth", "planted")[i % 3])
        try:
            ref = _reference(feats, grid, tau=tau, exclude=exclude)
        except (ValueError, np.linalg.LinAlgError):
            continue  # degenerate for the reference too
        lam2, lam3 = ref["vals"]
        if lam3 - lam2 < 1e-7 * max(1.0, abs(lam3)):
            continue  # repeated eigenvalue: the eigenvector itself is not defined
        try:
            ours = tokencut(feats, grid, tau=tau, exclude=exclude)
        except EmptyGraphError:
            continue
        exact = _exact_ties(ref)
        # Both solve the same float64 problem (the binarised weights are exact). An
        # eigenvector is then determined to ~eps64 ||L|| / gap (Davis-Kahan): with the gap
        # kept above 1e-7 that is below 1e-8, under the 1e-7 allowed; the eigenvalue to
        # ~eps64 ||L||, far under 1e-7 relative.
        np.testing.assert_allclose(ours.eigenvector.numpy(), exact["y"], atol=1e-7)
        assert math.isclose(ours.eigenvalue, lam2, rel_tol=1e-7, abs_tol=1e-10)
        assert ours.seed == exact["seed"]
        assert torch.equal(ours.bipartition, torch.from_numpy(exact["split"]))
        assert torch.equal(ours.mask, torch.from_numpy(exact["mask"]))
        assert ours.box == exact["box"]
        compared += 1
        if exact["clear"]:
            # No tie anywhere: identical to the reference's own (round-off free) output.
            assert ours.seed == ref["seed"]
            assert torch.equal(ours.bipartition, torch.from_numpy(ref["split"]))
            np.testing.assert_allclose(ours.eigenvector.numpy(), ref["y"], atol=1e-7)
            assert ours.box == _component_box(ref["labels"], ref["seed"])[1]
            strict += 1
    assert compared >= 50
    assert strict >= 30


def test_result_does_not_depend_on_eigenvector_sign(monkeypatch):
    rng = np.random.default_rng(7)
    for i in range(12):
        feats, grid, tau, exclude = _random_case(rng, ("iid", "smooth", "planted")[i % 3])
        try:
            plain = tokencut(feats, grid, tau=tau, exclude=exclude)
        except EmptyGraphError:
            continue
        original = tc.second_eigenpair

        def negated(weights, *, solver="auto", _orig=original):
            lam, y = _orig(weights, solver=solver)
            return lam, -y

        monkeypatch.setattr(tc, "second_eigenpair", negated)
        flipped = tokencut(feats, grid, tau=tau, exclude=exclude)
        monkeypatch.setattr(tc, "second_eigenpair", original)
        assert flipped.seed == plain.seed
        assert flipped.box == plain.box
        assert torch.equal(flipped.mask, plain.mask)
        assert torch.equal(flipped.bipartition, plain.bipartition)
        assert torch.equal(flipped.eigenvector, plain.eigenvector)


def _planted(h=12, w=14, d=32, block=(3, 7, 4, 9), noise=0.3, seed=0, extra=()):
    """Background + an object block rows y0:y1, cols x0:x1 (block = y0, y1, x0, x1), and
    optional ``extra`` blocks each with its own feature; returns the first block's mask."""
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(d, generator=g).repeat(h, w, 1)
    for y0, y1, x0, x1 in (block, *extra):
        f[y0:y1, x0:x1] = torch.randn(d, generator=g)
    f = f + noise * torch.randn(h, w, d, generator=g)
    truth = torch.zeros(h, w, dtype=torch.bool)
    y0, y1, x0, x1 = block
    truth[y0:y1, x0:x1] = True
    return f.reshape(h * w, d), (h, w), truth


def test_recovers_planted_block_exactly():
    feats, grid, truth = _planted()
    r = tokencut(feats, grid)
    assert isinstance(r, TokenCutResult)
    assert torch.equal(r.mask, truth)
    assert torch.equal(r.bipartition, truth)
    assert r.box == (4, 3, 9, 7)
    assert r.seed == 3 * 14 + 4  # first patch of the (tied) object block
    assert r.mask.dtype == torch.bool and r.mask.shape == (12, 14)
    assert r.eigenvector.shape == (12, 14)
    assert bool((r.eigenvector[truth] > r.eigenvector[~truth].max()).all())


def test_planted_object_scores_higher_than_noise():
    feats, grid, _ = _planted(noise=0.5)
    clean = tokencut(feats, grid)
    noise = tokencut(torch.randn(feats.shape, generator=torch.Generator().manual_seed(3)), grid)
    assert clean.score > 0.9
    assert noise.score < clean.score - 0.2
    assert math.isclose(clean.score, 1.0 - clean.eigenvalue)


def test_lanczos_matches_dense():
    feats, grid, tau, _ = _random_case(np.random.default_rng(5), "smooth")
    dense = tokencut(feats, grid, tau=tau, solver="dense")
    lanczos = tokencut(feats, grid, tau=tau, solver="lanczos")
    assert lanczos.seed == dense.seed and lanczos.box == dense.box
    assert torch.equal(lanczos.mask, dense.mask)
    # Lanczos converges to machine precision (eigsh's tol=0): as for the reference test
    # above, both eigenvectors are within ~eps64 ||L|| / gap of the exact one.
    torch.testing.assert_close(lanczos.eigenvector, dense.eigenvector, atol=1e-8, rtol=0)
    assert math.isclose(lanczos.eigenvalue, dense.eigenvalue, abs_tol=1e-10)
    feats, grid, _ = _planted()
    assert torch.equal(tokencut(feats, grid, solver="lanczos").mask, tokencut(feats, grid).mask)


def test_low_precision_input():
    feats, grid, truth = _planted(noise=0.2)
    for dtype in (torch.bfloat16, torch.float16):
        r = tokencut(feats.to(dtype), grid)
        assert torch.equal(r.mask, truth)
        assert math.isfinite(r.score)
        assert bool(torch.isfinite(r.eigenvector).all())


@pytest.mark.parametrize(
    ("feats", "grid", "exclude", "match"),
    [
        (torch.ones(20, 8), (4, 5), None, "mutually similar"),
        (torch.randn(1, 8), (1, 1), None, "at least 3"),
        (torch.randn(2, 8), (1, 2), None, "at least 3"),
        (torch.randn(6, 8), (2, 3), torch.ones(6, dtype=torch.bool), "every patch"),
        (torch.randn(6, 8), (2, 3), torch.tensor([1, 1, 0, 1, 0, 1]).bool(), "at least 3"),
        (torch.eye(12), (3, 4), None, "no two patches"),
        (torch.zeros(12, 4), (3, 4), None, "no two patches"),
    ],
)
def test_degenerate_inputs_raise(feats, grid, exclude, match):
    with pytest.raises(EmptyGraphError, match=match):
        tokencut(feats, grid, exclude=exclude)


def test_identical_features_with_tiny_noise_raise_not_nan():
    feats = torch.ones(30, 16) + 1e-4 * torch.randn(30, 16)
    with pytest.raises(EmptyGraphError):
        tokencut(feats, (5, 6))


def test_zero_feature_rows_give_finite_result():
    feats, grid, truth = _planted()
    feats = feats.clone()
    feats[0] = 0.0  # normalizes to 0: isolated patch linked by eps edges only
    r = tokencut(feats, grid)
    assert bool(torch.isfinite(r.eigenvector).all()) and math.isfinite(r.score)


def test_exclude_semantics():
    feats, grid, truth = _planted(extra=[(8, 11, 1, 4)])
    h, w = grid
    first = tokencut(feats, grid)
    assert torch.equal(first.mask, truth)
    # Excluding the found object: the new object avoids it, excluded entries are zero/False.
    excl = first.mask.reshape(-1)
    second = tokencut(feats, grid, exclude=excl)
    assert second.box == (1, 8, 4, 11)
    assert not bool((second.mask & first.mask).any())
    assert not bool((second.bipartition & first.mask).any())
    assert bool((second.eigenvector[first.mask] == 0).all())
    assert not bool(excl[second.seed])
    # An [h, w] exclude mask is accepted too.
    assert tokencut(feats, grid, exclude=first.mask).box == second.box

    # Excluding the last three columns equals running on the cropped grid.
    excl = torch.zeros(h, w, dtype=torch.bool)
    excl[:, w - 3 :] = True
    crop = feats.reshape(h, w, -1)[:, : w - 3].reshape(h * (w - 3), -1)
    on_crop = tokencut(crop, (h, w - 3))
    with_excl = tokencut(feats, grid, exclude=excl.reshape(-1))
    assert with_excl.box == on_crop.box
    assert torch.equal(with_excl.mask[:, : w - 3], on_crop.mask)
    assert divmod(with_excl.seed, w) == divmod(on_crop.seed, w - 3)


def test_component_does_not_cross_excluded_patches():
    feats, grid, truth = _planted(block=(2, 8, 2, 12))
    excl = torch.zeros(grid, dtype=torch.bool)
    excl[:, 6] = True  # cut the object in two halves
    r = tokencut(feats, grid, exclude=excl.reshape(-1))
    half = truth.clone()
    half[:, 6:] = False
    assert torch.equal(r.mask, half)  # the seed is the first patch, in the left half
    assert r.box == (2, 2, 6, 8)


def test_input_validation():
    with pytest.raises(ValueError, match="2-D"):
        tokencut(torch.randn(2, 6, 8), (2, 3))
    with pytest.raises(ValueError, match="rows"):
        tokencut(torch.randn(7, 8), (2, 3))
    with pytest.raises(ValueError, match="exclude"):
        tokencut(torch.randn(6, 8), (2, 3), exclude=torch.zeros(6))
    with pytest.raises(ValueError, match="exclude"):
        tokencut(torch.randn(6, 8), (2, 3), exclude=torch.zeros(5, dtype=torch.bool))
    bad = torch.randn(6, 8)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        tokencut(bad, (2, 3))
    with pytest.raises(ValueError, match="solver"):
        tokencut(torch.randn(6, 8), (2, 3), solver="qr")
    with pytest.raises(ValueError, match="eps"):
        tokencut(torch.randn(6, 8), (2, 3), eps=0.0)


def test_registered():
    from discover.methods import get_method, method_names

    assert get_method("tokencut").fn is tokencut
    assert "tokencut" in method_names()
