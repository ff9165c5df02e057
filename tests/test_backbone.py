"""The backbone wrapper: shapes, prefix split, preprocessing, checkpoints and errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from conftest import U32, gamma

from discover.backbone import Backbone, cpu_supports_bf16, resolve_precision, target_size
from discover.errors import ImageError, WeightsError
from discover.models import MODELS, list_models


def _rand_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _vit(name: str) -> torch.nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)


@pytest.fixture(scope="module")
def reg4() -> Backbone:
    torch.manual_seed(0)
    return Backbone("vit_small_patch14_reg4_dinov2", pretrained=False)


# One architecture per supported family (random init: shapes do not depend on weights).
FAMILIES = [
    ("vit_small_patch14_reg4_dinov2", 14, 384, 4),
    ("vit_small_patch14_dinov2", 14, 384, 0),
    ("vit_small_patch16_224", 16, 384, 0),  # DINO ViT-S/16
    ("vit_small_patch8_224", 8, 384, 0),  # DINO ViT-S/8
    ("deit3_small_patch16_224", 16, 384, 0),
    ("vit_base_patch16_clip_224", 16, 768, 0),
]


@pytest.mark.parametrize(("arch", "patch", "dim", "regs"), FAMILIES)
def test_shapes_at_odd_image_size(arch: str, patch: int, dim: int, regs: int) -> None:
    bb = Backbone(arch, pretrained=False)
    feats, prepared = bb.extract([_rand_image(333, 517), _rand_image(333, 517, 1)])
    h, w = -(-333 // patch), -(-517 // patch)  # padded up to a multiple of the patch
    assert feats.grid == (h, w)
    assert feats.patch_size == patch
    assert feats.patches.shape == (2, h * w, dim)
    assert feats.cls.shape == (2, dim)
    assert feats.registers.shape == (2, regs, dim)
    assert prepared[0].input_size == (517, 333)
    assert prepared[0].scale == (1.0, 1.0)


def test_keys_equal_manual_qkv_hook(reg4: Backbone) -> None:
    img = _rand_image(333, 517, 3)
    feats, _ = reg4.extract([img])
    m = reg4.model
    x = reg4.to_tensor([img])
    seen = {}
    hook = m.blocks[-1].register_forward_hook(lambda mod, args, out: seen.update(x=args[0]))
    with torch.no_grad():
        m.forward_features(x)
    hook.remove()
    last = m.blocks[-1]
    with torch.no_grad():
        qkv = last.attn.qkv(last.norm1(seen["x"]))
    D = m.embed_dim
    prefix = m.num_prefix_tokens  # 1 [CLS] + 4 registers
    assert prefix == 5
    assert torch.equal(feats.patches, qkv[:, prefix:, D : 2 * D])
    assert torch.equal(feats.cls, qkv[:, 0, D : 2 * D])
    assert torch.equal(feats.registers, qkv[:, 1:prefix, D : 2 * D])
    q = reg4(x, features="queries")
    v = reg4(x, features="values")
    assert torch.equal(q.patches, qkv[:, prefix:, :D])
    assert torch.equal(v.patches, qkv[:, prefix:, 2 * D :])


def test_tokens_are_forward_features_and_norms_are_last_block_output(reg4: Backbone) -> None:
    img = _rand_image(98, 140, 4)
    x = reg4.to_tensor([img])
    out = reg4(x, features="tokens", norms=True, attention=True)
    m = reg4.model
    seen = {}
    hook = m.blocks[-1].register_forward_hook(lambda mod, args, o: seen.update(out=o))
    with torch.no_grad():
        full = m.forward_features(x)
    hook.remove()
    assert torch.equal(out.patches, full[:, 5:])
    assert torch.equal(out.cls, full[:, 0])
    # A norm is the square root of a sum of D squares: each side is within gamma_D / 2 + u
    # of the exact value whatever its summation order, so they differ by at most twice it.
    D = m.embed_dim
    rtol = gamma(D) + 2 * U32
    assert torch.allclose(out.token_norms, seen["out"].norm(dim=-1), rtol=rtol, atol=0)
    T = 5 + 7 * 10
    assert out.token_norms.shape == (1, T)
    assert out.cls_attention.shape == (1, m.blocks[-1].attn.num_heads, T)
    # A softmax row: T exps (a few ulps each), their sum (gamma_T), T divisions (u); the
    # row's own sum adds gamma_T again. The total stays below 2 gamma_T + 8 u, any order.
    atol = 2 * gamma(T) + 8 * U32
    assert torch.allclose(out.cls_attention.sum(-1), torch.ones(1, 6), atol=atol, rtol=0)


def test_preprocessing_normalises_then_pads_with_zeros(reg4: Backbone) -> None:
    img = np.full((20, 30, 3), 255, dtype=np.uint8)
    x = reg4.to_tensor([img])
    assert x.shape == (1, 3, 28, 42)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    # Elementwise, no sum: a handful of roundings of terms below 5 in magnitude on each
    # side (x / 255, - mean, / std), i.e. well under 32 u relative to the result (~2).
    expected = ((1.0 - mean) / std).expand(3, 20, 30)
    assert torch.allclose(x[0, :, :20, :30], expected, rtol=32 * U32, atol=0)
    assert torch.all(x[0, :, 20:, :] == 0) and torch.all(x[0, :, :, 30:] == 0)


def test_batch_equals_one_by_one(reg4: Backbone) -> None:
    # In float64: a batch and a single image add the same terms in another order (the
    # kernels block by batch), so they differ by float64 rounding only: ~1e3 terms per sum
    # over 12 blocks of unit-scale activations, ~1e-12 relative, far below the 1e-9
    # allowed, while a batching bug (padding, another image's tokens) moves O(1). In
    # float32 the same gap is ~1e-5 and depends on the CPU's kernels (issue 16).
    bb = Backbone("x", model=copy.deepcopy(reg4.model).double())
    imgs = [_rand_image(70, 84, s) for s in range(3)]
    batch, _ = bb.extract(imgs)
    assert batch.patches.dtype == torch.float64
    for i, img in enumerate(imgs):
        one, _ = bb.extract([img])
        torch.testing.assert_close(batch.patches[i], one.patches[0], rtol=1e-9, atol=1e-9)


def test_unequal_sizes_in_one_batch_raise(reg4: Backbone) -> None:
    with pytest.raises(ValueError, match="equal-size"):
        reg4.extract([_rand_image(70, 84), _rand_image(84, 70)])


def test_target_size_keeps_aspect_and_patch_multiples() -> None:
    assert target_size(500, 375, 1000, 14) == (500, 375)  # small enough: untouched
    w, h = target_size(2000, 1000, 518, 14)
    assert w % 14 == 0 and h % 14 == 0 and max(w, h) <= 518
    assert abs(w / h - 2.0) < 0.1
    assert target_size(10000, 20, 518, 14) == (518 // 14 * 14, 14)  # at least one patch


def test_max_size_resizes_and_records_scale() -> None:
    bb = Backbone("vit_small_patch14_dinov2", pretrained=False, max_size=224)
    pr = bb.prepare(_rand_image(600, 900))
    w, h = pr.input_size
    assert max(w, h) <= 224 and w % 14 == 0 and h % 14 == 0
    assert pr.scale == pytest.approx((900 / w, 600 / h))
    assert pr.original_size == (900, 600)


def test_image_smaller_than_a_patch_is_refused(reg4: Backbone) -> None:
    with pytest.raises(ImageError, match="smaller than one 14x14 patch"):
        reg4.prepare(_rand_image(10, 40))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="features"):
        Backbone("vit_small_patch14_dinov2", pretrained=False, features="attn")
    with pytest.raises(ValueError, match="precision"):
        Backbone("vit_small_patch14_dinov2", pretrained=False, precision="int8")


@pytest.mark.parametrize("native", [False, True])
def test_bf16_needs_native_support_on_a_cpu(monkeypatch, native: bool) -> None:
    """bf16 without native instructions ran 3.9x slower than fp32: on such a CPU nothing
    may pick it, neither --precision bf16 nor fp16 (which a CPU runs as bf16)."""
    import warnings

    import discover.backbone

    monkeypatch.setattr(discover.backbone, "cpu_supports_bf16", lambda: native)
    cpu = torch.device("cpu")
    low = "bf16" if native else "fp32"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_precision("fp32", cpu) == "fp32"
        assert resolve_precision("bf16", cpu) == low
        assert resolve_precision("fp16", cpu) == low
    said = [str(w.message) for w in caught]
    assert ("this CPU has no native bf16 support; using fp32" in said) is not native
    m = _vit("vit_small_patch14_dinov2")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bb = Backbone("x", model=m, precision="bf16")
    assert bb.precision == low and len(caught) == (0 if native else 1)
    assert next(bb.model.parameters()).dtype == (torch.bfloat16 if native else torch.float32)
    # and nothing asks for bf16 by itself: the default is fp32 everywhere
    assert Backbone("x", model=_vit("vit_small_patch14_dinov2")).precision == "fp32"
    import inspect

    from discover.pipeline import Discoverer

    assert inspect.signature(Discoverer).parameters["precision"].default == "fp32"


@pytest.mark.skipif(not cpu_supports_bf16(), reason="CPU without native bf16")
def test_bf16_features_close_to_fp32() -> None:
    torch.manual_seed(1)
    m = _vit("vit_small_patch14_reg4_dinov2")
    fp32 = Backbone("x", model=m)
    bf16 = Backbone("x", model=copy.deepcopy(m), precision="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16  # converted weights
    assert next(fp32.model.parameters()).dtype == torch.float32
    img = _rand_image(112, 140, 5)
    a, _ = fp32.extract([img])
    b, _ = bf16.extract([img])
    cos = torch.nn.functional.cosine_similarity(a.patches.float(), b.patches.float(), dim=-1)
    # bf16 keeps 8 bits (u = 2**-9 = 2e-3); 12 blocks of roundings on the order of u give
    # a relative error of a few 1e-2 at worst, i.e. 1 - cos = err**2 / 2 of a few 1e-3:
    # 0.98 (1 - cos = 2e-2) holds whatever the kernels (AMX or AVX512-BF16), while a bug
    # (unconverted weights, a wrong cast of the input) gives cos near 0.
    assert cos.min() > 0.98


# -- checkpoints ---------------------------------------------------------------------


def _features(bb: Backbone) -> torch.Tensor:
    return bb.extract([_rand_image(56, 70, 9)])[0].patches


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(2)
    m = _vit("vit_small_patch14_reg4_dinov2").eval()
    return m, {k: v.clone() for k, v in m.state_dict().items()}


def test_checkpoint_round_trip_pth_and_safetensors(saved, tmp_path) -> None:
    from safetensors.torch import save_file

    model, sd = saved
    ref = _features(Backbone("x", model=model))
    pth = tmp_path / "w.pth"
    torch.save(sd, pth)
    st = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for path in (pth, st):
        bb = Backbone("vit_small_patch14_reg4_dinov2", checkpoint=str(path))
        assert torch.equal(_features(bb), ref)


def test_checkpoint_in_dinov2_release_layout(saved, tmp_path) -> None:
    model, sd = saved
    ref = _features(Backbone("x", model=model))
    # The release keeps a [CLS] position in pos_embed and calls the registers
    # register_tokens; timm folds the [CLS] position into cls_token.
    release = {k: v for k, v in sd.items() if k not in ("reg_token", "pos_embed", "cls_token")}
    cls_pos = torch.randn(1, 1, 384)
    release["pos_embed"] = torch.cat([cls_pos, sd["pos_embed"]], dim=1)
    release["cls_token"] = sd["cls_token"] - cls_pos
    release["register_tokens"] = sd["reg_token"]
    release["mask_token"] = torch.zeros(1, 384)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(release, path)
    bb = Backbone("vit_small_patch14_reg4_dinov2.lvd142m", checkpoint=str(path))
    # The weights themselves: every tensor exactly, but cls_token, rebuilt as
    # (cls_token - cls_pos) + cls_pos: two roundings, within 2 u of the larger term.
    loaded = bb.model.state_dict()
    for k, v in sd.items():
        if k != "cls_token":
            assert torch.equal(loaded[k], v), k
    bound = 2 * U32 * torch.maximum(sd["cls_token"].abs(), cls_pos.abs())
    assert ((loaded["cls_token"] - sd["cls_token"]).abs() <= bound).all()
    assert torch.nn.functional.cosine_similarity(_features(bb), ref, dim=-1).min() > 0.999


def _dino_head(dim: int, out_dim: int = 64) -> dict[str, torch.Tensor]:
    """The state dict of DINO's projection head (``DINOHead``: a 3-layer MLP and a
    weight-normed last layer, ``weight_g``/``weight_v``), small ``out_dim`` (DINO's is
    65536): only its key layout matters here."""
    mlp = torch.nn.Sequential(
        torch.nn.Linear(dim, 32), torch.nn.GELU(), torch.nn.Linear(32, 32), torch.nn.GELU(),
        torch.nn.Linear(32, 16),
    )  # fmt: skip
    sd = {f"mlp.{k}": v for k, v in mlp.state_dict().items()}
    sd["last_layer.weight_g"] = torch.ones(out_dim, 1)
    sd["last_layer.weight_v"] = torch.randn(out_dim, 16)
    return sd


def _dino_training_checkpoint(backbone: torch.nn.Module, path, *, ddp_teacher: bool = False):
    """A checkpoint laid out as DINO's main_dino.py saves it (``save_dict``): student
    wrapped in DistributedDataParallel (``module.backbone.``/``module.head.``), teacher
    a bare MultiCropWrapper (``backbone.``/``head.``; DDP-wrapped too with ``ddp_teacher``,
    as DINO does for models with batch norms), the optimizer, the epoch, the command line
    as an argparse.Namespace, the loss's centre and the fp16 scaler."""
    import argparse

    wrapper = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    wrapper.update({f"head.{k}": v for k, v in _dino_head(backbone.embed_dim).items()})
    tiny = torch.nn.Linear(4, 4)  # an optimizer with real state, on a tiny parameter
    opt = torch.optim.AdamW(tiny.parameters(), lr=5e-4)
    tiny(torch.ones(1, 4)).sum().backward()
    opt.step()
    args = argparse.Namespace(
        arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=True,
        momentum_teacher=0.996, use_bn_in_head=False, teacher_temp=0.04, use_fp16=True,
        weight_decay=0.04, clip_grad=3.0, batch_size_per_gpu=64, epochs=100, lr=0.0005,
        optimizer="adamw", drop_path_rate=0.1, global_crops_scale=(0.4, 1.0),
        local_crops_number=8, local_crops_scale=(0.05, 0.4), data_path="/data/train/",
        output_dir=".", dist_url="env://", rank=0, world_size=8, gpu=0,
    )  # fmt: skip
    teacher = {f"module.{k}": v for k, v in wrapper.items()} if ddp_teacher else wrapper
    save_dict = {
        "student": {f"module.{k}": v.clone() + 1 for k, v in wrapper.items()},  # not these
        "teacher": teacher,
        "optimizer": opt.state_dict(),
        "epoch": 100,
        "args": args,
        "dino_loss": {"center": torch.zeros(1, 65536)},
        "fp16_scaler": torch.amp.GradScaler("cpu").state_dict(),
    }
    torch.save(save_dict, path)
    return path


