"""Tests of discover.methods.lost: known answers, properties and agreement with the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from conftest import U32, gamma

from discover.methods import EmptyGraphError, get_method
from discover.methods.dino_seg import DinoSegResult, dino_seg
from discover.methods.lost import LostResult, lost, resolve_gram_bias

# --------------------------------------------------------------------------------------
# Plain re-statements of the valeoai/LOST reference (object_discovery.py), written
# independently for comparison. They work on a gram matrix / attention given as is.


def _ref_lost_on_gram(A: torch.Tensor, grid: tuple[int, int], k: int):
    rows, cols = grid
    B = A.clone()
    B.fill_diagonal_(0)
    B[B < 0] = 0
    neg_degree = -torch.sum(B > 0, dim=1).type(torch.float32)
    # The reference's literal call (default sort: ties in whatever order this build gives).
    ranked = torch.argsort(neg_degree, descending=True)
    seed = ranked[0]
    pool = ranked[:k]
    chosen = pool[A[seed, pool] > 0.0]
    M = torch.sum(A[chosen, :], dim=0)
    lab, _ = scipy.ndimage.label(M.reshape(rows, cols).numpy() > 0.0)
    c = lab[np.unravel_index(seed.numpy(), (rows, cols))]
    if c == 0:
        return int(seed), chosen.tolist(), None
    ys, xs = np.where(lab == c)
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return int(seed), chosen.tolist(), box


def _ref_lost(feats: torch.Tensor, grid: tuple[int, int], k: int = 100):
    batched = feats.float()[None]
    A = (batched @ batched.transpose(1, 2))[0]
    return _ref_lost_on_gram(A, grid, k)


def _ref_dino_seg(attn: torch.Tensor, grid: tuple[int, int], head: int, th: float = 0.6):
    rows, cols = grid
    nh = attn.shape[0]
    att = attn.clone().float()
    val, idx = torch.sort(att)  # the reference's default sort
    val /= torch.sum(val, dim=1, keepdim=True)
    cum = torch.cumsum(val, dim=1)
    keep = cum > (1 - th)
    inv = torch.argsort(idx)
    for i in range(nh):
        keep[i] = keep[i][inv[i]]
    keep = keep.reshape(nh, rows, cols).float()
    lab, _ = scipy.ndimage.label(keep[head].numpy())
    sizes = [np.sum(lab == c) for c in range(np.max(lab))]
    chosen = int(np.argmax(sizes[1:])) + 1 if len(sizes) > 1 else 0
    ys, xs = np.where(lab == chosen)
    if len(ys) == 0:
        return chosen, None
    return chosen, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)


# --------------------------------------------------------------------------------------
# Helpers building feature maps with a known answer.


def _three_directions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Unit vectors 120 degrees apart: every cross dot product is -1/2.
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([-0.5, math.sqrt(3) / 2])
    c = torch.tensor([-0.5, -math.sqrt(3) / 2])
    return a, b, c


def _paint(grid, background, blocks):
    """Features [h*w, D]: ``background`` everywhere, each (vec, y0, y1, x0, x1) block painted."""
    h, w = grid
    f = background.expand(h, w, -1).clone()
    for vec, y0, y1, x0, x1 in blocks:
        f[y0:y1, x0:x1] = vec
    return f.reshape(h * w, -1)


# --------------------------------------------------------------------------------------
# Known answers


def test_single_block_on_opposite_background_gives_block_box():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(16, generator=g)
    v = v / v.norm()
    feats = _paint((8, 10), -v, [(v, 2, 5, 3, 7)])
    feats = feats + 0.01 * torch.randn(feats.shape, generator=g)
    res = lost(feats, (8, 10))
    assert isinstance(res, LostResult)
    assert res.box == (3, 2, 7, 5)
    expected = torch.zeros(8, 10, dtype=torch.bool)
    expected[2:5, 3:7] = True
    assert torch.equal(res.mask, expected)
    assert expected.reshape(-1)[res.seed]
    assert sorted(res.similars.tolist()) == torch.nonzero(expected.reshape(-1)).flatten().tolist()
    # 12 object patches: each is positive with the 11 others only.
    assert torch.all(res.scores[expected.reshape(-1)] == 11)
    assert torch.all(res.scores[~expected.reshape(-1)] == 80 - 12 - 1)


def test_two_blocks_pick_the_one_with_lowest_degree():
    a, b, c = _three_directions()
    # Block A: 2x3 = 6 patches (degree 5), block B: 3x3 = 9 (degree 8), background larger.
    feats = _paint((9, 9), c, [(b, 0, 3, 0, 3), (a, 5, 7, 4, 7)])
    res = lost(feats, (9, 9))
    assert res.box == (4, 5, 7, 7)
    block = {r * 9 + c for r in range(5, 7) for c in range(4, 7)}
    assert res.seed in block  # one of the lowest-degree patches
    assert res.seed == _ref_lost(feats, (9, 9))[0]  # the one the reference picks
    # Swap the sizes: now B is the smaller block.
    feats = _paint((9, 9), c, [(b, 0, 2, 0, 2), (a, 5, 8, 4, 7)])
    assert lost(feats, (9, 9)).box == (0, 0, 2, 2)


def test_mask_is_four_connected():
    a, _, c = _three_directions()
    # A 2x2 block and one more patch touching it only by a corner.
    feats = _paint((6, 6), c, [(a, 0, 2, 0, 2), (a, 2, 3, 2, 3)])
    res = lost(feats, (6, 6))
    assert len(res.similars) == 5  # all five patches tie at degree 4: all in the seed set
    if res.seed == 2 * 6 + 2:  # the lone diagonal patch: its component is itself
        assert res.box == (2, 2, 3, 3) and int(res.mask.sum()) == 1
    else:  # a block patch: the diagonal patch is not 4-connected to the block
        assert res.seed in {0, 1, 6, 7}
        assert res.box == (0, 0, 2, 2) and int(res.mask.sum()) == 4


def test_registered_as_method():
    assert get_method("lost").fn is lost


# --------------------------------------------------------------------------------------
# Reference agreement


def _random_case(rng: np.random.Generator):
    h, w = int(rng.integers(1, 13)), int(rng.integers(1, 13))
    n = h * w
    d = int(rng.integers(1, 9))
    kind = rng.integers(0, 3)
    if kind == 0:  # continuous
        feats = torch.from_numpy(rng.standard_normal((n, d))).float()
    elif kind == 1:  # integer valued, many ties in the degrees
        feats = torch.from_numpy(rng.integers(-2, 3, size=(n, d))).float()
    else:  # a few distinct prototypes: heavy ties everywhere
        protos = rng.integers(-1, 2, size=(3, d))
        feats = torch.from_numpy(protos[rng.integers(0, 3, size=n)]).float()
    k = int(rng.choice([1, 2, 5, 100, 10 * n]))
    return feats, (h, w), k


def test_matches_reference_on_random_feature_maps():
    rng = np.random.default_rng(1234)
    compared = 0
    for _ in range(220):
        feats, grid, k = _random_case(rng)
        ref_seed, ref_similars, ref_box = _ref_lost(feats, grid, k)
        if ref_box is None:
            with pytest.raises(EmptyGraphError):
                lost(feats, grid, k_patches=k)
            continue
        res = lost(feats, grid, k_patches=k)
        assert res.seed == ref_seed
        assert res.similars.tolist() == ref_similars
        assert res.box == ref_box
        compared += 1
    assert compared > 150


def test_fixed_grid_7x11_matches_reference():
    rng = np.random.default_rng(7)
    for _ in range(20):
        feats = torch.from_numpy(rng.integers(-3, 4, size=(77, 6))).float()
        ref = _ref_lost(feats, (7, 11), 100)
        if ref[2] is None:
            continue
        res = lost(feats, (7, 11))
        assert (res.seed, res.similars.tolist(), res.box) == ref


def test_seed_and_expansion_follow_the_reference_sort_under_ties():
    # Tie-heavy integer features: many patches share the lowest degree. The seed and the
    # expansion order must be those of the reference's own argsort call on this build,
    # and the order must be non-decreasing in degree.
    rng = np.random.default_rng(5)
    for _ in range(60):
        h, w = int(rng.integers(3, 15)), int(rng.integers(3, 15))
        feats = torch.from_numpy(rng.integers(-1, 2, size=(h * w, 3))).float()
        ref = _ref_lost(feats, (h, w), 100)
        if ref[2] is None:
            continue
        res = lost(feats, (h, w))
        assert res.seed == ref[0]
        assert res.similars.tolist() == ref[1]
        degs = res.scores[res.similars]
        assert torch.all(degs[1:] >= degs[:-1])


def test_all_tied_degrees_take_the_reference_order():
    # Every patch has the same features: all degrees tie; the seed is the first index of
    # the reference's argsort, and all first 100 patches of that order are expanded.
    feats = torch.ones(200, 3)
    res = lost(feats, (10, 20))
    literal = torch.argsort(-torch.full((200,), 199.0), descending=True)
    assert res.seed == int(literal[0])
    assert res.similars.tolist() == literal[:100].tolist()
    assert res.box == (0, 0, 20, 10)


def test_gram_bias_matches_reference_on_shifted_gram():
    rng = np.random.default_rng(3)
    for _ in range(40):
        feats, grid, k = _random_case(rng)
        bias = float(rng.uniform(-3, 3))
        A = feats @ feats.T + bias
        ref = _ref_lost_on_gram(A, grid, k)
        if ref[2] is None:
            with pytest.raises(EmptyGraphError):
                lost(feats, grid, k_patches=k, gram_bias=bias)
            continue
        res = lost(feats, grid, k_patches=k, gram_bias=bias)
        assert (res.seed, res.similars.tolist(), res.box) == ref
        assert res.gram_bias == bias


# --------------------------------------------------------------------------------------
# Properties on random features


@pytest.mark.parametrize("seed", range(10))
def test_properties_on_random_features(seed):
    g = torch.Generator().manual_seed(seed)
    h, w = 5 + seed % 4, 6 + seed % 3
    feats = torch.randn(h * w, 12, generator=g)
    res = lost(feats, (h, w), k_patches=1 + 7 * seed)
    assert res.mask.dtype == torch.bool and res.mask.shape == (h, w)
    assert res.mask.reshape(-1)[res.seed]
    assert res.seed in res.similars.tolist()  # A[seed, seed] = |f|^2 > 0
    x0, y0, x1, y1 = res.box
    ys, xs = torch.nonzero(res.mask, as_tuple=True)
    assert (x0, y0, x1, y1) == (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    A = feats @ feats.T
    degree = (A > 0).sum(1) - 1
    assert torch.equal(res.scores, degree.float())
    assert res.scores[res.seed] == res.scores.min()
    assert res.similars.dtype == torch.long
    assert math.isfinite(res.score)


def test_k_patches_larger_than_n_uses_everything():
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(20, 4, generator=g)
    big = lost(feats, (4, 5), k_patches=1000)
    exact = lost(feats, (4, 5), k_patches=20)
    assert big.seed == exact.seed and big.box == exact.box
    assert torch.equal(big.similars, exact.similars)
    A = feats @ feats.T
    assert sorted(big.similars.tolist()) == torch.nonzero(A[big.seed] > 0).flatten().tolist()


def test_k_patches_one_keeps_only_the_seed():
    g = torch.Generator().manual_seed(12)
    feats = torch.randn(30, 4, generator=g)
    res = lost(feats, (5, 6), k_patches=1)
    assert res.similars.tolist() == [res.seed]


def test_single_patch():
    res = lost(torch.tensor([[0.5, -1.0]]), (1, 1))
    assert res.box == (0, 0, 1, 1) and res.seed == 0
    assert res.similars.tolist() == [0]
    assert res.score == 0.0  # nothing outside the mask to contrast with
    with pytest.raises(EmptyGraphError):  # zero feature: A[0, 0] == 0, empty seed set
        lost(torch.zeros(1, 3), (1, 1))
    with pytest.raises(EmptyGraphError):  # bias cancelling the self-similarity
        lost(torch.tensor([[1.0, 1.0]]), (1, 1), gram_bias=-2.0)


def test_validation_errors():
    feats = torch.randn(12, 4)
    with pytest.raises(ValueError, match="grid"):
        lost(feats, (3, 5))
    with pytest.raises(ValueError, match="2-D"):
        lost(feats[None], (3, 4))
    with pytest.raises(ValueError, match="k_patches"):
        lost(feats, (3, 4), k_patches=0)
    with pytest.raises(ValueError, match="exclude"):
        lost(feats, (3, 4), exclude=torch.zeros(11, dtype=torch.bool))
    bad = feats.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        lost(bad, (3, 4))


# --------------------------------------------------------------------------------------
# exclude


def _same(r1: LostResult, r2: LostResult) -> bool:
    return (
        r1.seed == r2.seed
        and r1.box == r2.box
        and r1.score == r2.score
        and torch.equal(r1.similars, r2.similars)
        and torch.equal(r1.scores, r2.scores)
        and torch.equal(r1.mask, r2.mask)
    )


def test_exclude_all_false_is_identical_to_none():
    rng = np.random.default_rng(21)
    for _ in range(15):
        feats, grid, k = _random_case(rng)
        try:
            plain = lost(feats, grid, k_patches=k)
        except EmptyGraphError:
            continue
        none_excluded = torch.zeros(feats.shape[0], dtype=torch.bool)
        assert _same(plain, lost(feats, grid, k_patches=k, exclude=none_excluded))


def test_exclude_runs_on_the_remaining_subgraph():
    rng = np.random.default_rng(22)
    checked = 0
    for _ in range(60):
        feats, grid, k = _random_case(rng)
        n = feats.shape[0]
        exclude = torch.from_numpy(rng.random(n) < 0.3)
        if exclude.all():
            with pytest.raises(EmptyGraphError):
                lost(feats, grid, exclude=exclude)
            continue
        keep = torch.nonzero(~exclude).flatten()
        sub = feats[keep]
        A = sub @ sub.T
        try:
            res = lost(feats, grid, k_patches=k, exclude=exclude)
        except EmptyGraphError:
            continue
        ref_seed, ref_similars, _ = _ref_lost_on_gram(A, (1, len(keep)), k)
        assert res.seed == int(keep[ref_seed])
        assert res.similars.tolist() == keep[ref_similars].tolist()
        assert not (res.mask.reshape(-1) & exclude).any()
        assert torch.all(res.scores[exclude] == -1)
        assert torch.equal(res.scores[keep], ((A > 0).sum(1) - (A.diagonal() > 0).long()).float())
        checked += 1
    assert checked > 30


def test_exclude_finds_second_object():
    a, b, c = _three_directions()
    feats = _paint((9, 9), c, [(b, 0, 3, 0, 3), (a, 5, 7, 4, 7)])
    first = lost(feats, (9, 9))
    assert first.box == (4, 5, 7, 7)
    second = lost(feats, (9, 9), exclude=first.mask.reshape(-1))
    assert second.box == (0, 0, 3, 3)


def test_exclude_separates_components():
    # One block of the object type split by an excluded column: only the seed's side is kept.
    a, _, c = _three_directions()
    feats = _paint((5, 7), c, [(a, 1, 3, 1, 6)])
    exclude = torch.zeros(5, 7, dtype=torch.bool)
    exclude[:, 3] = True
    res = lost(feats, (5, 7), exclude=exclude.reshape(-1))
    seed_col = res.seed % 7
    assert seed_col != 3
    assert res.box == ((1, 1, 3, 3) if seed_col < 3 else (4, 1, 6, 3))
    assert not res.mask[:, 3].any()


def test_everything_excluded_raises():
    with pytest.raises(EmptyGraphError):
        lost(torch.randn(6, 3), (2, 3), exclude=torch.ones(6, dtype=torch.bool))


# --------------------------------------------------------------------------------------
# dtypes, bias, centering, confidence


def test_bfloat16_and_half_inputs():
    g = torch.Generator().manual_seed(31)
    feats = torch.randn(48, 8, generator=g)
    for dtype in (torch.bfloat16, torch.float16):
        low = feats.to(dtype)
        res = lost(low, (6, 8))
        assert _same(res, lost(low.float(), (6, 8)))
        assert res.scores.dtype == torch.float32


def test_resolve_gram_bias():
    g = torch.Generator().manual_seed(41)
    f = torch.randn(30, 5, generator=g)
    A = f @ f.T
    off = A[~torch.eye(30, dtype=torch.bool)].numpy()
    assert resolve_gram_bias(A, -1.5) == -1.5
    # The same float32 similarities on both sides; a percentile interpolates two of them,
    # lo + (hi - lo) t: at most 3 roundings of numbers up to max |off| in float32.
    tol = 4 * U32 * float(np.abs(off).max())
    for q in (0, 12.5, 50, 90, 100):
        got = resolve_gram_bias(A, f"p{q}")
        assert got == pytest.approx(-np.percentile(off, q), rel=0, abs=tol)
    assert resolve_gram_bias(torch.ones(1, 1), "p50") == 0.0
    for bad in ("50", "p", "p-1", "p101", "q50", "p50%"):
        with pytest.raises(ValueError):
            resolve_gram_bias(A, bad)
    with pytest.raises(ValueError):
        resolve_gram_bias(A, float("nan"))


def test_percentile_bias_makes_that_share_of_edges_negative():
    g = torch.Generator().manual_seed(42)
    feats = torch.randn(64, 6, generator=g) + 2.0  # mostly positive similarities
    # Unit norm: the self-similarity (1) stays above the median, so the seed set is not empty.
    feats = feats / feats.norm(dim=1, keepdim=True)
    res = lost(feats, (8, 8), gram_bias="p50")
    edges = 64 * 63
    assert abs(float(res.scores.sum()) - edges / 2) <= 2
    A = feats @ feats.T
    off = A[~torch.eye(64, dtype=torch.bool)]
    # "p50" interpolates the two middle similarities (torch.median would take the lower
    # one: 7e-5 away here, which a loose tolerance used to hide). Unit vectors of 6 dims:
    # each similarity, computed by LOST and here maybe in another order, is within
    # gamma_6 (times |a|.|b| <= 1) of exact; the interpolation adds 3 roundings.
    expected = -float(np.percentile(off.numpy(), 50))
    assert res.gram_bias == pytest.approx(expected, rel=0, abs=2 * gamma(6) + 4 * U32)


def test_negative_bias_turns_weak_similarities_into_non_edges():
    # Object patches resemble the background a little (0.1), themselves and the background
    # themselves a lot (1.0): without a bias every pair is an edge and LOST boxes the image.
    obj = torch.tensor([1.0, 0.0])
    bg = torch.tensor([0.1, math.sqrt(1 - 0.01)])
    feats = _paint((6, 6), bg, [(obj, 2, 4, 1, 3)])
    assert lost(feats, (6, 6)).box == (0, 0, 6, 6)
    assert lost(feats, (6, 6), gram_bias=-0.5).box == (1, 2, 3, 4)


def test_center_subtracts_the_mean_feature():
    g = torch.Generator().manual_seed(51)
    feats = torch.randn(35, 7, generator=g) + 3.0
    res = lost(feats, (5, 7), center=True)
    assert _same(res, lost(feats - feats.mean(0, keepdim=True), (5, 7)))
    exclude = torch.zeros(35, dtype=torch.bool)
    exclude[:10] = True
    res = lost(feats, (5, 7), center=True, exclude=exclude)
    kept = feats[10:]
    shifted = feats - kept.mean(0, keepdim=True)
    assert _same(res, lost(shifted, (5, 7), exclude=exclude))


def test_confidence_higher_for_clean_object_than_for_noise():
    g = torch.Generator().manual_seed(61)
    v = torch.randn(32, generator=g)
    v = v / v.norm()
    clean = _paint((14, 14), -v, [(v, 4, 9, 5, 10)]) + 0.2 * torch.randn(196, 32, generator=g)
    s_clean = lost(clean, (14, 14)).score
    assert s_clean > 1.5
    for d in (8, 32, 384):
        noise = torch.randn(196, d, generator=g)
        assert lost(noise, (14, 14)).score < 0.5
    # Units: invariant to the feature scale. A power of two scales every intermediate
    # exactly (rounding commutes with it), so the score is the same number, on any CPU;
    # another factor perturbs each gram entry by ~gamma_32 and the sums over the 196
    # patches by ~gamma_196, relative: 4 gamma_(32+196) covers it.
    assert lost(clean * 4.0, (14, 14)).score == s_clean
    assert lost(clean * 5.0, (14, 14)).score == pytest.approx(s_clean, rel=4 * gamma(228))


def test_confidence_is_zero_when_the_mask_is_the_whole_graph():
    feats = torch.randn(20, 4).abs() + 1.0  # every similarity positive
    res = lost(feats, (4, 5))
    assert res.box == (0, 0, 5, 4)
    assert res.score == 0.0


# --------------------------------------------------------------------------------------
# dino_seg


def test_dino_seg_matches_reference_on_random_attention():
    rng = np.random.default_rng(71)
    compared = 0
    for _ in range(150):
        h, w = int(rng.integers(1, 12)), int(rng.integers(1, 12))
        heads = int(rng.integers(1, 5))
        if rng.random() < 0.5:
            attn = torch.from_numpy(rng.random((heads, h * w))).float()
        else:  # ties
            attn = torch.from_numpy(rng.integers(0, 4, size=(heads, h * w))).float()
        head = int(rng.integers(0, heads))
        label, box = _ref_dino_seg(attn, (h, w), head)
        if box is None:
            with pytest.raises(EmptyGraphError):
                dino_seg(attn, (h, w), head=head)
            continue
        res = dino_seg(attn, (h, w), head=head)
        assert isinstance(res, DinoSegResult)
        assert (res.label, res.box) == (label, box)
        compared += 1
    assert compared > 100


def _attention_with_blobs(grid, blobs):
    h, w = grid
    att = torch.full((h, w), 1e-4)
    for val, y0, y1, x0, x1 in blobs:
        att[y0:y1, x0:x1] = val
    return att.reshape(1, -1)


def test_dino_seg_quirk_last_label_never_chosen():
    # Labels are assigned in raster order: the big blob at the bottom gets the last label.
    attn = _attention_with_blobs((10, 10), [(1.0, 0, 2, 0, 2), (1.0, 5, 9, 2, 8)])
    res = dino_seg(attn, (10, 10), keep_mass=0.99)
    assert res.label == 1
    assert res.box == (0, 0, 2, 2)


def test_dino_seg_quirk_single_component_boxes_the_rest():
    attn = _attention_with_blobs((10, 10), [(1.0, 3, 6, 3, 6)])
    res = dino_seg(attn, (10, 10), keep_mass=0.9)
    assert torch.equal(res.kept.reshape(-1), attn[0] > 0.5)
    assert res.label == 0
    assert torch.equal(res.mask, ~res.kept)
    assert res.box == (0, 0, 10, 10)


def test_dino_seg_three_blobs_picks_biggest_candidate():
    attn = _attention_with_blobs(
        (12, 12), [(1.0, 0, 2, 0, 2), (1.0, 0, 4, 5, 9), (1.0, 10, 12, 0, 12)]
    )
    res = dino_seg(attn, (12, 12), keep_mass=0.99)
    assert res.label == 2 and res.box == (5, 0, 9, 4)
    assert 0.0 < res.score <= 1.0


def test_dino_seg_errors():
    attn = torch.rand(3, 20)
    with pytest.raises(ValueError, match="grid"):
        dino_seg(attn, (3, 5))
    with pytest.raises(ValueError, match="head"):
        dino_seg(attn, (4, 5), head=3)
    with pytest.raises(ValueError, match="keep_mass"):
        dino_seg(attn, (4, 5), keep_mass=0.0)
    with pytest.raises(EmptyGraphError):  # a single patch is kept; the fallback is empty
        dino_seg(torch.ones(1, 1), (1, 1))


# --------------------------------------------------------------------------------------
# Devices


def _to_cuda(kwargs: dict) -> dict:
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in kwargs.items()}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_agree():
    rng = np.random.default_rng(81)
    for _ in range(40):
        h, w = int(rng.integers(2, 20)), int(rng.integers(2, 20))
        # Integer-valued features: exact gram matrices on both devices. Ties in the degree
        # order follow each device's sort (as in the reference), so compare the seed's
        # degree, and the full result where the lowest degree is unique.
        feats = torch.from_numpy(rng.integers(-2, 3, size=(h * w, 8))).float()
        exclude = torch.from_numpy(rng.random(h * w) < 0.2)
        settings = (
            {},
            {"exclude": exclude},
            {"gram_bias": -1.0, "k_patches": 7},
            {"gram_bias": "p30"},
        )
        for kwargs in settings:
            try:
                cpu = lost(feats, (h, w), **kwargs)
            except EmptyGraphError:
                with pytest.raises(EmptyGraphError):
                    lost(feats.cuda(), (h, w), **_to_cuda(kwargs))
                continue
            gpu = lost(feats.cuda(), (h, w), **_to_cuda(kwargs))
            assert gpu.mask.is_cuda and gpu.similars.is_cuda and gpu.scores.is_cuda
            assert torch.equal(gpu.scores.cpu(), cpu.scores)
            assert cpu.scores[gpu.seed] == cpu.scores[cpu.seed]
            valid = cpu.scores[cpu.scores >= 0]
            if int((valid == valid.min()).sum()) > 1:
                continue  # tied seeds: each device's sort picks (as the reference's would)
            assert gpu.seed == cpu.seed and gpu.box == cpu.box
            assert torch.equal(gpu.mask.cpu(), cpu.mask)
            # Integer features: both gram matrices are exact; what is left is the rounding
            # of LOST's sums over n patches (gamma_n on either side) and a few divisions.
            n = h * w
            assert gpu.score == pytest.approx(cpu.score, rel=4 * gamma(n) + 16 * U32, abs=1e-9)
            # Small integers are exact in bfloat16: same answer from a bf16 input.
            gpu16 = lost(feats.cuda().bfloat16(), (h, w), **_to_cuda(kwargs))
            assert (gpu16.seed, gpu16.box) == (cpu.seed, cpu.box)
        attn = torch.from_numpy(rng.random((2, h * w))).float()  # continuous: no ties
        try:
            d_cpu = dino_seg(attn, (h, w), head=1)
        except EmptyGraphError:
            continue
        d_gpu = dino_seg(attn.cuda(), (h, w), head=1)
        assert (d_gpu.label, d_gpu.box) == (d_cpu.label, d_cpu.box)
        assert torch.equal(d_gpu.mask.cpu(), d_cpu.mask)
