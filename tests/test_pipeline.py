"""The Python API (discover.pipeline): Discoverer, discover(), Detection, run() streaming,
batching, box mapping back to the original image, and bad inputs.

The model is a random-init ViT-S/14 with registers (see conftest): on a grey picture with
one coloured rectangle, LOST returns the rectangle's patch-aligned box, so every check
of coordinates below has an exact expected answer.
"""

from __future__ import annotations

import copy
import doctest
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import METHOD_OPTS, MODEL, PATCH, RED, gamma, save, scene
from PIL import Image

import discover
from discover.backbone import Backbone
from discover.boxes import mask_box
from discover.errors import ImageError
from discover.images import iter_image_paths
from discover.pipeline import Detection, Discoverer, ImageResult

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# (width, height, rect): sides and rectangles on the 14-pixel patch grid
SCENES = [
    (140, 112, (42, 28, 98, 84)),
    (112, 84, (14, 14, 56, 56)),
    (98, 140, (28, 70, 84, 126)),
    (126, 84, (70, 0, 126, 42)),
]


@pytest.fixture(scope="module")
def scene_files(tmp_path_factory) -> list[tuple[Path, tuple[int, int, int, int]]]:
    d = tmp_path_factory.mktemp("scenes")
    return [(save(d / f"s{i}.png", scene(w, h, r)), r) for i, (w, h, r) in enumerate(SCENES)]


def _same(a: ImageResult, b: ImageResult) -> None:
    assert a.path == b.path and a.error == b.error
    assert (a.width, a.height, a.grid) == (b.width, b.height, b.grid)
    assert len(a.detections) == len(b.detections)
    for da, db in zip(a.detections, b.detections, strict=True):
        assert da.box == db.box and da.seed == db.seed and da.patch_box == db.patch_box
        assert torch.equal(da.mask, db.mask)
        # The features come from a float64 model (see the test): equal to ~1e-13, so LOST's
        # float32 copies of them are equal or one ulp apart; its score, a ratio of sums of
        # n gram entries, then moves by at most ~2 gamma_n, whatever the CPU.
        n = a.grid[0] * a.grid[1]
        assert da.score == pytest.approx(db.score, rel=4 * gamma(n), abs=4 * gamma(n))


# ----------------------------------------------------------------------------- results


def test_detection_fields(discoverer):
    res = discoverer.process(scene(140, 112, (42, 28, 98, 84)))
    assert res.ok and res.path == "<array>"
    assert (res.width, res.height, res.grid, res.patch_size) == (140, 112, (8, 10), PATCH)
    [det] = res.detections
    assert isinstance(det, Detection)
    assert det.box == (42, 28, 98, 84)  # original pixels, end exclusive
    assert det.patch_box == (3, 2, 7, 6)
    assert det.mask.dtype == torch.bool and det.mask.shape == (8, 10)
    assert det.mask.device.type == "cpu"
    assert mask_box(det.mask) == det.patch_box
    r, c = det.seed
    assert bool(det.mask[r, c])  # the seed patch is part of the object
    assert isinstance(det.score, float) and np.isfinite(det.score)
    assert res.boxes == [det.box]


def test_detection_repr_is_one_short_line():
    """It used to print the whole mask tensor (hundreds of lines for a large grid)."""
    mask = torch.zeros(37, 37, dtype=torch.bool)
    mask[3:9, 2:6] = True
    det = Detection(box=(28.0, 42.5, 84.0, 126.0), score=1.23456789, seed=(4, 3), mask=mask,
                    patch_box=(2, 3, 6, 9))  # fmt: skip
    text = repr(det)
    assert text == (
        "Detection(box=(28, 42.5, 84, 126), score=1.235, seed=(4, 3), mask=37x37 with 24 patches)"
    )
    assert "tensor" not in text and "\n" not in text
    res = ImageResult("a.jpg", [det], width=518, height=518, extras={"image": np.zeros((9, 9))})
    assert "\n" not in repr(res) and "array" not in repr(res) and text in repr(res)