@pytest.mark.parametrize("ddp_teacher", [False, True])
def test_checkpoint_in_dino_training_layout(tmp_path, ddp_teacher) -> None:
    """DINO's own training checkpoints load (their ``args`` is an argparse.Namespace,
    which a plain weights-only load refuses), and the teacher's backbone is what loads."""
    torch.manual_seed(3)
    m = _vit("vit_small_patch16_224").eval()
    ref = _features(Backbone("x", model=m))
    path = _dino_training_checkpoint(m, tmp_path / "checkpoint.pth", ddp_teacher=ddp_teacher)
    bb = Backbone("vit_small_patch16_224.dino", checkpoint=str(path))
    assert torch.equal(_features(bb), ref)


def test_checkpoint_loading_allows_the_namespace_for_that_load_only(tmp_path) -> None:
    import argparse
    import pickle

    from discover.weights import read_state_dict

    path = _dino_training_checkpoint(_vit("vit_small_patch16_224"), tmp_path / "c.pth")
    assert read_state_dict(path)
    # the allowance is scoped to our load: a plain weights-only load still refuses it
    with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
        torch.load(path, weights_only=True)
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


class _TrainerConfig:  # a class a checkpoint might pickle: never to be unpickled
    def __init__(self) -> None:
        self.lr = 0.1


