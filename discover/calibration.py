"""The calibration harness: measure discovery settings on an annotated benchmark.

A sweep over hundreds of settings takes minutes, not hours, because the backbone runs
once per (model, block, input size) and image: :class:`FeatureCache` keeps every
feature kind of that block and the last block's [CLS] attention on disk, keyed by the
image file's content hash and those settings (and the model's weights), and the methods
then run on the cached tensors.

Each image is prepared exactly as :class:`discover.pipeline.Discoverer` prepares it at
that input size (read, EXIF, the same resize and padding), and its boxes are scored
exactly as ``discover eval`` scores them, so a setting measured here gives the same
CorLoc through the command line.

Per setting (:func:`summarize`): CorLoc with a bootstrap interval over images, the mean
IoU of the top box with its best ground truth, CorLoc per size stratum (the largest
ground-truth object under 20%, 20-50%, over 50% of the image), and images/s at that
input size (the forward measured when the features were cached, plus the method).
Two baselines stand beside every table: the whole image, and a centred box of half the
image's area.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from discover.backbone import FEATURE_KINDS, Backbone
from discover.boxes import box_iou, patch_box_to_pixels
from discover.corloc import is_correct, predictions
from discover.datasets import Sample
from discover.errors import RegdiscoverError, first_line
from discover.images import read_image
from discover.methods import EmptyGraphError, get_method
from discover.objects import discover_objects
from discover.outputs import atomic_write
from discover.stats import Interval, bootstrap_interval

__all__ = [
    "BASELINES",
    "SIZES",
    "STRATA",
    "Evaluated",
    "FeatureCache",
    "ImageFeatures",
    "Row",
    "Setting",
    "evaluate_baseline",
    "evaluate_setting",
    "extract_features",
    "largest_object_share",
    "summarize",
]

SIZES: tuple[int | None, ...] = (None, 224, 336, 448, 518, 672, 896)
"""Input sizes of the sweep: native (``None``), then the longer side in pixels."""
STRATA = (("<20%", 0.0, 0.2), ("20-50%", 0.2, 0.5), (">50%", 0.5, 1.01))
"""Size strata: the largest ground-truth object's share of the image area."""
BASELINES = ("whole image", "centre box (half area)")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class Setting:
    """One way of discovering: a method with parameters, on features of an input size."""

    method: str
    params: tuple[tuple[str, Any], ...] = ()
    features: str = "keys"
    layer: int = -1
    size: int | None = None
    """The longer side of the network input (``None``: native size, the protocol)."""

    @classmethod
    def of(cls, method: str, features: str = "keys", layer: int = -1, size: int | None = None,
           **params: Any) -> Setting:  # fmt: skip
        return cls(method, tuple(sorted(params.items())), features, layer, size)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.params)

    @classmethod
    def from_label(cls, label: str) -> Setting:
        """The setting that :meth:`label` wrote (``"lost keys L-3 center=True @448"``).

        Raises:
            ValueError: not a setting's label.
        """
        words = label.split()
        if len(words) < 3 or not words[-1].startswith("@"):
            raise ValueError(f"not a setting label: {label!r}")
        size = None if words[-1] == "@native" else int(words[-1][1:])
        layer, rest = -1, words[2:-1]
        if rest and rest[0].startswith("L") and "=" not in rest[0]:
            layer, rest = int(rest[0][1:]), rest[1:]
        params = {}
        for word in rest:
            key, _, text = word.partition("=")
            params[key] = _parse_value(text)
        return cls.of(words[0], words[1], layer, size, **params)

    def label(self) -> str:
        opts = " ".join(f"{k}={v}" for k, v in self.params)
        layer = "" if self.layer == -1 else f" L{self.layer}"
        opts = " " + opts if opts else ""
        return f"{self.method} {self.features}{layer}{opts} @{size_label(self.size)}"


def _parse_value(text: str) -> Any:
    if text in ("True", "False"):
        return text == "True"
    try:
        return float(text) if any(c in text for c in ".e") else int(text)
    except ValueError:
        return text


def size_label(size: int | None) -> str:
    return "native" if size is None else str(size)