def test_call_accepts_path_pil_and_array(discoverer, scene_files):
    path, rect = scene_files[0]
    arr = np.asarray(Image.open(path).convert("RGB"))
    for image in (path, str(path), Image.open(path), arr):
        dets = discoverer(image)
        assert [d.box for d in dets] == [rect], type(image)


def test_discover_function_one_shot(fast_models, checkpoint, scene_files):
    path, rect = scene_files[2]
    dets = discover.discover(path, model=MODEL, checkpoint=checkpoint, **METHOD_OPTS)
    assert [d.box for d in dets] == [rect]
    assert fast_models[-1]["checkpoint"] == checkpoint
    arr = np.asarray(Image.open(path).convert("RGB"))
    same = discover.discover(arr, model=MODEL, checkpoint=checkpoint, **METHOD_OPTS)
    assert [d.box for d in same] == [rect]
    with pytest.raises(ImageError, match="file not found"):
        discover.discover(path.parent / "nope.png", model=MODEL, checkpoint=checkpoint)


def test_docstring_example_runs():
    torch.manual_seed(0)
    result = doctest.testmod(discover, raise_on_error=False, verbose=False)
    assert result.attempted >= 5 and result.failed == 0


# ----------------------------------------------------------------------------- run()


def test_run_keeps_input_order_and_paths_with_errors_in_between(discoverer, scene_files, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    order = [
        scene_files[0][0],
        tmp_path / "empty.png",
        scene_files[1][0],
        str(scene_files[2][0]),
        tmp_path / "text.jpg",
        scene_files[3][0],
        tmp_path / "missing.png",
    ]
    results = list(discoverer.run(order))
    assert [r.path for r in results] == [str(p) for p in order]
    assert [r.ok for r in results] == [True, False, True, True, False, True, False]
    assert [r.boxes for r in results if r.ok] == [[rect] for _, rect in scene_files]
    assert "empty file" in results[1].error and "not a readable image" in results[4].error


def test_batched_run_equals_image_by_image(vit_and_checkpoint, tmp_path):
    """batch_size=4 over mixed sizes: same boxes, seeds and masks as one image at a time.

    On a float64 copy of the model: in float32 a batch and a single image sum in another
    order, which moves the features by ~1e-5 on some CPUs and can flip a near-tied LOST
    seed; in float64 the gap is ~1e-13, so any difference left is a batching bug."""
    backbone = Backbone(MODEL, model=copy.deepcopy(vit_and_checkpoint[0]).double())
    paths = []
    for i in range(9):
        w, h, (x0, y0, x1, y1) = SCENES[i % len(SCENES)]
        shift = PATCH * (i // len(SCENES) % 2)  # two variants of each size
        rect = (x0, y0 + shift, x1, min(h, y1 + shift))
        paths.append(save(tmp_path / f"{i:02d}.png", scene(w, h, rect)))
    paths.insert(5, tmp_path / "missing.png")
    single = Discoverer(backbone=backbone, batch_size=1, num_workers=0, **METHOD_OPTS)
    batched = Discoverer(backbone=backbone, batch_size=4, num_workers=2, **METHOD_OPTS)
    calls = []
    forward = backbone.forward

    def counting(x, **kw):
        calls.append(x.shape[0])
        return forward(x, **kw)

    one_by_one = [single.process(p) for p in paths]
    backbone.forward = counting
    try:
        together = list(batched.run(paths))
    finally:
        del backbone.forward
    assert max(calls) > 1 and len(calls) < len(paths) - 1  # really batched
    assert [r.path for r in together] == [str(p) for p in paths]
    for a, b in zip(together, one_by_one, strict=True):
        _same(a, b)
    assert sum(r.ok for r in together) == 9


def test_run_streams_results_as_it_goes(discoverer, tmp_path):
    path = save(tmp_path / "small.png", scene(28, 28, (0, 0, 14, 14)))
    pulled = []

    def paths():
        for i in range(40):
            pulled.append(i)
            yield path

    it = discoverer.run(paths())
    first = next(it)
    assert first.ok and len(pulled) < 40  # the first result came before the input ran out
    it.close()


def test_a_failing_batch_is_retried_image_by_image(backbone, scene_files, monkeypatch):
    disc = Discoverer(backbone=backbone, batch_size=4, **METHOD_OPTS)
    paths = [p for p, _ in scene_files[:2]] * 2  # two images of each size
    real = disc._run_batch
    bad = str(scene_files[1][0])

    def flaky(items):
        if len(items) > 1:
            raise RuntimeError("CUDA out of memory.\nTried to allocate 20 GiB")
        if items[0][0] == bad:
            raise RuntimeError("boom")
        return real(items)

    monkeypatch.setattr(disc, "_run_batch", flaky)
    results = list(disc.run(paths))
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.error for r in results if r.path == bad] == ["RuntimeError: boom"] * 2
    assert [r.boxes for r in results if r.path != bad] == [[scene_files[0][1]]] * 2


# ----------------------------------------------------------------------------- mapping


@pytest.fixture(scope="module")
def small_backbone(vit_and_checkpoint):
    """The same weights, inputs resized so the longer side is at most 140 pixels."""
    return Backbone(MODEL, model=copy.deepcopy(vit_and_checkpoint[0]), max_size=140)


def test_max_size_boxes_are_in_original_pixels(small_backbone, tmp_path):
    disc = Discoverer(backbone=small_backbone, **METHOD_OPTS)
    # 280x224 -> network 140x112, the rectangle on the network's patch grid
    res = disc.process(scene(280, 224, (84, 56, 196, 168)))
    assert res.grid == (8, 10) and res.scale == (2.0, 2.0)
    assert res.boxes == [(84, 56, 196, 168)]
    # a JPEG 4x larger: decoded at reduced scale (draft), then resized, then mapped back
    path = save(tmp_path / "big.jpg", scene(560, 448, (168, 112, 392, 336)), quality=95)
    res = disc.process(path)
    assert (res.width, res.height, res.grid) == (560, 448, (8, 10))
    assert res.boxes == [(168, 112, 392, 336)]


def test_huge_image_downscaled_with_max_size(small_backbone, discoverer, huge_jpeg):
    disc = Discoverer(backbone=small_backbone, **METHOD_OPTS)
    res = disc.process(huge_jpeg)
    assert res.ok, res.error
    assert (res.width, res.height, res.grid) == (20000, 20000, (10, 10))
    # the dark square is at x 8000..14000, y 6000..12000: one network patch is ~2000 px
    [box] = res.boxes
    assert box == pytest.approx((8000, 6000, 14000, 12000), abs=2001)
    # without max_size the same file is refused with a hint
    assert "--max-size" in discoverer.process(huge_jpeg).error


def test_exif_rotated_photo_gives_the_upright_box(discoverer, tmp_path):
    upright = scene(98, 140, (28, 70, 84, 126))
    stored = np.ascontiguousarray(np.rot90(upright))  # what a camera held sideways stores
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    Image.fromarray(stored).save(tmp_path / "raw.jpg", quality=95)
    res = discoverer.process(tmp_path / "photo.jpg")
    assert (res.width, res.height) == (98, 140)
    assert res.boxes == [(28, 70, 84, 126)]
    # the stored pixels without the tag: the rotated picture, and so the rotated box
    raw = discoverer.process(tmp_path / "raw.jpg")
    assert (raw.width, raw.height) == (140, 98)
    assert raw.boxes == [(70, 14, 126, 70)]


@pytest.mark.parametrize("size", [(10, 10), (13, 200), (200, 13)])
def test_image_smaller_than_one_patch(discoverer, tmp_path, size):
    w, h = size
    res = discoverer.process(np.zeros((h, w, 3), dtype=np.uint8))
    assert not res.ok and "smaller than one 14x14 patch" in res.error
    path = save(tmp_path / "tiny.png", np.zeros((h, w, 3), dtype=np.uint8))
    with pytest.raises(ImageError, match="smaller than one"):
        discoverer(path)


def test_a_patch_exactly_is_enough(backbone):
    img = scene(14, 14, (0, 0, 7, 7), colour=RED)
    res = Discoverer(backbone=backbone, method="lost", center=False).process(img)
    assert res.ok and res.grid == (1, 1) and res.boxes == [(0, 0, 14, 14)]
    # centred, a lone patch has a zero feature: a clean "nothing found" record
    res = Discoverer(backbone=backbone, method="lost", center=True).process(img)
    assert res.error.startswith("no object found")
    # TokenCut (the DINOv2 default) needs three patches for a cut: a record that says so
    res = Discoverer(backbone=backbone).process(img)
    assert res.error.startswith("no object found") and "at least 3 patches" in res.error


def test_keep_images_attaches_the_network_input(small_backbone):
    disc = Discoverer(backbone=small_backbone, keep_images=True, **METHOD_OPTS)
    res = disc.process(scene(280, 224, (84, 56, 196, 168)))
    assert res.extras["image"].shape == (112, 140, 3)


# ----------------------------------------------------------------------------- options


def test_bad_options_fail_at_construction(backbone):
    with pytest.raises(ValueError, match="unknown method"):
        Discoverer(backbone=backbone, method="nope")
    with pytest.raises(ValueError, match="invalid options for lost.*k_patch"):
        Discoverer(backbone=backbone, method="lost", k_patch=10)  # misspelt: not silently
    with pytest.raises(ValueError, match="invalid options for tokencut.*k_patches"):
        Discoverer(backbone=backbone, k_patches=10)  # the default method has no such option
    with pytest.raises(ValueError, match="k_patches must be >= 1"):
        Discoverer(backbone=backbone, method="lost", k_patches=0)
    with pytest.raises(ValueError, match="iou_threshold"):
        Discoverer(backbone=backbone, iou_threshold=2.0)
    with pytest.raises(ValueError, match="batch_size"):
        Discoverer(backbone=backbone, batch_size=0)
    with pytest.raises(ValueError, match="max_objects"):
        Discoverer(backbone=backbone, max_objects=0)
    with pytest.raises(ValueError, match="invalid options for tokencut"):
        Discoverer(backbone=backbone, method="tokencut", k_patches=5)


def test_process_reports_unusable_arrays(discoverer):
    res = discoverer.process(np.zeros((28, 28, 2), dtype=np.uint8))
    assert not res.ok and "expected an HxW" in res.error
    with pytest.raises(ImageError):
        discoverer(np.zeros(5))


def test_tokencut_and_several_objects_run_through_the_pipeline(backbone):
    img = scene(140, 112, (14, 14, 42, 42))
    img[70:98, 98:126] = RED
    res = Discoverer(backbone=backbone, max_objects=3, **METHOD_OPTS).process(img)
    assert res.ok and 1 <= len(res.detections) <= 3
    scores = [d.score for d in res.detections]
    assert scores == sorted(scores, reverse=True)
    tc = Discoverer(backbone=backbone, method="tokencut").process(img)
    assert tc.ok and len(tc.detections) == 1


# ----------------------------------------------------------------------------- paths


def test_iter_image_paths(tmp_path):
    d = tmp_path / "photos"
    (d / "sub").mkdir(parents=True)
    for name in ("b.JPG", "a.png", "c.Jpeg", "d.TIFF", "e.webp", "f.bmp", "notes.txt", "g.gif"):
        (d / name).write_bytes(b"x")
    (d / "sub" / "z.jpg").write_bytes(b"x")
    (d / "dir.jpg").mkdir()
    (d / "broken.jpg").symlink_to(d / "nowhere.jpg")
    top = [p.name for p in iter_image_paths([d])]
    assert top == ["a.png", "b.JPG", "broken.jpg", "c.Jpeg", "d.TIFF", "e.webp", "f.bmp"]
    deep = [p.relative_to(d).as_posix() for p in iter_image_paths([d], recursive=True)]
    assert deep == [*top, "sub/z.jpg"]
    # files named explicitly are kept whatever their extension, and listed once
    named = iter_image_paths([d / "notes.txt", d, d / "a.png"])
    assert named[0].name == "notes.txt" and [p.name for p in named].count("a.png") == 1
    assert iter_image_paths([tmp_path / "photos" / "sub"]) == [d / "sub" / "z.jpg"]
    (tmp_path / "empty").mkdir()
    assert iter_image_paths([tmp_path / "empty"]) == []
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        iter_image_paths([tmp_path / "missing"])