class _Payload:  # unpickling this would create a file: the attack weights_only stops
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_needing_other_globals_are_refused_with_a_reason(tmp_path) -> None:
    sd = {"cls_token": torch.zeros(1, 1, 384)}  # refused before any key is looked at
    cfg = tmp_path / "cfg.pth"
    torch.save({"model": sd, "config": _TrainerConfig()}, cfg)
    with pytest.raises(WeightsError) as err:
        Backbone("vit_small_patch16_224", checkpoint=str(cfg))
    msg = str(err.value)
    assert f"{__name__}._TrainerConfig" in msg and "weights-only load refuses" in msg, msg
    assert "\n" not in msg and "weights_only` set to `False`" not in msg  # no unsafe advice
    marker = tmp_path / "created-by-unpickling"
    evil = tmp_path / "evil.pth"
    torch.save({"model": sd, "x": _Payload(marker)}, evil)
    with pytest.raises(WeightsError, match=r"io\.open\) that a weights-only load refuses"):
        Backbone("vit_small_patch16_224", checkpoint=str(evil))
    assert not marker.exists()


def test_missing_checkpoint_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(WeightsError, match="checkpoint not found"):
        Backbone("vit_small_patch14_dinov2", checkpoint=str(tmp_path / "nope.pth"))


def test_wrong_architecture_names_the_mismatched_keys(saved, tmp_path) -> None:
    _, sd = saved  # ViT-S/14 with registers
    path = tmp_path / "small.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        Backbone("vit_base_patch16_224.dino", checkpoint=str(path))
    msg = str(err.value)
    assert "does not match" in msg and "another shape" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"this is not a checkpoint", "it is a text file (it starts with 'this is not a"),
        (b"hello world\nsecond line\n", "it is a text file"),
        (b"", "empty file (0 bytes)"),
        (bytes(range(1, 40)), "it starts with b'\\x01\\x02"),
        (b"PK\x03\x04" + b"\x00" * 40, "not a valid torch zip archive"),
        (b"\x80\x02" + b"\x00" * 10, "not a valid torch pickle"),
    ],
)
def test_garbage_checkpoint_says_what_the_file_is_not(tmp_path, content, reason) -> None:
    """A text file used to say "pop from empty list" (the pickle machine's complaint)."""
    path = tmp_path / "junk.pth"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as err:
        Backbone("vit_small_patch14_dinov2", checkpoint=str(path))
    msg = str(err.value)
    assert msg.startswith(f"cannot read checkpoint {path}: ") and reason in msg, msg
    assert "\n" not in msg and "pop from empty list" not in msg
    if content and content[:1] not in (b"P", b"\x80"):
        assert "not a torch checkpoint (.pth, .pt, .bin) nor a safetensors file" in msg


