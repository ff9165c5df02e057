"""The pipeline: files -> images -> backbone -> method -> pixel boxes, streamed.

:class:`Discoverer` loads the backbone once and then boxes single images
(``__call__``) or streams over many paths (``run``):

- images are decoded, EXIF-rotated and resized in background threads (Pillow and
  OpenCV release the GIL) while the model runs;
- images of equal network-input size are batched together (one forward per batch);
  a bounded look-ahead window keeps memory flat and results in input order;
- the discovery method runs per image on the device that holds the features;
- each result is yielded as soon as its batch is done.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from discover.backbone import (
    DEFAULT_MAX_PATCHES,
    DEFAULT_MODEL,
    Backbone,
    Prepared,
    model_family,
)
from discover.boxes import patch_box_to_pixels
from discover.errors import ImageError, RegdiscoverError
from discover.images import DEFAULT_MAX_PIXELS, LoadedImage, read_image, to_rgb_array
from discover.methods import EmptyGraphError, get_method
from discover.objects import discover_objects


@dataclass(frozen=True, eq=False)
class Detection:
    """One discovered object."""

    box: tuple[float, float, float, float]
    """``(x0, y0, x1, y1)`` in original-image pixels; x0/y0 inclusive, x1/y1 exclusive."""
    score: float
    """The method's confidence (see :mod:`discover.objects`)."""
    seed: tuple[int, int]
    """``(row, col)`` of the seed patch in the patch grid."""
    mask: torch.Tensor
    """bool ``[h, w]`` at patch resolution (CPU)."""
    patch_box: tuple[int, int, int, int]
    """The box in patch units, end exclusive."""


@dataclass(eq=False)
class ImageResult:
    """What the pipeline found in one image (or why it failed)."""

    path: str
    detections: list[Detection] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    error: str | None = None
    grid: tuple[int, int] | None = None
    patch_size: int | None = None
    scale: tuple[float, float] = (1.0, 1.0)
    """Original pixels per network-input pixel, ``(sx, sy)``."""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [d.box for d in self.detections]


# Calibrated defaults per (method, model family), used when the caller sets none of the
# keys of the entry. DINOv2's last-layer keys have all-positive dot products (every
# patch gets full degree and plain LOST returns the whole image); subtracting the
# image's mean feature restores a signed graph. Measured on the annotated samples with
# the offline DINOv2 ViT-S/14 (README, "Calibrating LOST on DINOv2").
METHOD_DEFAULTS: dict[tuple[str, str], dict[str, Any]] = {
    ("lost", "dinov2"): {"center": True, "gram_bias": 0.0},
    ("tokencut", "dinov2"): {"center": True},
}


