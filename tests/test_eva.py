"""timm ``Eva`` models (DINOv3 and timm's rotary register ViTs) in the backbone wrapper.

Random-init models whose biases and layer scales are randomised too (timm's init leaves
biases at zero and DINOv3's layer scales at 1e-5, under which the blocks barely change the
tokens and a bias or layer-scale mix-up would go unseen). The q/k/v split is compared with
what the model's own attention computes (hooks on its q/k norm modules and on
``scaled_dot_product_attention``); checkpoints are written in the timm layout and in the
original DINOv3 release layout; test-time registers are checked against an independent,
slow implementation; the CLI boxes synthetic images with a DINOv3 checkpoint file.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import save, scene
from timm.layers import SwiGLU, apply_rot_embed_cat

from discover.adapters import adapter_for
from discover.backbone import FEATURE_KINDS, ROPE_FEATURE_KINDS, Backbone, cpu_supports_bf16
from discover.errors import RegdiscoverError, WeightsError
from discover.models import MODELS
from discover.outputs import read_jsonl
from discover.registers import RegisterNeurons, attach_test_time_registers, find_register_neurons

DINOV3 = "vit_small_patch16_dinov3"
ALL_KINDS = FEATURE_KINDS + ROPE_FEATURE_KINDS


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random biases, layer scales and prefix tokens on top of timm's init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gamma_1", "gamma_2")):
                p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
            elif name.endswith("bias") or name in ("cls_token", "reg_token"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def eva(arch: str = DINOV3, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True, **kwargs)
    return randomise(m, seed)


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """``[B, heads, T, head_dim]`` -> ``[B, T, heads * head_dim]``."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def no_hooks(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# -- the q/k/v split, against the model's own attention ---------------------------------
CASES = {
    "dinov3": (DINOV3, {"depth": 3}),  # fused qkv, no bias
    "dinov3_qkvb": ("vit_small_patch16_dinov3_qkvb", {"depth": 3}),  # fused qkv + q/v biases
    "separate_qkv": (DINOV3, {"depth": 3, "qkv_fused": False}),  # q_proj / k_proj / v_proj
    "rope_reg1_gap": ("vit_medium_patch16_rope_reg1_gap_256", {"depth": 3}),  # no [CLS]
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_qkv_split_is_exactly_the_models_attention(case: str, monkeypatch) -> None:
    arch, kwargs = CASES[case]
    m = eva(arch, **kwargs)
    bb = Backbone(arch, model=m)
    n_cls, n_reg = (1, 4) if case != "rope_reg1_gap" else (0, 1)
    assert (bb.num_cls, bb.model_registers, bb.rotary) == (n_cls, n_reg, True)
    x = bb.to_tensor([_image(333, 517, 1), _image(333, 517, 2)])  # odd size: padded to 336x528
    grid = (21, 33)

    seen: dict[str, torch.Tensor] = {}
    attn = m.blocks[-1].attn
    hooks = [
        attn.q_norm.register_forward_hook(lambda mod, a, o: seen.__setitem__("q", o)),
        attn.k_norm.register_forward_hook(lambda mod, a, o: seen.__setitem__("k", o)),
    ]
    calls: list[tuple[torch.Tensor, ...]] = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kw):
        calls.append((q, k, v))
        return real_sdpa(q, k, v, *args, **kw)

    for blk in m.blocks:
        blk.attn.fused_attn = True
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        m.forward_features(x)
    monkeypatch.undo()
    for h in hooks:
        h.remove()
    q_pre, k_pre = as_tokens(seen["q"]), as_tokens(seen["k"])  # before the rotary embedding
    q_rot, k_rot, v = (as_tokens(t) for t in calls[-1])  # what the dot product uses

    out = bb.forward_all(x, ALL_KINDS, attention=n_cls > 0)
    n_pre = n_cls + n_reg
    assert m.num_prefix_tokens == n_pre
    expected = {
        "keys": k_pre,
        "queries": q_pre,
        "values": v,
        "keys_rope": k_rot,
        "queries_rope": q_rot,
    }
    for kind, ref in expected.items():
        f = out[kind]
        assert f.grid == grid and f.patches.shape == (2, 21 * 33, 384 if n_cls else 512)
        assert torch.equal(f.patches, ref[:, n_pre:]), kind
        assert torch.equal(f.registers, ref[:, n_cls:n_pre]), kind
        if n_cls:
            assert torch.equal(f.cls, ref[:, 0]), kind
        else:  # no [CLS]: the mean patch feature (what the average-pool head reads)
            assert torch.equal(f.cls, f.patches.mean(dim=1)), kind
    # The rotary embedding moves the patch keys, and only them.
    assert not torch.allclose(out["keys"].patches, out["keys_rope"].patches, atol=1e-3)
    assert torch.equal(out["keys"].registers, out["keys_rope"].registers)
    assert no_hooks(m)

    if n_cls:
        check_cls_attention(m, x, out["keys"].cls_attention)
    else:
        with pytest.raises(ValueError, match=r"no \[CLS\] token"):
            bb(x, attention=True)