def test_checkpoint_format_follows_the_content_not_the_name(saved, tmp_path) -> None:
    from safetensors.torch import save_file

    model, sd = saved
    ref = _features(Backbone("x", model=model))
    named_pth = tmp_path / "really_safetensors.pth"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(named_pth))
    named_st = tmp_path / "really_torch.safetensors"
    torch.save(sd, named_st)
    for path in (named_pth, named_st):
        bb = Backbone("vit_small_patch14_reg4_dinov2", checkpoint=str(path))
        assert torch.equal(_features(bb), ref)


def test_no_network_gives_a_hint(monkeypatch) -> None:
    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise OSError("Name or service not known")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(WeightsError) as err:
        Backbone("vit_small_patch14_reg4_dinov2.lvd142m")
    assert "--checkpoint" in str(err.value)
    assert "vit_small_patch14_dinov2.imgfocus" in str(err.value)


def test_unknown_model_name() -> None:
    with pytest.raises(WeightsError, match="unknown timm model"):
        Backbone("vit_nonexistent_patch99", pretrained=False)


def test_model_list_is_consistent_with_timm() -> None:
    names = [s.name for s in list_models()]
    assert names[0] == "vit_small_patch14_reg4_dinov2.lvd142m"
    assert "vit_base_patch16_clip_224.openai" in names
    for spec in MODELS.values():
        if spec.name.endswith(".imgfocus"):
            continue
        cfg = timm.models.get_pretrained_cfg(spec.name.replace(".", ".", 1))
        assert cfg is not None, spec.name
        assert timm.is_model(spec.arch), spec.name


