"""Shared fixtures: a random-init DINOv2-with-registers checkpoint, a backbone built once,
and small synthetic pictures whose object LOST finds exactly.

Nothing here touches the network: ``HF_HUB_OFFLINE`` is set before anything imports timm,
and the model is created with ``pretrained=False``.

The pictures (:func:`scene`) are a flat grey background with one filled rectangle. With
the random-init ViT-S/14 used here, LOST returns the patch-aligned bounding box of the
rectangle when the picture's sides are multiples of the patch size (14): what the tests
that check box mapping (EXIF, ``max_size``, batching) rely on. ``METHOD_OPTS`` pins the
LOST options so those tests do not follow later changes of the calibrated defaults.
"""

from __future__ import annotations

import copy
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

MODEL = "vit_small_patch14_reg4_dinov2"
PATCH = 14
METHOD_OPTS = {"method": "lost", "features": "keys", "center": True, "gram_bias": 0.0}
"""LOST, pinned, for the box-mapping tests (the DINOv2 defaults when they were written)."""
CLI_METHOD_OPTS = ["--method", "lost", "--features", "keys", "--center", "--gram-bias", "0"]
RED = (220, 30, 30)


def scene(
    width: int,
    height: int,
    rect: tuple[int, int, int, int],
    colour: tuple[int, int, int] = RED,
    background: int = 128,
) -> np.ndarray:
    """RGB uint8 ``[height, width, 3]``: grey, with ``rect = (x0, y0, x1, y1)`` (end
    exclusive) filled with ``colour``."""
    img = np.full((height, width, 3), background, dtype=np.uint8)
    x0, y0, x1, y1 = rect
    img[y0:y1, x0:x1] = colour
    return img


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    """Write an array with Pillow (format from the extension); returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(tag + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)


def write_huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid all-black 1-bit PNG of ``width x height`` (20000^2: 50 KB, a fraction of a s)."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(height // 1000)]
    parts.append(comp.compress(row * (height % 1000)))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"".join(parts))
        + _png_chunk(b"IEND", b"")
    )
    return path


def write_lying_png(path: Path, width: int = 37000, height: int = 37000) -> Path:
    """A 100-byte PNG whose header claims ``width x height`` RGB pixels (4 GB decoded at
    37000^2) but holds one empty row of data: a decompression bomb's header. Only a
    decoder that trusts the header allocates anything; the guard must refuse it first."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + _png_chunk(b"IEND", b"")
    )
    return path


@pytest.fixture
def no_big_decode(monkeypatch) -> Iterator[list[tuple[int, int]]]:
    """Make any decode above 100 MP fail at once (AssertionError, before Pillow allocates
    its buffer), so a test of the bomb guard is bounded in memory and time by design:
    code that would decode a bomb fails the test instead of swapping. Yields the sizes
    refused, for the test to check that nothing got that far."""
    from PIL import ImageFile

    from discover.images import DEFAULT_MAX_PIXELS

    real_load = ImageFile.ImageFile.load
    refused: list[tuple[int, int]] = []

    def guarded_load(self):
        w, h = self.size
        if w * h > DEFAULT_MAX_PIXELS:
            refused.append((w, h))
            raise AssertionError(f"decoding {w}x{h} pixels: the bomb guard let it through")
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", guarded_load)
    yield refused


# -- tolerances -------------------------------------------------------------------------
# A float32 result depends on the order of its sums, which differs between CPUs (SIMD
# width, blocking of the matmul kernels) and between batch sizes. A tolerance measured on
# one machine therefore fails on another. Each comparison in the tests is either made in
# float64 (where reordering moves results by ~1e-13, far below what a bug moves) or given
# a bound derived from the arithmetic, with Higham's gamma below.
U32 = torch.finfo(torch.float32).eps / 2
"""The unit roundoff of float32 (2**-24): the relative error of one rounding."""


def gamma(n: int, dtype: torch.dtype = torch.float32) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of a sum of
    ``n + 1`` terms or a dot product of length ``n``, in ANY order of summation (recursive,
    pairwise, blocked or SIMD), relative to the sum of the terms' absolute values (Higham,
    Accuracy and Stability of Numerical Algorithms, 2nd ed., sections 3.1 and 4.2)."""
    u = torch.finfo(dtype).eps / 2
    return n * u / (1 - n * u)


@pytest.fixture(scope="session")
def vit_and_checkpoint(tmp_path_factory) -> tuple[torch.nn.Module, str]:
    """A random-init ``vit_small_patch14_reg4_dinov2`` and its weights saved to a file."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=0, dynamic_img_size=True)
    path = tmp_path_factory.mktemp("weights") / "vit_small_reg4_random.pth"
    torch.save(model.state_dict(), path)
    return model.eval(), str(path)