def check_cls_attention(m: torch.nn.Module, x: torch.Tensor, got: torch.Tensor) -> None:
    """``got`` against the [CLS] row of the attention matrix the model computes itself
    (its unfused path, whose softmax output goes through ``attn_drop``)."""
    attn = m.blocks[-1].attn
    attn.fused_attn = False
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        attn.attn_drop.register_forward_hook(lambda mod, a, o: seen.__setitem__("p", o)),
        attn.q_norm.register_forward_hook(lambda mod, a, o: seen.__setitem__("q", o)),
        attn.k_norm.register_forward_hook(lambda mod, a, o: seen.__setitem__("k", o)),
    ]
    try:
        with torch.no_grad():
            m.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
        attn.fused_attn = True
    ref = seen["p"][:, :, 0]  # [B, heads, T]
    assert got.shape == ref.shape
    # Both sides compute the logits scale * q.k_j in float32 from the same q and k: they
    # differ only in where the scale is applied and in the dot products' summation order.
    # Each float32 dot product of head_dim terms is off by at most head_dim * eps *
    # sum|q_i k_ji| <= head_dim * eps * |q| |k_j| (the rotation keeps |k_j|), the scaling
    # by one more rounding; a softmax output moves by at most twice the largest logit
    # error. Both sides may err, hence the factors of 2.
    eps = torch.finfo(torch.float32).eps
    q_norm = seen["q"][:, :, :1].float().norm(dim=-1, keepdim=True)  # [B, heads, 1, 1]
    k_norm = seen["k"].float().norm(dim=-1).unsqueeze(2)  # [B, heads, 1, T]
    logit_err = 2 * (attn.head_dim + 1) * eps * attn.scale * float((q_norm * k_norm).max())
    assert torch.allclose(got, ref, rtol=0, atol=2 * logit_err)
    # The tolerance is tight enough to tell the rotated keys from the unrotated ones.
    unrotated = ((seen["q"][:, :, :1] @ seen["k"].transpose(-1, -2)) * attn.scale).softmax(-1)
    assert float((unrotated[:, :, 0] - ref).abs().max()) > 10 * logit_err
    # And it is a distribution over every token ([CLS], registers, patches).
    T = got.shape[-1]
    assert torch.allclose(got.sum(-1), torch.ones_like(got.sum(-1)), atol=T * eps)


# -- tokens, norms, layer choice, any image size -----------------------------------------
def test_tokens_norms_and_layer_choice_match_the_model() -> None:
    m = eva(depth=4, seed=3)
    bb = Backbone(DINOV3, model=m)
    x = bb.to_tensor([_image(333, 517, 4)])  # the rotary embedding of a 21x33 grid
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.blocks[1].register_forward_hook(lambda mod, a, o: seen.__setitem__("out1", o)),
        m.blocks[-1].register_forward_hook(lambda mod, a, o: seen.__setitem__("out", o)),
        m.blocks[1].attn.k_norm.register_forward_hook(lambda mod, a, o: seen.__setitem__("k1", o)),
    ]
    with torch.no_grad():
        full = m.forward_features(x)  # timm's own forward, its own rotary embedding
    for h in hooks:
        h.remove()
    tok = bb(x, features="tokens", norms=True, attention=True)
    assert torch.equal(tok.patches, full[:, 5:]) and torch.equal(tok.cls, full[:, 0])
    assert torch.equal(tok.registers, full[:, 1:5])
    assert torch.allclose(tok.token_norms, seen["out"].norm(dim=-1), rtol=1e-6, atol=0)
    assert tok.token_norms.shape == (1, 5 + 21 * 33)
    assert tok.cls_attention.shape == (1, 6, 5 + 21 * 33) and tok.num_prefix_tokens == 5
    # An earlier block: its keys and its raw output; the norms still of the last block.
    k1 = bb(x, layer=1, norms=True)
    assert torch.equal(k1.patches, as_tokens(seen["k1"])[:, 5:])
    assert torch.equal(k1.token_norms, tok.token_norms)
    both = bb.forward_all(x, ("tokens", "keys_rope"), layer=-3)
    assert torch.equal(both["tokens"].patches, seen["out1"][:, 5:])
    assert both["keys_rope"].patches.shape == (1, 21 * 33, 384)
    assert no_hooks(m)


