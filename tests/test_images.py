"""Reading image files into upright RGB uint8 arrays (discover.images), and every way a
file can be bad. No model here: these tests are about pixels and error messages."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save, scene, write_huge_png, write_lying_png
from PIL import Image

from discover.errors import ImageError
from discover.images import (
    DEFAULT_MAX_PIXELS,
    HARD_MAX_PIXELS,
    LoadedImage,
    is_image_file,
    read_image,
    resize_longer_side,
    to_rgb_array,
)

# ----------------------------------------------------------------------------- modes


def test_rgb_png_round_trips_exactly(tmp_path):
    img = scene(42, 28, (14, 0, 28, 14))
    img[0, 0] = (1, 2, 3)
    li = read_image(save(tmp_path / "a.png", img))
    assert isinstance(li, LoadedImage)
    assert li.array.dtype == np.uint8 and li.array.flags.c_contiguous
    np.testing.assert_array_equal(li.array, img)
    assert li.original_size == li.size == (42, 28)


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.arange(28 * 14, dtype=np.uint8).reshape(14, 28)
    li = read_image(save(tmp_path / "g.png", gray))
    assert li.array.shape == (14, 28, 3)
    for c in range(3):
        np.testing.assert_array_equal(li.array[:, :, c], gray)


def test_sixteen_bit_png_is_scaled_to_eight_bits(tmp_path):
    values = np.arange(256, dtype=np.uint16).reshape(16, 16)
    path = tmp_path / "g16.png"
    Image.fromarray(values * 257).save(path)
    assert Image.open(path).mode.startswith("I")  # really decoded as 16-bit
    li = read_image(path)
    np.testing.assert_array_equal(li.array[:, :, 1], values.astype(np.uint8))


def test_rgba_is_composited_over_white(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (200, 0, 0)
    rgba[0, :, 3] = 255  # opaque red
    rgba[1, :, 3] = 0  # fully transparent: white
    rgba[2, :, 3] = 128  # half: between
    out = read_image(save(tmp_path / "a.png", rgba)).array
    assert tuple(out[0, 0]) == (200, 0, 0)
    assert tuple(out[1, 0]) == (255, 255, 255)
    r, g, b = (int(v) for v in out[2, 0])
    assert 200 < r < 255 and g == b and 120 < g < 135


def test_palette_png_with_and_without_transparency(tmp_path):
    img = scene(28, 28, (0, 0, 14, 14), colour=(10, 200, 30))
    pal = Image.fromarray(img).quantize(colors=4)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(tmp_path / "p.png").array, img)
    # the grey index becomes transparent: white after compositing
    grey_index = pal.getpixel((27, 27))
    pal.save(tmp_path / "pt.png", transparency=grey_index)
    out = read_image(tmp_path / "pt.png").array
    assert tuple(out[27, 27]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (10, 200, 30)


def test_la_and_one_bit_images(tmp_path):
    la = Image.fromarray(np.full((8, 8, 2), (50, 255), dtype=np.uint8), "LA")
    la.save(tmp_path / "la.png")
    assert tuple(read_image(tmp_path / "la.png").array[0, 0]) == (50, 50, 50)
    bits = Image.fromarray(np.eye(8, dtype=bool))
    bits.save(tmp_path / "bits.png")
    out = read_image(tmp_path / "bits.png").array
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 0, 0)


def test_cmyk_jpeg_keeps_its_colours(tmp_path):
    img = scene(56, 56, (14, 14, 42, 42))
    Image.fromarray(img).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = read_image(tmp_path / "c.jpg").array
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 4


# Pillow's transpose that *undoes* each EXIF orientation, applied here to store the
# upright picture the way a camera would.
_STORE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("orientation", sorted(_STORE))
def test_exif_orientation_is_applied(tmp_path, orientation):
    upright = scene(42, 28, (0, 0, 14, 7))  # not symmetric: any wrong transform shows
    upright[27, 41] = (0, 0, 255)
    stored = Image.fromarray(upright).transpose(_STORE[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.png"
    stored.save(path, exif=exif)
    li = read_image(path)
    np.testing.assert_array_equal(li.array, upright)
    assert li.original_size == (42, 28)
    # the same through the PIL-image entry point
    np.testing.assert_array_equal(to_rgb_array(Image.open(path)), upright)


# ----------------------------------------------------------------------------- size


def test_max_side_downscales_and_keeps_the_original_size(tmp_path):
    img = scene(300, 200, (100, 50, 200, 150))
    path = save(tmp_path / "big.jpg", img, quality=95)
    li = read_image(path, max_side=60)
    assert li.original_size == (300, 200)
    assert li.size == (60, 40)
    # EXIF swaps are reported in the original size too
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(img).save(tmp_path / "rot.jpg", exif=exif)
    li = read_image(tmp_path / "rot.jpg", max_side=60)
    assert li.original_size == (200, 300) and li.size == (40, 60)


def test_huge_png_is_refused_and_max_size_is_not_offered(tmp_path, no_big_decode):
    path = write_huge_png(tmp_path / "huge.png")
    assert path.stat().st_size < 200_000
    # A PNG is decoded whole whatever --max-size says: the message must not advise it.
    for max_side in (None, 448):
        with pytest.raises(ImageError) as e:
            read_image(path, max_side=max_side)
        msg = str(e.value)
        assert msg.startswith("too large: 20000x20000 = 400 MP exceeds the 100 MP"), msg
        assert "PNG has no reduced decoding: --max-size does not help" in msg
        assert "pass --max-size" not in msg
    assert no_big_decode == []  # refused from the header, nothing decoded
    # the guard is a parameter
    small = save(tmp_path / "s.png", scene(100, 100, (0, 0, 1, 1)))
    assert 100 * 100 < DEFAULT_MAX_PIXELS
    with pytest.raises(ImageError, match="too large"):
        read_image(small, max_pixels=5000)
    with pytest.raises(ImageError, match="too large"):
        read_image(small, max_pixels=5000, max_side=50)  # max_side lifts no guard


def test_a_png_bomb_under_max_size_is_refused_from_its_header(tmp_path, no_big_decode):
    """The issue's bomb: a tiny PNG whose header says 37000x37000 used to be decoded at
    full size (14 GB) as soon as --max-size was given. ``no_big_decode`` turns such a
    decode into an immediate failure, so this test never allocates the bomb."""
    bomb = write_lying_png(tmp_path / "bomb.png", 37000, 37000)
    assert bomb.stat().st_size < 200 and 37000 * 37000 < HARD_MAX_PIXELS
    for max_side in (448, 1024, None):
        with pytest.raises(ImageError, match=r"too large: 37000x37000 = 1369 MP exceeds"):
            read_image(bomb, max_side=max_side)
    assert no_big_decode == []
    # above the hard limit nothing helps, JPEG or not
    over = write_lying_png(tmp_path / "over.png", 40000, 40000)
    with pytest.raises(ImageError, match="1500 MP limit of any read"):
        read_image(over, max_side=448)


def test_huge_jpeg_is_read_small_with_max_side(huge_jpeg, no_big_decode):
    li = read_image(huge_jpeg, max_side=280)
    assert li.original_size == (20000, 20000)
    assert li.size == (280, 280)
    # the dark square (rows 6000:12000, cols 8000:14000) lands where it should
    small = li.array[:, :, 0].astype(int)
    assert small[126, 154] < 40 and small[40, 40] > 100
    assert no_big_decode == []  # decoded at 1/8 scale (2500x2500), never at 400 MP


def test_huge_jpeg_messages_say_what_helps(huge_jpeg, no_big_decode):
    # without --max-size: 400 MP, and 1/8 scale (6.25 MP) would fit: advise it
    with pytest.raises(ImageError, match=r"400 MP exceeds .*; pass --max-size to downscale"):
        read_image(huge_jpeg)
    # a --max-size too large for any reduction: 20000 px asked, decoded whole
    with pytest.raises(ImageError) as e:
        read_image(huge_jpeg, max_side=15000)
    assert "decoded at 20000x20000 for this --max-size" in str(e.value)
    assert "a smaller --max-size" in str(e.value)
    # a guard that even 1/8 scale exceeds: no advice that would not help
    with pytest.raises(ImageError) as e:
        read_image(huge_jpeg, max_side=280, max_pixels=1_000_000)
    assert str(e.value).endswith("even decoded at 1/8 scale") and "pass" not in str(e.value)
    assert no_big_decode == []


def test_resize_longer_side():
    arr = np.zeros((100, 50, 3), dtype=np.uint8)
    assert resize_longer_side(arr, 40).shape == (40, 20, 3)
    assert resize_longer_side(arr, 400) is arr


def test_bomb_guard_of_pillow_is_restored_after_threaded_reads(tmp_path, monkeypatch):
    """Lifting Pillow's global guard from several threads at once must not leave it off."""
    import discover.images

    paths = [save(tmp_path / f"{i}.png", scene(28, 28, (0, 0, 14, 14))) for i in range(4)]
    real_open = Image.open

    def slow_open(*args, **kwargs):
        time.sleep(0.05)  # widen the window between saving and restoring the global
        return real_open(*args, **kwargs)

    monkeypatch.setattr(discover.images.Image, "open", slow_open)
    before = Image.MAX_IMAGE_PIXELS
    assert before is not None
    threads = [threading.Thread(target=read_image, args=(p,)) for p in paths]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert Image.MAX_IMAGE_PIXELS == before


