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
from typing import Any

import numpy as np
import torch
from PIL import Image

from discover.backbone import DEFAULT_MAX_PATCHES, Backbone, Prepared, check_feature_kind
from discover.boxes import patch_box_to_pixels
from discover.errors import ImageError, RegdiscoverError, first_line
from discover.images import DEFAULT_MAX_PIXELS, LoadedImage, read_image, to_rgb_array
from discover.methods import EmptyGraphError, get_method
from discover.methods.base import default_method
from discover.models import DEFAULT_MODEL, spec_for
from discover.objects import check_object_options, discover_objects

DEFAULT_MAX_SIZE = 336
"""Longer side of the network input of :class:`Discoverer` and ``discover boxes``, in
pixels: measured on the development benchmark (README, "Calibration"), as accurate as the
native size on its photos and several times faster; a 12-megapixel photo is not run at
thousands of patches. ``discover eval`` keeps the native size (the benchmark protocol)."""


@dataclass(frozen=True, eq=False, repr=False)
class Detection:
    """One discovered object (its repr is one short line: box, score, seed, mask shape)."""

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

    def __repr__(self) -> str:
        box = ", ".join(f"{float(v):g}" for v in self.box)
        shape = "x".join(str(int(v)) for v in self.mask.shape)
        return (
            f"Detection(box=({box}), score={float(self.score):.4g}, seed={tuple(self.seed)}, "
            f"mask={shape} with {int(self.mask.sum())} patches)"
        )


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
    extras: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        return [d.box for d in self.detections]


class Discoverer:
    """Load a backbone once, then discover objects in images.

    Args:
        model: timm model name (default: DINOv2 ViT-S/14 with registers from the hub;
            ``vit_small_patch14_dinov2.imgfocus`` works offline).
        checkpoint: local weights file for ``model``.
        method: a registered method (``discover.methods.method_names()``); default: the
            calibrated choice for the model's family.
        device: ``cpu`` or ``cuda[:i]``.
        batch_size: images of equal size per forward pass.
        features: ``keys``, ``queries``, ``values`` or ``tokens``; default: the method's
            calibrated choice for the model's family, else ``keys``.
        layer: the block the features come from (default: the method's calibrated choice,
            else the last block, ``-1``).
        precision: ``fp32``, ``bf16`` or ``fp16``.
        max_size: resize so the longer side is at most this many pixels (default
            :data:`DEFAULT_MAX_SIZE`, chosen on the development benchmark; ``None`` or
            ``0``: the native size, as the benchmark protocol of ``discover eval``).
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
        **method_params: the method's parameters (``k_patches``, ``gram_bias``, ``tau``...),
            each defaulting to its calibrated value for the model's family, then to the
            reference's (key by key; ``None`` or ``"auto"`` mean the default).
    """

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        checkpoint: str | None = None,
        method: str | None = None,
        device: str = "cpu",
        batch_size: int = 1,
        features: str | None = None,
        layer: int | None = None,
        precision: str = "fp32",
        max_size: int | None = DEFAULT_MAX_SIZE,
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
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        check_object_options(max_objects, min_score, iou_threshold)
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be positive (0: native size), got {max_size}")
        max_size = max_size or None
        spec = backbone.spec if backbone is not None else spec_for(model)
        self.method = get_method(method or default_method(spec.family))
        self.params, feature = self.method.resolve(spec.family, method_params)
        self.features = check_feature_kind(features or feature.get("features", "keys"))
        self.batch_size = int(batch_size)
        self.max_objects = int(max_objects)
        self.min_score = min_score
        self.iou_threshold = float(iou_threshold)
        self.num_workers = int(num_workers)
        self.max_pixels = max_pixels
        self.keep_images = keep_images
        if backbone is None:
            backbone = Backbone(
                model,
                checkpoint=checkpoint,
                pretrained=pretrained,
                features=self.features,
                device=device,
                precision=precision,
                max_size=max_size,
                max_patches=max_patches or None,
            )
        self.backbone = backbone
        if "cls_attention" in self.method.needs and backbone.num_cls == 0:
            raise ValueError(
                f"{self.method.name} needs the [CLS] attention, and {backbone.name} has no "
                "[CLS] token (a global-average-pool model): use lost, tokencut or spectral"
            )
        self.layer = backbone.block_index(layer if layer is not None else feature.get("layer", -1))
        self.checkpoint = checkpoint
        self.test_time_registers = None
        if test_time_registers is not None:
            from discover.registers import attach_test_time_registers

            self.test_time_registers = attach_test_time_registers(backbone, test_time_registers)
        self.test_time_registers_spec = test_time_registers

    @property
    def method_params(self) -> dict[str, Any]:
        """The method's parameters in effect (defaults and calibration applied)."""
        return self.params.as_dict()

    def settings(self) -> dict[str, Any]:
        """Everything that decides the boxes: recorded in outputs, compared on resume."""
        bb = self.backbone
        return {
            "model": bb.name,
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
            "method": self.method.name,
            "method_params": self.method_params,
            "features": self.features,
            "layer": self.layer,
            "max_size": bb.max_size,
            "max_patches": bb.max_patches,
            "precision": bb.precision,
            "test_time_registers": self.test_time_registers_spec,
            "max_objects": self.max_objects,
            "min_score": self.min_score,
            "iou_threshold": self.iou_threshold,
        }

    def close(self) -> None:
        """Detach what this discoverer attached to its backbone (test-time registers)."""
        if self.test_time_registers is not None:
            self.test_time_registers.detach()

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
            return [ImageResult(items[0][0], error=f"{type(e).__name__}: {first_line(e)}")]

    def _run_batch(self, items: list[tuple[str, Prepared]]) -> list[ImageResult]:
        bb = self.backbone
        x = bb.to_tensor([pr.array for _, pr in items])
        needs = self.method.needs
        feats = bb(x, features=self.features, layer=self.layer, attention="cls_attention" in needs)
        attention = feats.patch_attention() if "cls_attention" in needs else None
        results = []
        for b, (path, pr) in enumerate(items):
            inputs = {} if attention is None else {"cls_attention": attention[b]}
            results.append(self._discover(path, pr, feats.patches[b], feats.grid, inputs))
        return results

    def _discover(
        self,
        path: str,
        pr: Prepared,
        feats: torch.Tensor,
        grid: tuple[int, int],
        inputs: dict[str, torch.Tensor],
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
                inputs=inputs,
                params=self.params,
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


def discover(
    image: str | os.PathLike[str] | Image.Image | np.ndarray,
    model: str = DEFAULT_MODEL,
    method: str | None = None,
    **options: Any,
) -> list[Detection]:
    """Discover the main object(s) of one image.

    Loads the model each call: for many images build a :class:`Discoverer` once.
    ``options`` are :class:`Discoverer`'s keyword arguments.
    """
    return Discoverer(model, method=method, **options)(image)