def test_patch_budget_downscales_huge_images_only() -> None:
    bb = Backbone("vit_small_patch14_dinov2", pretrained=False, max_patches=400)
    small = bb.prepare(_rand_image(200, 280))  # 15 x 20 = 300 patches: native size
    assert small.input_size == (280, 200) and small.scale == (1.0, 1.0)
    big = bb.prepare(_rand_image(600, 900))  # 43 x 65 patches: over budget
    w, h = big.input_size
    assert -(-w // 14) * -(-h // 14) <= 400
    assert w % 14 == 0 and h % 14 == 0 and abs(w / h - 1.5) < 0.1
    assert big.scale == pytest.approx((900 / w, 600 / h))
    off = Backbone("x", model=bb.model, max_patches=None).prepare(_rand_image(600, 900))
    assert off.input_size == (900, 600)


def test_unreachable_hub_uses_the_cache_only_and_fails_fast(monkeypatch) -> None:
    import socket

    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise OSError("Name or service not known")

    seen = {}

    def create(*args, **kwargs):
        if kwargs.get("pretrained"):
            seen["offline"] = constants.HF_HUB_OFFLINE
            raise OSError("not in the local cache")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(timm, "create_model", create)
    before = constants.HF_HUB_OFFLINE
    with pytest.raises(WeightsError, match="no network"):
        Backbone("vit_small_patch16_224.dino")
    assert seen["offline"] is True  # the hub was asked for its cache only, no retries
    assert constants.HF_HUB_OFFLINE == before  # and the setting restored