# ----------------------------------------------------------------------------- errors


def _zero_byte(d: Path) -> Path:
    (d / "empty.jpg").write_bytes(b"")
    return d / "empty.jpg"


def _truncated_jpeg(d: Path) -> Path:
    path = d / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    save(path, noise, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text_file(d: Path) -> Path:
    (d / "text.jpg").write_text("not a picture\n")
    return d / "text.jpg"


def _directory(d: Path) -> Path:
    (d / "folder.jpg").mkdir()
    return d / "folder.jpg"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_zero_byte, "empty file"),
        (_truncated_jpeg, "truncated"),
        (_text_file, "not a readable image"),
        (lambda d: d / "missing.jpg", "file not found"),
        (_directory, "is a directory"),
    ],
    ids=["zero-byte", "truncated-jpeg", "text-file", "missing", "directory"],
)
def test_bad_files_raise_one_clear_reason(tmp_path, make, reason):
    path = make(tmp_path)
    with pytest.raises(ImageError, match=reason) as exc:
        read_image(path)
    assert "\n" not in str(exc.value)


def test_broken_symlink(tmp_path):
    link = tmp_path / "gone.jpg"
    link.symlink_to(tmp_path / "nowhere.jpg")
    with pytest.raises(ImageError, match="broken symbolic link"):
        read_image(link)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0,
    reason="root reads files whatever their permissions (chmod 000 blocks nothing)",
)
def test_unreadable_file(tmp_path):
    path = save(tmp_path / "locked.png", scene(28, 28, (0, 0, 14, 14)))
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission denied"):
            read_image(path)
    finally:
        path.chmod(0o644)


