"""Tests of discover.diagnostics: outlier detection, token-norm split, [CLS] attention, LOST."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import pytest
import torch
from conftest import U32, gamma

from discover.backbone import Backbone
from discover.diagnostics import (
    AUTO_MIN_RATIO,
    cls_attention_maps,
    find_outliers,
    lost_diagnostics,
    norm_stats,
    outlier_threshold,
    resolve_threshold,
)
from discover.images import read_image
from discover.methods.lost import lost

SAMPLES = sorted((Path(__file__).resolve().parent.parent / "samples").glob("*.jpg"))


# -- outlier threshold on synthetic norms ------------------------------------------------------
def _lognormal(n: int, median: float, sigma: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return median * torch.exp(sigma * torch.randn(n, generator=g))


def test_auto_flags_exactly_the_planted_token():
    norms = _lognormal(400, 40.0, 0.1, seed=0)
    norms[123] = 400.0  # ~10x the median, like the paper's high-norm tokens
    flags = find_outliers(norms)
    assert flags.dtype == torch.bool and flags.shape == norms.shape
    assert torch.nonzero(flags).flatten().tolist() == [123]


def test_auto_flags_a_few_percent_of_planted_tokens_in_a_map():
    norms = _lognormal(32 * 32, 50.0, 0.15, seed=1).reshape(32, 32)
    planted = [(3, 4), (10, 30), (20, 2), (31, 31), (15, 15), (0, 7), (7, 0), (25, 25)]
    for i, (r, c) in enumerate(planted):
        norms[r, c] = 250.0 + 40 * i
    flags = find_outliers(norms)
    assert flags.shape == (32, 32)
    got = sorted(tuple(rc) for rc in torch.nonzero(flags).tolist())
    assert got == sorted(planted)


@pytest.mark.parametrize("sigma", [0.05, 0.2, 0.4])
def test_auto_has_no_false_positive_on_unimodal_maps(sigma):
    for seed in range(20):
        norms = _lognormal(1024, 30.0, sigma, seed=seed)
        assert not bool(find_outliers(norms).any()), (sigma, seed)


def test_ratio_floor_protects_constant_maps():
    # MAD is zero here: without the floor the slightly larger token would be flagged.
    norms = torch.full((100,), 10.0)
    norms[5] = 10.0 * AUTO_MIN_RATIO * 0.9
    assert not bool(find_outliers(norms).any())
    norms[5] = 10.0 * AUTO_MIN_RATIO * 1.1
    assert torch.nonzero(find_outliers(norms)).flatten().tolist() == [5]
    assert outlier_threshold(torch.full((100,), 10.0)) == pytest.approx(10.0 * AUTO_MIN_RATIO)


def test_threshold_formula_and_scale_invariance():
    norms = _lognormal(500, 20.0, 0.3, seed=3)
    logs = norms.double().log()
    m = float(logs.quantile(0.5))
    sigma = 1.4826 * float((logs - m).abs().quantile(0.5))
    expected = math.exp(m + max(5.0 * sigma, math.log(2.0)))
    assert outlier_threshold(norms, k=5.0, min_ratio=2.0) == pytest.approx(expected, rel=1e-9)
    assert outlier_threshold(7.5 * norms) == pytest.approx(7.5 * outlier_threshold(norms))
    # The outliers themselves barely move the cutoff (median and MAD are robust).
    spiked = norms.clone()
    spiked[:10] = 1e4
    assert outlier_threshold(spiked) == pytest.approx(outlier_threshold(norms), rel=0.1)


def test_fixed_threshold_is_strict_and_accepts_strings():
    norms = torch.tensor([10.0, 150.0, 150.5, 400.0])
    assert find_outliers(norms, 150).tolist() == [False, False, True, True]
    assert find_outliers(norms, "150").tolist() == [False, False, True, True]
    assert find_outliers(norms, " AUTO ").tolist() == find_outliers(norms).tolist()
    assert resolve_threshold(norms, 3) == 3.0


@pytest.mark.parametrize("bad", ["high", "nan", float("nan")])
def test_bad_threshold_raises(bad):
    with pytest.raises(ValueError):
        find_outliers(torch.ones(4), bad)


def test_threshold_rejects_bad_input():
    with pytest.raises(ValueError):
        outlier_threshold(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError):
        outlier_threshold(torch.ones(3), min_ratio=1.0)
    with pytest.raises(ValueError):
        outlier_threshold(torch.ones(3), k=-1)
    assert outlier_threshold(torch.empty(0)) == math.inf
    # zero norms do not break the log
    assert math.isfinite(outlier_threshold(torch.tensor([0.0, 1.0, 1.0, 1.0])))


# -- token-norm split --------------------------------------------------------------------------
def test_norm_stats_splits_cls_registers_and_patches_row_major():
    t = torch.arange(1 + 4 + 6, dtype=torch.float32) + 1.0
    s = norm_stats(t, (2, 3), num_cls=1, num_registers=4, threshold=10.5)
    assert s.cls_norms.tolist() == [1.0]
    assert s.register_norms.tolist() == [2.0, 3.0, 4.0, 5.0]
    assert s.patch_norms.tolist() == [[6.0, 7.0, 8.0], [9.0, 10.0, 11.0]]
    assert s.outlier_positions == [(1, 2)]
    assert s.num_outliers == 1 and s.outlier_fraction == pytest.approx(1 / 6)
    assert s.max_norm == 11.0 and s.median_norm == pytest.approx(8.5)
    assert s.threshold == 10.5


def test_auto_threshold_ignores_high_norm_registers():
    patches = _lognormal(64, 20.0, 0.1, seed=4)
    t = torch.cat([torch.tensor([15.0]), torch.full((4,), 500.0), patches])
    s = norm_stats(t, (8, 8), num_cls=1, num_registers=4)
    assert s.threshold == pytest.approx(outlier_threshold(patches))
    assert s.num_outliers == 0


def test_norm_stats_layout_mismatch_raises():
    with pytest.raises(ValueError, match="expected"):
        norm_stats(torch.ones(10), (2, 3), num_cls=1, num_registers=4)
    with pytest.raises(ValueError):
        norm_stats(torch.ones(2, 7), (2, 3))


# -- [CLS] attention split ------------------------------------------------------------------------
def test_attention_split_and_renormalisation():
    g = torch.Generator().manual_seed(0)
    heads, n_cls, n_reg, grid = 3, 1, 4, (2, 5)
    logits = 3 * torch.randn(heads, n_cls + n_reg + 10, generator=g)
    full = logits.softmax(-1)
    T = full.shape[-1]
    # Probabilities (at most 1) from T exps (a few ulps), a sum of T terms (gamma_T) and a
    # division, then renormalised by another sum: either side is within 2 gamma_T + 8 u of
    # the exact value whatever the summation order, so they differ by twice that.
    tol = {"rtol": 0.0, "atol": 4 * gamma(T) + 16 * U32}
    a = cls_attention_maps(full, grid, num_cls=n_cls, num_registers=n_reg)
    assert a.patches.shape == (heads, 2, 5) and a.registers.shape == (heads, 4)
    torch.testing.assert_close(a.patches.reshape(heads, -1), full[:, 5:], **tol)
    total = a.cls.sum(1) + a.registers.sum(1) + a.patches.sum((1, 2))
    torch.testing.assert_close(total, torch.ones(heads), **tol)
    # Without registers: a softmax of the [CLS] logits over the [CLS] and patch keys only.
    kept = torch.cat([logits[:, :1], logits[:, 5:]], dim=1).softmax(-1)
    torch.testing.assert_close(a.patches_no_registers.reshape(heads, -1), kept[:, 1:], **tol)
    torch.testing.assert_close(a.cls_no_registers, kept[:, :1], **tol)
    torch.testing.assert_close(a.register_mass, full[:, 1:5].sum(1), **tol)
    torch.testing.assert_close(a.mean_map(), a.patches_no_registers.mean(0), **tol)
    torch.testing.assert_close(a.mean_map(registers=True, head=1), a.patches[1], **tol)
    with pytest.raises(ValueError):
        a.mean_map(head=3)


def test_attention_without_registers_is_unchanged_by_renormalisation():
    full = torch.randn(2, 1 + 6).softmax(-1)
    a = cls_attention_maps(full, (2, 3))
    # renormalising by a sum of 7 probabilities (exactly 1 up to gamma_7) moves by that
    atol = 2 * gamma(7) + 4 * U32
    torch.testing.assert_close(a.patches, a.patches_no_registers, rtol=0, atol=atol)
    assert a.registers.shape == (2, 0)


# -- on a real (random-init) backbone -------------------------------------------------------------
@pytest.fixture(scope="module")
def reg_backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone("vit_small_patch14_reg4_dinov2", pretrained=False)


@pytest.fixture(scope="module")
def plain_backbone() -> Backbone:
    torch.manual_seed(0)
    return Backbone("vit_small_patch14_dinov2", pretrained=False)


def _image(path: Path, size: tuple[int, int] = (168, 112)):
    return cv2.resize(read_image(path).array, size, interpolation=cv2.INTER_AREA)


def _plant(bb: Backbone, token: int, factor: float):
    """Scale one output token of the last block (before the final norm) by ``factor``."""

    def hook(module, inputs, output):
        output = output.clone()
        output[:, token] *= factor
        return output

    return bb.model.blocks[-1].register_forward_hook(hook)


def test_planted_high_norm_token_is_the_only_outlier(reg_backbone):
    bb = reg_backbone
    img = _image(SAMPLES[0])
    h, w = 112 // 14, 168 // 14
    clean, _ = bb.extract([img], norms=True)
    layout = {"num_cls": bb.num_cls, "num_registers": bb.num_registers}
    assert norm_stats(clean.token_norms[0], clean.grid, **layout).num_outliers == 0
    r, c = 5, 7
    handle = _plant(bb, bb.num_prefix_tokens + r * w + c, 100.0)
    try:
        feats, _ = bb.extract([img], norms=True)
    finally:
        handle.remove()
    s = norm_stats(feats.token_norms[0], feats.grid, **layout)
    assert feats.grid == (h, w)
    assert s.outlier_positions == [(r, c)]
    assert s.outlier_fraction == pytest.approx(1 / (h * w))


@pytest.mark.parametrize("which", ["reg_backbone", "plain_backbone"])
def test_no_outlier_on_random_init_models(which, request):
    bb = request.getfixturevalue(which)
    feats, _ = bb.extract([_image(path, (168, 168)) for path in SAMPLES], norms=True)
    for path, norms in zip(SAMPLES, feats.token_norms, strict=True):
        layout = {"num_cls": bb.num_cls, "num_registers": bb.num_registers}
        s = norm_stats(norms, feats.grid, **layout)
        assert s.num_outliers == 0, path.name


def test_backbone_cls_attention_is_the_attention_timm_applies(reg_backbone):
    """The [CLS] row computed from q/k, applied to v, gives timm's own attention output."""
    bb = reg_backbone
    kept = {}
    attn = bb.model.blocks[-1].attn
    handle = attn.proj.register_forward_hook(lambda m, i, o: kept.setdefault("x", i[0]))
    qkv_kept = {}
    h2 = attn.qkv.register_forward_hook(lambda m, i, o: qkv_kept.setdefault("qkv", o))
    try:
        feats, _ = bb.extract([_image(SAMPLES[1])], norms=True, attention=True)
    finally:
        handle.remove()
        h2.remove()
    a = feats.cls_attention[0]  # [heads, T]
    T = 1 + 4 + 8 * 12
    assert a.shape == (bb.num_heads, T)
    ones = 2 * gamma(T) + 8 * U32  # a softmax row's sum: see test_attention_split_...
    torch.testing.assert_close(a.sum(-1), torch.ones(bb.num_heads), rtol=0, atol=ones)
    D, nh = bb.embed_dim, bb.num_heads
    hd = D // nh
    qkv = qkv_kept["qkv"][0].float()
    q, k, v = (qkv[:, i * D : (i + 1) * D].reshape(T, nh, hd).transpose(0, 1) for i in range(3))
    out_cls = (a[:, None, :] @ v)[:, 0]  # [nh, hd]
    # timm's fused attention computes the same sum_i p_i v_i in its own order. Bound, for
    # any order: each logit q.k / sqrt(hd) is off by at most 2 gamma_hd |q|.|k| / sqrt(hd)
    # (+ 2 u of itself); a probability by its logit's error, the largest one (the
    # normaliser) and 2 gamma_T + 8 u; the output sum adds 2 gamma_T of sum_i p_i |v_i|.
    logits = (q[:, :1] @ k.transpose(-1, -2))[:, 0] / math.sqrt(hd)  # [nh, T]
    dlogit = (
        2 * gamma(hd) * (q[:, :1].abs() @ k.abs().transpose(-1, -2))[:, 0] / math.sqrt(hd)
        + 2 * U32 * logits.abs()
    )
    rel = dlogit + dlogit.max(-1, keepdim=True).values + 4 * gamma(T) + 8 * U32  # [nh, T]
    bound = ((a * rel)[:, None, :] @ v.abs())[:, 0] + 2 * gamma(T) * (a[:, None] @ v.abs())[:, 0]
    assert ((out_cls - kept["x"][0, 0].reshape(nh, hd)).abs() <= bound).all()
    maps = cls_attention_maps(a, feats.grid, num_cls=1, num_registers=4)
    no_reg = maps.cls_no_registers.sum(1) + maps.patches_no_registers.sum((1, 2))
    torch.testing.assert_close(no_reg, torch.ones(nh), rtol=0, atol=2 * ones)


# -- LOST intermediates ----------------------------------------------------------------------------
def test_lost_diagnostics_match_lost():
    g = torch.Generator().manual_seed(0)
    h, w = 6, 7
    bg = torch.randn(16, generator=g)
    obj = -bg + 0.1 * torch.randn(16, generator=g)
    feats = bg.repeat(h * w, 1) + 0.3 * torch.randn(h * w, 16, generator=g)
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[1:4, 2:5] = True
    feats[inside.reshape(-1)] = obj + 0.3 * torch.randn(int(inside.sum()), 16, generator=g)
    d = lost_diagnostics(feats, (h, w), k_patches=5)
    ref = lost(feats, (h, w), k_patches=5)
    assert d.degree.shape == (h, w)
    assert torch.equal(d.degree.reshape(-1), ref.scores)  # the very same LOST run
    assert d.seed == divmod(ref.seed, w)
    assert float(d.degree[d.seed]) == float(d.degree.min())
    assert sorted(torch.nonzero(d.expansion.reshape(-1)).flatten().tolist()) == sorted(
        ref.similars.tolist()
    )
    assert bool(d.expansion[d.seed]) and bool(d.mask[d.seed])
    assert torch.equal(d.mask, inside) and d.box == (2, 1, 5, 4) == ref.box