def test_batch_equals_one_by_one() -> None:
    bb = Backbone(DINOV3, model=eva(depth=2, seed=5))
    imgs = [_image(96, 160, s) for s in range(3)]
    batch, _ = bb.extract(imgs)
    for i, img in enumerate(imgs):
        one, _ = bb.extract([img])
        # Same arithmetic per image; batched GEMMs may sum in another order (float32,
        # 384-term dot products of O(1) values: ~1e-5 absolute at most).
        torch.testing.assert_close(batch.patches[i], one.patches[0], rtol=1e-4, atol=1e-4)


def test_rope_kinds_only_for_rotary_models(backbone) -> None:
    assert not backbone.rotary
    x = backbone.to_tensor([_image(56, 70)])
    for kind in ROPE_FEATURE_KINDS:
        with pytest.raises(ValueError, match="rotary position embeddings"):
            backbone(x, features=kind)
        with pytest.raises(ValueError, match="rotary"):
            Backbone("vit", model=backbone.model, features=kind)
    with pytest.raises(ValueError, match="rotary"):
        backbone.forward_all(x, ("keys", "keys_rope"))
    with pytest.raises(ValueError, match="features must be one of"):
        Backbone(DINOV3, model=eva(depth=1), features="keys_after_rope")


@pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU without native bf16")
def test_bf16_keeps_the_rotary_periods_in_float32() -> None:
    m = eva(depth=3, seed=6)
    fp32 = Backbone(DINOV3, model=m)
    bf16 = Backbone(DINOV3, model=copy.deepcopy(m), precision="bf16")
    assert bf16.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert bf16.model.rope.periods.dtype == torch.float32  # timm keeps them >= float32
    img = _image(112, 144, 7)
    for kind in ("keys", "keys_rope"):
        a, _ = fp32.extract([img], features=kind)
        b, _ = bf16.extract([img], features=kind)
        cos = F.cosine_similarity(a.patches.float(), b.patches.float(), dim=-1)
        assert cos.min() > 0.98, kind


def test_unsupported_attentions_are_named() -> None:
    # Differential attention and parallel blocks: their q/k/v are not what LOST reads.
    for arch in ("vit_dwee_patch16_reg1_gap_256", "vit_pwee_patch16_reg1_gap_256"):
        m = timm.create_model(arch, pretrained=False, num_classes=0, device="meta")
        with pytest.raises(WeightsError, match="block 0 is a"):
            adapter_for(m, arch)


def test_listed_models_match_timm() -> None:
    """Every listed model builds (on the meta device: no memory, no init), has an adapter,
    and has the patch size, width and registers the list says."""
    dinov3 = [s for s in MODELS.values() if s.family == "dinov3"]
    assert {s.arch for s in dinov3} >= {
        "vit_small_patch16_dinov3",
        "vit_small_plus_patch16_dinov3",
        "vit_base_patch16_dinov3",
        "vit_large_patch16_dinov3",
        "vit_huge_plus_patch16_dinov3",
    }
    assert any("reg4_gap" in s.name for s in MODELS.values())
    assert any("reg1_gap" in s.name for s in MODELS.values())
    for spec in MODELS.values():
        if spec.name.endswith(".imgfocus"):
            continue
        m = timm.create_model(spec.arch, pretrained=False, num_classes=0, device="meta")
        ad = adapter_for(m, spec.name)
        assert m.patch_embed.patch_size[0] == spec.patch_size, spec.name
        assert m.embed_dim == spec.dim, spec.name
        assert ad.num_registers == spec.registers, spec.name
        assert ad.rotary == (spec.family == "dinov3" or "rope" in spec.arch), spec.name