@pytest.fixture(scope="session")
def checkpoint(vit_and_checkpoint) -> str:
    return vit_and_checkpoint[1]


@pytest.fixture(scope="session")
def backbone(vit_and_checkpoint):
    """A :class:`~discover.backbone.Backbone` over the random model (built once)."""
    from discover.backbone import Backbone

    return Backbone(MODEL, model=copy.deepcopy(vit_and_checkpoint[0]))


@pytest.fixture(scope="session")
def discoverer(backbone):
    """A :class:`~discover.pipeline.Discoverer` on the shared backbone, LOST pinned."""
    from discover.pipeline import Discoverer

    return Discoverer(backbone=backbone, **METHOD_OPTS)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: on a busy 2-core machine two OpenMP threads mostly spin
    waiting for each other (3-5x the CPU time for these tiny inputs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fast_models(monkeypatch, vit_and_checkpoint) -> Iterator[list[dict]]:
    """Skip the slow part of loading a model (timm's weight init + reading the file).

    ``create_vit`` asked for the session checkpoint returns the model that was saved
    there (the same weights, shared: the tests never change them); anything else goes to
    the real function. Yields the list of calls (their keyword arguments), to check what
    the CLI asked for. (A Backbone leaves no hook on the model, so sharing it is safe.)
    """
    import discover.backbone
    from discover.weights import create_vit

    model, path = vit_and_checkpoint
    calls: list[dict] = []

    def cached(name, *, checkpoint=None, pretrained=True, offline_source=None):
        calls.append({"name": name, "checkpoint": checkpoint, "pretrained": pretrained})
        if checkpoint is not None and os.fspath(checkpoint) == path:
            return model
        return create_vit(
            name, checkpoint=checkpoint, pretrained=pretrained, offline_source=offline_source
        )

    monkeypatch.setattr(discover.backbone, "create_vit", cached)
    yield calls
    assert not model.blocks[-1].attn.qkv._forward_hooks, "a Backbone left a hook on the model"


@pytest.fixture
def run_cli(monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """Run ``discover.cli.main`` in-process with ``sys.argv`` patched.

    Returns ``(exit code, stdout, stderr)``; ``main`` always ends with ``SystemExit``.
    """
    from discover.cli import main

    def run(*args: str | os.PathLike[str]) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["discover", *(os.fspath(a) for a in args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            main()
        code = exc.value.code
        captured = capsys.readouterr()
        return (0 if code is None else int(code)), captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def huge_jpeg(tmp_path_factory) -> Path:
    """A real 20000 x 20000 grayscale JPEG (400 MP, about 5 MB, ~1.5 s to make)."""
    path = tmp_path_factory.mktemp("huge") / "huge.jpg"
    big = np.full((20000, 20000), 128, dtype=np.uint8)
    big[6000:12000, 8000:14000] = 0
    Image.fromarray(big).save(path, quality=20)
    return path


@pytest.fixture
def chdir_tmp(tmp_path, monkeypatch) -> Iterator[Path]:
    """Run the test inside ``tmp_path`` (relative image names in the outputs)."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture
def interrupt_run(monkeypatch) -> Iterator[Callable[[int | None], None]]:
    """``interrupt_run(k)``: ``Discoverer.run`` raises KeyboardInterrupt (Ctrl-C) after
    yielding ``k`` results; ``interrupt_run(None)`` restores the real method."""
    import discover.pipeline

    real_run = discover.pipeline.Discoverer.run

    def set_limit(k: int | None) -> None:
        if k is None:
            monkeypatch.setattr(discover.pipeline.Discoverer, "run", real_run)
            return

        def interrupted(self, paths):
            for i, res in enumerate(real_run(self, paths)):
                if i == k:
                    raise KeyboardInterrupt
                yield res

        monkeypatch.setattr(discover.pipeline.Discoverer, "run", interrupted)

    yield set_limit