def method_defaults(method: str, model: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` completed with the calibrated defaults of ``method`` for ``model``.

    A default entry applies only when the caller set none of its keys, so an explicit
    ``gram_bias`` or ``center`` always means exactly what it says.
    """
    defaults = METHOD_DEFAULTS.get((method, model_family(model)), {})
    if any(k in params for k in defaults):
        return dict(params)
    return {**defaults, **params}


class Discoverer:
    """Load a backbone once, then discover objects in images.

    Args:
        model: timm model name (default: DINOv2 ViT-S/14 with registers from the hub;
            ``vit_small_patch14_dinov2.imgfocus`` works offline).
        checkpoint: local weights file for ``model``.
        method: ``lost`` or ``tokencut``.
        device: ``cpu`` or ``cuda[:i]``.
        batch_size: images of equal size per forward pass.
        features: ``keys`` (default), ``queries``, ``values`` or ``tokens``.
        precision: ``fp32``, ``bf16`` or ``fp16``.
        max_size: resize so the longer side is at most this many pixels.
        max_patches: without ``max_size``, downscale images whose patch grid would exceed
            this budget (default 9216 patches; ``None``: never).
        max_objects: objects per image (1 = the single-object method, exactly).
        min_score: drop objects scoring below this (abstain).
        iou_threshold: overlapping objects above this IoU are reported once.
        num_workers: image-decoding threads.
        max_pixels: decompression-bomb guard when ``max_size`` is not set.
        test_time_registers: ``None``, ``"auto"`` or a neuron JSON file (models without
            registers only; see :mod:`discover.registers`).
        pretrained: download hub weights when no checkpoint is given.
        keep_images: attach the network-input RGB array to each result as
            ``extras["image"]`` (for drawing).
        backbone: an already-built :class:`Backbone` (then the model options are ignored).
        **method_params: passed to the method (``k_patches``, ``gram_bias``, ``tau``...).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        checkpoint: str | None = None,
        method: str = "lost",
        device: str = "cpu",
        batch_size: int = 1,
        features: str = "keys",
        precision: str = "fp32",
        max_size: int | None = None,
        max_patches: int | None = DEFAULT_MAX_PATCHES,
        max_objects: int = 1,
        min_score: float | None = None,
        iou_threshold: float = 0.5,
        num_workers: int = 2,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        test_time_registers: str | None = None,
        pretrained: bool = True,
        keep_images: bool = False,
        backbone: Backbone | None = None,
        **method_params: Any,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {max_objects}")
        get_method(method)  # fail early on an unknown name
        self.method = method
        name = backbone.name if backbone is not None else model
        self.method_params = method_defaults(method, name, method_params)
        _check_options(method, self.method_params, max_objects, min_score, iou_threshold)
        self.batch_size = batch_size
        self.max_objects = max_objects
        self.min_score = min_score
        self.iou_threshold = iou_threshold
        self.num_workers = max(0, int(num_workers))
        self.max_pixels = max_pixels
        self.keep_images = keep_images
        if backbone is None:
            backbone = Backbone(
                model,
                checkpoint=checkpoint,
                pretrained=pretrained,
                features=features,
                device=device,
                precision=precision,
                max_size=max_size,
                max_patches=max_patches,
            )
        self.backbone = backbone
        self.test_time_registers = None
        if test_time_registers is not None:
            from discover.registers import attach_test_time_registers

            self.test_time_registers = attach_test_time_registers(backbone, test_time_registers)

    # -- public API ----------------------------------------------------------------------
    def __call__(self, image: str | os.PathLike[str] | Image.Image | np.ndarray) -> list[Detection]:
        """Detections for one image (a path, a PIL image or an HxWx3 uint8 array).

        Raises:
            ImageError: when the image cannot be read or used.
        """
        res = self.process(image)
        if res.error is not None:
            raise ImageError(res.error)
        return res.detections

    def process(self, image: str | os.PathLike[str] | Image.Image | np.ndarray) -> ImageResult:
        """Like ``__call__`` but returns the full :class:`ImageResult` (errors included)."""
        if isinstance(image, str | os.PathLike):
            return next(self.run([image]))
        name = "<array>" if isinstance(image, np.ndarray) else "<image>"
        try:
            arr = to_rgb_array(image)
            loaded = LoadedImage(arr, (arr.shape[1], arr.shape[0]))
            item = self._prepare(name, loaded)
        except RegdiscoverError as e:
            return ImageResult(name, error=str(e))
        return self._run_safely([item])[0]

    def run(self, paths: Iterable[str | os.PathLike[str]]) -> Iterator[ImageResult]:
        """Yield one :class:`ImageResult` per path, in order, as batches finish.

        Unreadable images yield a result with ``error`` set; the run goes on.
        """
        window = max(self.batch_size * 4, 8)
        pending: list[tuple[str, Prepared | ImageResult]] = []
        # Decode up to two windows ahead: the next window is being read while this one runs.
        for item in self._load(paths, depth=2 * window):
            pending.append(item)
            if len(pending) >= window:
                yield from self._flush(pending)
                pending = []
        if pending:
            yield from self._flush(pending)

    # -- internals -----------------------------------------------------------------------
    def _read(self, path: str) -> tuple[str, Prepared | ImageResult]:
        try:
            max_side = self.backbone.max_size
            loaded = read_image(
                path,
                max_side=max_side * 2 if max_side else None,
                max_pixels=self.max_pixels,
            )
            return self._prepare(path, loaded)
        except RegdiscoverError as e:
            return path, ImageResult(path, error=str(e))
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the run
            return path, ImageResult(path, error=f"{type(e).__name__}: {e}")

    def _prepare(self, path: str, loaded: LoadedImage) -> tuple[str, Prepared]:
        return path, self.backbone.prepare(loaded.array, loaded.original_size)

    def _load(
        self, paths: Iterable[str | os.PathLike[str]], depth: int
    ) -> Iterator[tuple[str, Any]]:
        names = (os.fspath(p) for p in paths)
        if self.num_workers == 0:
            for p in names:
                yield self._read(p)
            return
        with ThreadPoolExecutor(self.num_workers, thread_name_prefix="decode") as ex:
            queue: list[Future] = []
            for p in names:
                queue.append(ex.submit(self._read, p))
                if len(queue) >= depth:
                    yield queue.pop(0).result()
            while queue:
                yield queue.pop(0).result()

    def _flush(self, items: list[tuple[str, Any]]) -> Iterator[ImageResult]:
        """Run a window of loaded images bucketed by size, yield results in input order."""
        out: list[ImageResult | None] = [None] * len(items)
        buckets: dict[tuple[int, ...], list[int]] = {}
        for i, (_, it) in enumerate(items):
            if isinstance(it, ImageResult):
                out[i] = it
            else:
                buckets.setdefault(it.array.shape, []).append(i)
        ready = 0
        for idx in buckets.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                for i, r in zip(chunk, self._run_safely([items[i] for i in chunk]), strict=True):
                    out[i] = r
                while ready < len(out) and out[ready] is not None:
                    yield out[ready]
                    ready += 1
        while ready < len(out):
            yield out[ready]
            ready += 1

    def _run_safely(self, items: list[tuple[str, Prepared]]) -> list[ImageResult]:
        """:meth:`_run_batch`, but a batch that fails (e.g. out of memory) is retried image
        by image, and an image that still fails gets an error result: the run goes on."""
        try:
            return self._run_batch(items)
        except Exception as e:  # noqa: BLE001 - one image must never stop the run
            if len(items) > 1:
                return [r for item in items for r in self._run_safely([item])]
            text = str(e).strip()
            error = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
            return [ImageResult(items[0][0], error=error)]

    def _run_batch(self, items: list[tuple[str, Prepared]]) -> list[ImageResult]:
        bb = self.backbone
        x = bb.to_tensor([pr.array for _, pr in items])
        feats = bb(x)
        results = []
        for b, (path, pr) in enumerate(items):
            results.append(self._discover(path, pr, feats.patches[b], feats.grid))
        return results

    def _discover(
        self, path: str, pr: Prepared, feats: torch.Tensor, grid: tuple[int, int]
    ) -> ImageResult:
        p = self.backbone.patch_size
        res = ImageResult(
            path,
            width=pr.original_size[0],
            height=pr.original_size[1],
            grid=grid,
            patch_size=p,
            scale=pr.scale,
        )
        if self.keep_images:
            res.extras["image"] = pr.array
        try:
            objs = discover_objects(
                feats,
                grid,
                method=self.method,
                max_objects=self.max_objects,
                min_score=self.min_score,
                iou_threshold=self.iou_threshold,
                **self.method_params,
            )
        except EmptyGraphError as e:
            res.error = f"no object found: {e}"
            return res
        except ValueError as e:  # e.g. non-finite features (fp16 overflow)
            res.error = f"discovery failed: {e}"
            return res
        w = grid[1]
        for o in objs:
            box = patch_box_to_pixels(o.box, p, pr.input_size, pr.scale)
            res.detections.append(
                Detection(
                    box=tuple(box),
                    score=float(o.score),
                    seed=(int(o.seed) // w, int(o.seed) % w),
                    mask=o.mask.detach().to("cpu", copy=False),
                    patch_box=tuple(int(v) for v in o.box),
                )
            )
        return res


def _check_options(
    method: str,
    params: dict[str, Any],
    max_objects: int,
    min_score: float | None,
    iou_threshold: float,
) -> None:
    """Run the method once on a tiny random graph, so that a misspelt or out-of-range
    option fails now with one clear error instead of once per image."""
    if "exclude" in params:  # sized for real images: cannot be tried on a 3x3 grid
        return
    feats = torch.randn(9, 8, generator=torch.Generator().manual_seed(0))
    try:
        discover_objects(
            feats,
            (3, 3),
            method=method,
            max_objects=max_objects,
            min_score=min_score,
            iou_threshold=iou_threshold,
            **params,
        )
    except EmptyGraphError:
        pass
    except (TypeError, ValueError) as e:
        raise ValueError(f"invalid options for {method}: {e}") from None


def discover(
    image: str | os.PathLike[str] | Image.Image | np.ndarray,
    model: str = DEFAULT_MODEL,
    method: str = "lost",
    **options: Any,
) -> list[Detection]:
    """Discover the main object(s) of one image.

    Loads the model each call: for many images build a :class:`Discoverer` once.
    ``options`` are :class:`Discoverer`'s keyword arguments.
    """
    return Discoverer(model, method=method, **options)(image)


def iter_image_paths(
    paths: Iterable[str | os.PathLike[str]], recursive: bool = False
) -> list[Path]:
    """Expand files and folders into a sorted list of image files.

    Folders contribute their files with a supported extension (case-insensitive), recursively
    with ``recursive``. Files named explicitly are kept whatever their extension (so a bad
    file yields an error record rather than silently vanishing). Missing paths raise. A file
    reached twice (named and inside a named folder) is listed once, where first met.
    """
    from discover.images import is_image_file

    out: dict[Path, None] = {}
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            it = p.rglob("*") if recursive else p.iterdir()
            found = sorted(q for q in it if (q.is_file() or q.is_symlink()) and is_image_file(q))
            out.update(dict.fromkeys(found))
        elif p.exists() or p.is_symlink():
            out[p] = None
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return list(out)