# -- checkpoints ---------------------------------------------------------------------------
# The keys of one block of the original DINOv3 release (facebookresearch/dinov3,
# ``dinov3_vits16``), as its own model's state dict has them.
RELEASE_BLOCK0 = {
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.qkv.bias_mask",
    "attn.proj.weight",
    "attn.proj.bias",
    "ls1.gamma",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "ls2.gamma",
}
RELEASE_TOP = {
    "cls_token",
    "storage_tokens",
    "mask_token",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "rope_embed.periods",
    "norm.weight",
    "norm.bias",
}


def release_layout(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """``model``'s weights in the original DINOv3 release layout: timm's Eva filter renames
    inverted, the fused ``qkv.bias`` with its ``bias_mask`` (the k part is masked out, so
    it holds junk here that must be ignored), the pretraining ``mask_token`` and the
    rotary periods as the release stores them (bfloat16)."""
    g = torch.Generator().manual_seed(seed)
    swiglu = isinstance(model.blocks[0].mlp, SwiGLU)
    out: dict[str, torch.Tensor] = {}
    for k, v in model.state_dict().items():
        if k.endswith(("attn.q_bias", "attn.v_bias")):
            continue
        k = k.replace("reg_token", "storage_tokens")
        k = k.replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        if swiglu:
            k = k.replace("mlp.fc1_g.", "mlp.w1.").replace("mlp.fc1_x.", "mlp.w2.")
            k = k.replace("mlp.fc2.", "mlp.w3.")
        out[k] = v.clone()
    D = model.embed_dim
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        q = a.q_bias.detach() if a.q_bias is not None else torch.zeros(D)
        v = a.v_bias.detach() if a.v_bias is not None else torch.zeros(D)
        junk = torch.randn(D, generator=g)
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([q, junk, v])
        out[f"blocks.{i}.attn.qkv.bias_mask"] = torch.cat(
            [torch.ones(D), torch.zeros(D), torch.ones(D)]
        )
    out["mask_token"] = torch.zeros(1, D)
    out["rope_embed.periods"] = model.rope.periods.to(torch.bfloat16)
    return out


def _feats(bb: Backbone, kind: str = "keys") -> torch.Tensor:
    return bb.extract([_image(80, 112, 9)], features=kind)[0].patches


@pytest.fixture(scope="module")
def full_models() -> dict[str, torch.nn.Module]:
    """Full-size random DINOv3 S/16 without and with q/v biases, and S+/16 (SwiGLU)."""
    return {
        arch: eva(arch, seed=i)
        for i, arch in enumerate(
            (DINOV3, "vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3")
        )
    }


def test_checkpoint_round_trip_timm_layout(full_models, tmp_path) -> None:
    from safetensors.torch import save_file

    m = full_models[DINOV3]
    ref = _feats(Backbone("x", model=m))
    pth, st = tmp_path / "w.pth", tmp_path / "w.safetensors"
    torch.save(m.state_dict(), pth)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(st))
    for path in (pth, st):
        bb = Backbone(f"{DINOV3}.lvd1689m", checkpoint=str(path))
        assert bb.family == "dinov3" and bb.rotary
        assert torch.equal(_feats(bb), ref)


@pytest.mark.parametrize(
    "arch", [DINOV3, "vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3"]
)
def test_checkpoint_in_dinov3_release_layout(full_models, tmp_path, capsys, arch) -> None:
    m = full_models[arch]
    release = release_layout(m)
    assert {k for k in release if not k.startswith("blocks.")} == RELEASE_TOP
    block0 = {k.removeprefix("blocks.0.") for k in release if k.startswith("blocks.0.")}
    if arch.startswith("vit_small_plus"):  # SwiGLU: w1 (gate), w2, w3 instead of fc1, fc2
        mlp = {f"mlp.{w}.{p}" for w in ("w1", "w2", "w3") for p in ("weight", "bias")}
        assert block0 == {k for k in RELEASE_BLOCK0 if ".fc" not in k} | mlp
    else:
        assert block0 == RELEASE_BLOCK0
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-08c60483.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in release.items()}}, path)
    capsys.readouterr()
    bb = Backbone(f"{arch}.lvd1689m", checkpoint=str(path))
    assert capsys.readouterr().out == ""  # timm's filter prints notes: not onto our stdout
    ref_bb = Backbone("x", model=m)
    for kind in ("keys", "keys_rope", "tokens"):
        assert torch.equal(_feats(bb, kind), _feats(ref_bb, kind)), kind