# -- features -------------------------------------------------------------------------------
@dataclass
class ImageFeatures:
    """What the backbone gives for one image at one input size, as cached."""

    kinds: dict[str, torch.Tensor]
    """``{kind: [N, D] float32}`` for every feature kind of the cached block."""
    cls_attention: torch.Tensor
    """``[heads, N]``, the last block's [CLS] attention on the patches."""
    grid: tuple[int, int]
    patch_size: int
    input_size: tuple[int, int]
    scale: tuple[float, float]
    original_size: tuple[int, int]
    seconds: float
    """Wall time of reading, preparing and the forward pass when it was computed."""


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def model_fingerprint(backbone: Backbone) -> str:
    """A short hash of the model's weights, its name and what the wrapper adds."""
    h = hashlib.sha256(f"{backbone.name}|{backbone.num_registers}|{backbone.precision}".encode())
    for name, tensor in sorted(backbone.model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


class FeatureCache:
    """Cached features on disk: ``ROOT/<model fingerprint>/L<layer>-S<size>/<sha>.pt``.

    Changing the image file (its content hash), the model weights, the block or the
    input size changes the key; an entry of another cache format is recomputed. Entries
    are written atomically, so an interrupted extraction keeps every finished one.
    """

    def __init__(self, root: str | Path, backbone: Backbone) -> None:
        self.root = Path(root)
        self.backbone = backbone
        self.fingerprint = model_fingerprint(backbone)
        self._sha: dict[str, str] = {}

    def path(self, image: str | Path, size: int | None, layer: int) -> Path:
        st = Path(image).stat()
        key = f"{image}|{st.st_mtime_ns}|{st.st_size}"  # a changed file is hashed again
        if key not in self._sha:
            self._sha[key] = file_sha256(image)
        li = self.backbone.block_index(layer)
        return self.root / self.fingerprint / f"L{li}-S{size_label(size)}" / f"{self._sha[key]}.pt"

    def load(self, image: str | Path, size: int | None, layer: int) -> ImageFeatures | None:
        p = self.path(image, size, layer)
        if not p.is_file():
            return None
        try:
            data = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a torn or foreign file is simply recomputed
            return None
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT:
            return None
        return ImageFeatures(
            kinds=dict(data["kinds"]),
            cls_attention=data["cls_attention"],
            grid=tuple(data["grid"]),
            patch_size=int(data["patch_size"]),
            input_size=tuple(data["input_size"]),
            scale=tuple(data["scale"]),
            original_size=tuple(data["original_size"]),
            seconds=float(data["seconds"]),
        )

    def store(self, image: str | Path, size: int | None, layer: int, f: ImageFeatures) -> None:
        buf = io.BytesIO()
        torch.save(
            {
                "format": CACHE_FORMAT,
                "kinds": f.kinds,
                "cls_attention": f.cls_attention,
                "grid": list(f.grid),
                "patch_size": f.patch_size,
                "input_size": list(f.input_size),
                "scale": list(f.scale),
                "original_size": list(f.original_size),
                "seconds": f.seconds,
            },
            buf,
        )
        atomic_write(self.path(image, size, layer), buf.getvalue())

    def compute(self, image: str | Path, size: int | None, layer: int) -> ImageFeatures:
        """Run the backbone on one image as the pipeline would at ``size``."""
        bb = self.backbone
        t0 = time.perf_counter()
        saved = bb.max_size
        bb.max_size = size
        try:
            loaded = read_image(image, max_side=size * 2 if size else None)
            prepared = bb.prepare(loaded.array, loaded.original_size)
            feats = bb.forward_all(bb.to_tensor([prepared.array]), layer=layer, attention=True)
        finally:
            bb.max_size = saved
        any_kind = next(iter(feats.values()))
        return ImageFeatures(
            kinds={k: v.patches[0].float().cpu().clone() for k, v in feats.items()},
            cls_attention=any_kind.patch_attention()[0].float().cpu().clone(),
            grid=any_kind.grid,
            patch_size=any_kind.patch_size,
            input_size=prepared.input_size,
            scale=prepared.scale,
            original_size=prepared.original_size,
            seconds=time.perf_counter() - t0,
        )

    def get(self, image: str | Path, size: int | None, layer: int) -> ImageFeatures:
        cached = self.load(image, size, layer)
        if cached is None:
            cached = self.compute(image, size, layer)
            self.store(image, size, layer, cached)
        return cached


def extract_features(
    cache: FeatureCache,
    samples: Sequence[Sample],
    sizes: Iterable[int | None],
    layers: Iterable[int] = (-1,),
    progress: Callable[[str], None] | None = None,
) -> int:
    """Fill the cache for every (sample, size, layer); returns how many were computed.

    An image that cannot be read is skipped here (its settings count it as a failure).
    """
    computed = 0
    for size, layer in itertools.product(list(sizes), list(layers)):
        for s in samples:
            if cache.load(s.path, size, layer) is None:
                try:
                    cache.store(s.path, size, layer, cache.compute(s.path, size, layer))
                    computed += 1
                except RegdiscoverError:
                    pass
            if progress is not None:
                progress(f"features @{size_label(size)}")
    return computed


def time_forward(
    cache: FeatureCache, samples: Sequence[Sample], size: int | None, layer: int = -1,
    count: int = 16,
) -> float:  # fmt: skip
    """The median seconds of reading, preparing and the forward pass at ``size`` over the
    first ``count`` readable samples, timed now (the cached features keep the time of
    their extraction, which other work on the machine may have slowed).

    Raises:
        ValueError: no sample could be read.
    """
    times = []
    for s in samples:
        if len(times) >= count:
            break
        try:
            times.append(cache.compute(s.path, size, layer).seconds)
        except RegdiscoverError:
            continue
    if not times:
        raise ValueError("no readable sample to time")
    return float(np.median(times))


# -- scoring ----------------------------------------------------------------------------------
@dataclass
class Evaluated:
    """A setting (or baseline) scored on every sample, in sample order."""

    label: str
    setting: Setting | None
    boxes: list[list[float] | None]
    hits: np.ndarray
    ious: np.ndarray
    method_seconds: np.ndarray
    forward_seconds: np.ndarray
    errors: list[str | None] = field(default_factory=list)


def largest_object_share(sample: Sample) -> float:
    """The area of the sample's largest ground-truth box over the image area."""
    if sample.width is None or sample.height is None or len(sample.boxes) == 0:
        return 0.0
    b = sample.boxes.astype(np.float64)
    areas = (b[:, 2] - b[:, 0]).clip(min=0) * (b[:, 3] - b[:, 1]).clip(min=0)
    return float(areas.max() / (sample.width * sample.height))


def _score(box: list[float] | None, sample: Sample) -> tuple[bool, float]:
    pred = predictions([box] if box is not None else None)
    if pred is None or len(sample.boxes) == 0:
        return False, 0.0
    iou = float(box_iou(pred[0], sample.boxes).max())
    return is_correct(pred[0], sample.boxes), iou


def _record_box(box: Sequence[float]) -> list[float]:
    """A pixel box as an output record stores it (whole numbers as ints, else 2 decimals)."""
    out = []
    for v in box:
        f = float(v)
        out.append(int(f) if f.is_integer() else round(f, 2))
    return out


def evaluate_setting(
    setting: Setting,
    samples: Sequence[Sample],
    cache: FeatureCache,
    max_objects: int = 1,
    loaded: Mapping[str, ImageFeatures | None] | None = None,
) -> Evaluated:
    """Run ``setting`` on the cached features of every sample and score its top box.

    ``loaded`` maps image ids to features already read from the cache (for the setting's
    size and block), to read each file once for many settings."""
    method = get_method(setting.method)
    params = method.params.build(setting.options, method.name)
    n = len(samples)
    out = Evaluated(setting.label(), setting, [], np.zeros(n, bool), np.zeros(n), np.zeros(n),
                    np.zeros(n))  # fmt: skip
    for i, s in enumerate(samples):
        box: list[float] | None = None
        error = s.error
        if error is None:
            if loaded is not None:
                f = loaded.get(s.image_id)
            else:
                f = cache.load(s.path, setting.size, setting.layer)
            if f is None:
                error = "features not cached (unreadable image?)"
            else:
                out.forward_seconds[i] = f.seconds
                inputs = {"cls_attention": f.cls_attention} if method.needs else {}
                t0 = time.perf_counter()
                try:
                    objs = discover_objects(
                        f.kinds[setting.features], f.grid, method=method,
                        max_objects=max_objects, inputs=inputs, params=params,
                    )  # fmt: skip
                    if objs:
                        pixel = patch_box_to_pixels(
                            objs[0].box, f.patch_size, f.input_size, f.scale
                        )
                        box = _record_box(pixel)
                except (EmptyGraphError, ValueError) as e:
                    error = first_line(e)
                out.method_seconds[i] = time.perf_counter() - t0
        out.boxes.append(box)
        out.errors.append(error)
        out.hits[i], out.ious[i] = _score(box, s)
    return out


def evaluate_baseline(name: str, samples: Sequence[Sample]) -> Evaluated:
    """A box that ignores the image: ``whole image`` or a centred box of half its area."""
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {BASELINES}")
    n = len(samples)
    out = Evaluated(name, None, [], np.zeros(n, bool), np.zeros(n), np.zeros(n), np.zeros(n))
    for i, s in enumerate(samples):
        box = None
        if s.width and s.height and s.error is None:
            w, h = s.width, s.height
            if name == BASELINES[0]:
                box = [0, 0, w, h]
            else:
                f = 1 / math.sqrt(2)  # half the area, the image's aspect ratio
                bw, bh = w * f, h * f
                box = _record_box([(w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2])
        out.boxes.append(box)
        out.errors.append(None if box else s.error or "no size")
        out.hits[i], out.ious[i] = _score(box, s)
    return out


@dataclass
class Row:
    """One line of a calibration table."""

    label: str
    n: int
    corloc: Interval
    mean_iou: float
    strata: dict[str, tuple[float, int]]
    """``{stratum: (CorLoc, images)}``."""
    images_per_s: float | None
    setting: Setting | None = None

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "setting": self.label,
            "images": self.n,
            "corloc": round(100 * self.corloc.value, 2),
            "corloc_low": round(100 * self.corloc.low, 2),
            "corloc_high": round(100 * self.corloc.high, 2),
            "mean_iou": round(100 * self.mean_iou, 2),
        }
        for name, (value, count) in self.strata.items():
            d[f"corloc {name}"] = round(100 * value, 2) if count else None
            d[f"images {name}"] = count
        d["images_per_s"] = None if self.images_per_s is None else round(self.images_per_s, 3)
        return d


def summarize(ev: Evaluated, samples: Sequence[Sample], *, resamples: int = 2000) -> Row:
    """CorLoc with its 95% bootstrap interval, mean IoU, strata and speed of ``ev``."""
    shares = np.array([largest_object_share(s) for s in samples])
    strata = {}
    for name, lo, hi in STRATA:
        sel = (shares >= lo) & (shares < hi)
        strata[name] = (float(ev.hits[sel].mean()) if sel.any() else math.nan, int(sel.sum()))
    speed = None
    if ev.setting is not None:
        per_image = np.median(ev.forward_seconds) + np.median(ev.method_seconds)
        speed = 1.0 / per_image if per_image > 0 else None
    return Row(
        ev.label,
        len(samples),
        bootstrap_interval(ev.hits.astype(float), resamples=resamples),
        float(ev.ious.mean()),
        strata,
        speed,
        ev.setting,
    )


def departures(setting: Setting) -> int:
    """How far ``setting`` is from its method's reference: one for a feature kind other
    than keys, another block, and each parameter that differs from the reference's
    default (the input size is not one: it is judged by its speed)."""
    params = get_method(setting.method).params
    reference = {f.name: f.default for f in dataclasses.fields(params)}
    n = int(setting.features != "keys") + int(setting.layer != -1)
    return n + sum(1 for k, v in setting.params if reference.get(k, v) != v)


def best_by_rule(rows: Sequence[Row]) -> Row:
    """The README's selection rule, on one split: the one-standard-error rule.

    Among the settings whose CorLoc is within one standard error of the best one's
    (``sqrt(p (1 - p) / n)``, the binomial error of the best), the simplest (fewest
    :func:`departures` from the method's reference), then the fastest (images/s), then
    the best CorLoc, then the label. "Intervals overlap" would admit settings about 15
    points worse on 136 images (each 95% interval is +-8 points wide); one standard error
    (4 points there) keeps the choice close to the best while preferring what is simpler
    and faster when the difference is noise.
    """
    rows = [r for r in rows if r.setting is not None]
    if not rows:
        raise ValueError("no setting to choose from")
    top = max(rows, key=lambda r: r.corloc.value)
    p = top.corloc.value
    floor = p - math.sqrt(p * (1 - p) / top.n) - 1e-12
    close = [r for r in rows if r.corloc.value >= floor]

    def order(r: Row) -> tuple:
        return (departures(r.setting), -(r.images_per_s or 0.0), -r.corloc.value, r.label)

    return min(close, key=order)


# -- the sweep ---------------------------------------------------------------------------------
GRID: dict[str, dict[str, tuple[Any, ...]]] = {
    "lost": {"center": (False, True), "gram_bias": (0.0, -10.0, "p10", "p20", "p30", "p50")},
    "tokencut": {"center": (False, True), "tau": (0.1, 0.2, 0.3, 0.5)},
    "found": {"center": (False, True), "bkg_th": (0.1, 0.2, 0.3, 0.4, 0.5)},
    "spectral": {"center": (False, True)},
    "dino_seg": {"head": (0, 1, 2, 3, 4, 5)},
    "vote": {"mode": ("box", "mask")},
}
"""Parameter values swept per method (every combination, every feature kind)."""
FEATURELESS = {"dino_seg"}
"""Methods that read only the attention: swept once, not per feature kind."""


def default_grid(
    sizes: Iterable[int | None] = SIZES,
    methods: Iterable[str] | None = None,
    kinds: Iterable[str] = FEATURE_KINDS,
    layers: Iterable[int] = (-1,),
) -> list[Setting]:
    """Every combination of :data:`GRID` for ``methods`` (default: all of them)."""
    out = []
    for method in methods or GRID:
        grid = GRID.get(method, {})
        keys = sorted(grid)
        for size, layer in itertools.product(list(sizes), list(layers)):
            for kind in ["keys"] if method in FEATURELESS else list(kinds):
                for values in itertools.product(*(grid[k] for k in keys)):
                    out.append(
                        Setting.of(
                            method, kind, layer, size, **dict(zip(keys, values, strict=True))
                        )
                    )
    return out


_SHARED: dict[str, Any] = {}
"""What the sweep's worker processes read (inherited through ``fork``, not pickled)."""


def _evaluate_shared(setting: Setting) -> Evaluated:
    return evaluate_setting(setting, _SHARED["samples"], _SHARED["cache"], loaded=_SHARED["loaded"])


def sweep(
    settings: Sequence[Setting],
    samples: Sequence[Sample],
    cache: FeatureCache,
    progress: Callable[[Evaluated], None] | None = None,
    workers: int = 1,
) -> list[Evaluated]:
    """Evaluate every setting (features must be cached: see :func:`extract_features`).

    Settings are grouped by input size and block, and the features of a group are read
    from the cache once. With ``workers > 1`` the settings of a group run in that many
    forked processes (one torch thread each); results come back in ``settings`` order.
    """
    groups: dict[tuple[int | None, int], list[int]] = {}
    for i, st in enumerate(settings):
        groups.setdefault((st.size, st.layer), []).append(i)
    out: list[Evaluated | None] = [None] * len(settings)
    for (size, layer), idx in groups.items():
        loaded = {s.image_id: cache.load(s.path, size, layer) for s in samples}
        todo = [settings[i] for i in idx]
        if workers > 1 and len(todo) > 1:
            import multiprocessing

            _SHARED.update(samples=samples, cache=cache, loaded=loaded)
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                results = pool.imap(_evaluate_shared, todo)
                for i, ev in zip(idx, results, strict=True):
                    out[i] = ev
                    if progress is not None:
                        progress(ev)
            _SHARED.clear()
        else:
            for i, st in zip(idx, todo, strict=True):
                out[i] = evaluate_setting(st, samples, cache, loaded=loaded)
                if progress is not None:
                    progress(out[i])
    return [ev for ev in out if ev is not None]


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table: CorLoc with interval, mean IoU, strata, speed."""
    if not rows:
        return ""
    head = ["setting", "CorLoc % [95% CI]", "mIoU %"]
    head += [f"{name} (n={rows[0].strata[name][1]})" for name, _, _ in STRATA]
    head.append("img/s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for r in rows:
        cells = [
            r.label.replace("|", "/"),
            f"{100 * r.corloc.value:.1f} [{100 * r.corloc.low:.1f}, {100 * r.corloc.high:.1f}]",
            f"{100 * r.mean_iou:.1f}",
        ]
        for name, _, _ in STRATA:
            value, count = r.strata[name]
            cells.append("-" if not count else f"{100 * value:.1f}")
        cells.append("-" if r.images_per_s is None else f"{r.images_per_s:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_csv(path: str | Path) -> list[Row]:
    """The rows of a table written by :func:`write_csv` (settings parsed back from their
    labels; baselines have ``setting=None``)."""
    import csv

    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for d in csv.DictReader(fh):
            ci = Interval(*(float(d[k]) / 100 for k in ("corloc", "corloc_low", "corloc_high")))
            strata = {
                name: (float(d[f"corloc {name}"] or 0) / 100, int(d[f"images {name}"]))
                for name, _, _ in STRATA
            }
            speed = float(d["images_per_s"]) if d["images_per_s"] else None
            try:
                setting = Setting.from_label(d["setting"])
            except ValueError:
                setting = None
            rows.append(Row(d["setting"], int(d["images"]), ci, float(d["mean_iou"]) / 100,
                            strata, speed, setting))  # fmt: skip
    return rows


def write_csv(rows: Sequence[Row], path: str | Path) -> None:
    import csv

    dicts = [r.as_dict() for r in rows]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, list(dicts[0]) if dicts else ["setting"])
    writer.writeheader()
    writer.writerows(dicts)
    atomic_write(Path(path), buf.getvalue())