def test_is_image_file_ignores_case():
    for name in ("a.jpg", "b.JPEG", "c.Png", "d.bmp", "e.TIF", "f.tiff", "g.webp"):
        assert is_image_file(name), name
    for name in ("a.txt", "b.jpg.txt", "c", "d.gif"):
        assert not is_image_file(name), name


# ----------------------------------------------------------------------------- arrays


def test_to_rgb_array_accepts_the_usual_layouts():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert to_rgb_array(gray).shape == (3, 4, 3)
    assert to_rgb_array(gray[:, :, None]).shape == (3, 4, 3)
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)  # transparent: white
    assert (to_rgb_array(rgba) == 255).all()
    flipped = np.arange(36, dtype=np.uint8).reshape(3, 4, 3)[:, ::-1]
    out = to_rgb_array(flipped)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, flipped)
    for bad in (np.zeros((3, 4, 2)), np.zeros(5), np.zeros((2, 2, 2, 3))):
        with pytest.raises(ImageError, match="expected an HxW"):
            to_rgb_array(bad)


def test_to_rgb_array_value_ranges():
    ref = np.array([[[0, 128, 255]]], dtype=np.uint8)
    # 8-bit values held in wider integer types (e.g. after arithmetic) stay as they are
    np.testing.assert_array_equal(to_rgb_array(ref.astype(np.int64)), ref)
    # 16-bit data
    np.testing.assert_array_equal(to_rgb_array(ref.astype(np.uint16) * 257), ref)
    # floats in [0, 1] and in [0, 255]
    np.testing.assert_array_equal(to_rgb_array(ref / 255.0), ref)
    np.testing.assert_array_equal(to_rgb_array(ref.astype(np.float32)), ref)
    # other ranges are stretched; NaN becomes 0
    out = to_rgb_array(np.array([[[-1.0, 0.0, 1.0], [np.nan, 1.0, 1.0]]]))
    assert out.tolist() == [[[0, 128, 255], [0, 255, 255]]]
    assert (to_rgb_array(np.ones((2, 2, 3), dtype=bool)) == 255).all()
    with pytest.raises(ImageError, match="no finite"):
        to_rgb_array(np.full((2, 2, 3), np.nan))