def test_release_biases_the_architecture_cannot_hold_are_refused(full_models, tmp_path) -> None:
    release = release_layout(full_models["vit_small_patch16_dinov3_qkvb"])  # non-zero q/v
    path = tmp_path / "dinov3_qkvb.pth"
    torch.save(release, path)
    with pytest.raises(WeightsError, match=r"non-zero q/v biases \(blocks\.0\.attn\.qkv\.bias"):
        Backbone(DINOV3, checkpoint=str(path))  # the variant without biases
    assert Backbone("vit_small_patch16_dinov3_qkvb", checkpoint=str(path)).rotary


def test_release_with_other_rope_periods_is_refused(full_models, tmp_path) -> None:
    release = release_layout(full_models[DINOV3])
    # 2% off: far beyond bfloat16 rounding (2^-8 relative), as another base would be.
    release["rope_embed.periods"] = (release["rope_embed.periods"].float() * 1.02).bfloat16()
    path = tmp_path / "other_rope.pth"
    torch.save(release, path)
    with pytest.raises(WeightsError, match="rope_embed.periods"):
        Backbone(DINOV3, checkpoint=str(path))


def test_release_mismatch_names_the_keys(full_models, tmp_path) -> None:
    release = release_layout(full_models[DINOV3])
    del release["blocks.3.ls1.gamma"]
    path = tmp_path / "broken.pth"
    torch.save(release, path)
    with pytest.raises(WeightsError) as err:
        Backbone(DINOV3, checkpoint=str(path))
    assert "1 missing (blocks.3.gamma_1)" in str(err.value) and "\n" not in str(err.value)
    torch.save(release_layout(full_models[DINOV3]), path)
    with pytest.raises(WeightsError, match="another shape"):
        Backbone("vit_base_patch16_dinov3", checkpoint=str(path))


# -- test-time registers ---------------------------------------------------------------------
NEURONS = [(0, 5), (1, 17), (1, 300), (2, 40)]


def _reference_forward(model, x: torch.Tensor, neurons: dict[int, list[int]], n: int):
    """Independent slow version for a DINOv3 model: the extra tokens appended at the END,
    the attention written out (rotary embedding on the patch rows only), one image at a
    time. Returns the final-norm tokens reordered as [prefix, extra, patches]."""
    outs = []
    for b in range(x.shape[0]):
        t, rope = model._pos_embed(model.patch_embed(x[b : b + 1]))
        pre, total = model.num_prefix_tokens, t.shape[1]
        t = torch.cat([t, t.new_zeros(1, n, t.shape[2])], dim=1)
        t = model.norm_pre(t)
        for li, blk in enumerate(model.blocks):
            a = blk.attn
            T, H = t.shape[1], a.num_heads
            q, k, v = a.qkv(blk.norm1(t)).reshape(1, T, 3, H, -1).permute(2, 0, 3, 1, 4)
            half = a.rotate_half
            q[:, :, pre:total] = apply_rot_embed_cat(q[:, :, pre:total], rope, half=half)
            k[:, :, pre:total] = apply_rot_embed_cat(k[:, :, pre:total], rope, half=half)
            p = ((q @ k.transpose(-1, -2)) * a.scale).softmax(-1)
            o = a.proj((p @ v).transpose(1, 2).reshape(1, T, -1))
            t = t + blk.gamma_1 * o
            h = blk.mlp.act(blk.mlp.fc1(blk.norm2(t)))
            if li in neurons:
                cols = h[0, :, neurons[li]]
                peak = cols.max() if cols.max().abs() > cols.min().abs() else cols.min()
                h = h.clone()
                for j in neurons[li]:
                    h[0, total:, j] = peak
                    h[0, pre:total, j] = 0.0
            t = t + blk.gamma_2 * blk.mlp.fc2(h)
        t = model.norm(t)
        outs.append(torch.cat([t[:, :pre], t[:, total:], t[:, pre:total]], dim=1))
    return torch.cat(outs)


@pytest.mark.parametrize("n", [1, 2])
def test_test_time_registers_on_dinov3_match_an_independent_implementation(n: int) -> None:
    # float64 on both sides: they add the same terms in another order (token order,
    # batching, fused vs written-out attention), so they differ by float64 rounding only:
    # a few hundred terms per sum over 3 blocks of O(1) values, ~1e3 * 1.1e-16 relative,
    # far below the 1e-9 allowed; a token in the wrong place, an edit on the wrong token
    # or a rotary embedding shifted by the added tokens is O(1).
    model = eva(depth=3, seed=8).double()
    bb = Backbone(DINOV3, model=model, features="tokens")
    x = bb.to_tensor([_image(64, 96, 10), _image(64, 96, 11)]).double()
    neurons = RegisterNeurons(NEURONS)
    with torch.inference_mode():
        plain = bb(x)
    with attach_test_time_registers(bb, neurons, num_registers=n):
        assert [blk.attn.num_prefix_tokens for blk in model.blocks] == [5 + n] * 3
        feats = bb(x, norms=True)
    assert [blk.attn.num_prefix_tokens for blk in model.blocks] == [5] * 3
    assert feats.registers.shape == (2, 4 + n, 384) and feats.patches.shape == (2, 24, 384)
    assert feats.token_norms.shape == (2, 5 + n + 24)
    with torch.inference_mode():
        ref = _reference_forward(model, x, neurons.by_layer(), n)
    pre = 5 + n
    torch.testing.assert_close(feats.cls, ref[:, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(feats.registers, ref[:, 1:pre], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(feats.patches, ref[:, pre:], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(feats.patches, plain.patches, atol=1e-3)  # it did something
    with torch.inference_mode():
        again = bb(x)
    assert torch.equal(again.patches, plain.patches) and no_hooks(model)


def test_finder_runs_on_dinov3() -> None:
    bb = Backbone(DINOV3, model=eva(depth=3, seed=12), features="tokens")
    imgs = [_image(64, 80, s) for s in range(3)]
    found = find_register_neurons(bb, imgs, threshold="quantile:0.9", top_k=4)
    assert 0 < len(found.neurons) <= 4 and all(0 <= li < 3 for li, _ in found.neurons)
    assert found.stats["patch_tokens"] == 3 * 4 * 5  # registers and [CLS] are not patches
    assert no_hooks(bb.model)


def test_test_time_registers_refused_for_swiglu_mlps() -> None:
    bb = Backbone(
        "vit_small_plus_patch16_dinov3", model=eva("vit_small_plus_patch16_dinov3", depth=2)
    )
    with pytest.raises(RegdiscoverError, match="SwiGLU"):
        attach_test_time_registers(bb, RegisterNeurons([(0, 1)]))
    with pytest.raises(RegdiscoverError, match="gated MLPs"):
        find_register_neurons(bb, [_image(32, 32)])
    assert bb.extra_registers == 0 and no_hooks(bb.model)


# -- end to end ------------------------------------------------------------------------------
def test_cli_boxes_with_a_dinov3_checkpoint(full_models, tmp_path, run_cli, one_torch_thread):
    m = full_models[DINOV3]
    timm_ckpt = tmp_path / "dinov3_random.pth"
    torch.save(m.state_dict(), timm_ckpt)
    release_ckpt = tmp_path / "dinov3_vits16_pretrain_lvd1689m.pth"
    torch.save(release_layout(m), release_ckpt)
    imgs = tmp_path / "photos"
    save(imgs / "a.png", scene(160, 128, (48, 32, 112, 96)))
    save(imgs / "b.jpg", scene(171, 133, (20, 40, 90, 120), colour=(20, 200, 40)), quality=95)
    for ckpt, extra in ((timm_ckpt, []), (release_ckpt, ["--features", "keys_rope"])):
        out = tmp_path / f"{ckpt.stem}.jsonl"
        code, _, err = run_cli(
            "boxes", imgs, "--model", f"{DINOV3}.lvd1689m", "--checkpoint", ckpt,
            "--device", "cpu", "--out", out, "--method", "lost", "--center", *extra,
        )  # fmt: skip
        assert code == 0, err
        records = read_jsonl(out)
        assert [r["image"].rsplit("/", 1)[-1] for r in records] == ["a.png", "b.jpg"]
        for r, size in zip(records, [(160, 128), (171, 133)], strict=True):
            assert r["error"] is None and (r["width"], r["height"]) == size
            [(x0, y0, x1, y1)] = r["boxes"]
            assert 0 <= x0 < x1 <= size[0] and 0 <= y0 < y1 <= size[1]
            assert x0 % 16 == 0 and y0 % 16 == 0  # patch-aligned on the 16 px grid
        assert "2 images, 2 boxes, 0 failures" in err
    # The same weights in both layouts give the same boxes with the same features.
    code, _, err = run_cli(
        "boxes", imgs, "--model", DINOV3, "--checkpoint", timm_ckpt, "--device", "cpu",
        "--out", tmp_path / "again.jsonl", "--features", "keys_rope", "--method", "lost",
        "--center",
    )  # fmt: skip
    assert code == 0, err
    assert read_jsonl(tmp_path / "again.jsonl") == read_jsonl(
        tmp_path / f"{release_ckpt.stem}.jsonl"
    )
    # The defaults (TokenCut on queries): random weights give a graph without a cut, and
    # the run says so per image instead of boxing at random; it still completes.
    code, _, err = run_cli(
        "boxes", imgs, "--model", DINOV3, "--checkpoint", timm_ckpt, "--device", "cpu",
        "--out", tmp_path / "defaults.jsonl",
    )  # fmt: skip
    assert code == 0, err
    records = read_jsonl(tmp_path / "defaults.jsonl")
    assert len(records) == 2
    for r in records:
        assert r["boxes"] or "no cut structure" in r["error"], r


def test_cli_rope_features_on_a_vit_is_one_line(run_cli, fast_models, checkpoint, tmp_path):
    save(tmp_path / "a.png", scene(140, 112, (42, 28, 98, 84)))
    code, _, err = run_cli(
        "boxes", tmp_path / "a.png", "--model", "vit_small_patch14_reg4_dinov2",
        "--checkpoint", checkpoint, "--features", "keys_rope", "--out", tmp_path / "r.jsonl",
    )  # fmt: skip
    assert code == 2 and "rotary position embeddings" in err
    assert "Traceback" not in err


def test_models_without_cls_refuse_what_needs_its_attention(monkeypatch, run_cli, tmp_path):
    import discover.backbone
    from discover.pipeline import Discoverer

    def tiny_gap(name, **kwargs):  # a 1-block timm register ViT without [CLS]
        m = timm.create_model(
            "vit_wee_patch16_reg1_gap_256",
            pretrained=False,
            num_classes=0,
            dynamic_img_size=True,
            depth=1,
        )
        return randomise(m)

    monkeypatch.setattr(discover.backbone, "create_vit", tiny_gap)
    name = "vit_wee_patch16_reg1_gap_256.sbb_in1k"
    bb = Backbone(name)
    assert (bb.num_cls, bb.model_registers) == (0, 1)
    with pytest.raises(ValueError, match=r"found needs the \[CLS\] attention"):
        Discoverer(backbone=bb, method="found")
    save(tmp_path / "a.png", scene(160, 128, (48, 32, 112, 96)))
    code, _, err = run_cli("inspect", tmp_path / "a.png", "--model", name, "--out", tmp_path / "i")
    assert code == 2 and r"has no [CLS] token" in err and "Traceback" not in err
    code, _, err = run_cli("boxes", tmp_path / "a.png", "--model", name, "--method", "found")
    assert code == 2 and "needs the [CLS] attention" in err
    code, _, err = run_cli(
        "boxes", tmp_path / "a.png", "--model", name, "--out", tmp_path / "r.jsonl"
    )
    assert code == 0, err  # LOST needs no [CLS]
    [rec] = read_jsonl(tmp_path / "r.jsonl")
    assert rec["error"] is None and len(rec["boxes"]) == 1
