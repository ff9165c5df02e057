"""``discover inspect``: see the registers effect on your own images.

For every image and every model (one, or two to compare, e.g. DINOv2 with and without
registers) this runs the backbone once with token norms and the [CLS] attention, computes
the diagnostics of :mod:`discover.diagnostics` and LOST's intermediates, then writes

- ``OUT/<image stem>.png`` (``_2``, ``_3``... on a name clash): one row per model -- the
  image, the patch-token norm map on a colour scale shared by the models (outliers
  outlined), the [CLS] attention map and LOST's degree map with seed, expanded seed set,
  mask and box (see :func:`discover.viz.draw_inspection`);
- ``OUT/norms.csv``: one row per (image, model), see :data:`CSV_FIELDS`, written as it goes.

This module does the I/O and nothing else: no printing, no command-line parsing. The caller
gets the rows back (and through a progress callback) and can summarise them with
:func:`summarize`.
"""

from __future__ import annotations

import csv
import math
import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from discover.backbone import Backbone
from discover.diagnostics import (
    AttentionMaps,
    LostDiagnostics,
    NormStats,
    cls_attention_maps,
    lost_diagnostics,
    norm_stats,
    resolve_threshold,
)
from discover.errors import RegdiscoverError
from discover.images import read_image
from discover.methods import EmptyGraphError, get_method
from discover.outputs import unique_stem
from discover.viz import InspectionRow, draw_inspection, save_png

__all__ = ["CSV_FIELDS", "ModelDiagnostics", "diagnose", "inspect_images", "summarize"]

CSV_FIELDS = [
    "image",
    "model",
    "outlier_fraction",
    "max_norm",
    "median_norm",
    "threshold",
    "num_outliers",
    "num_patches",
    "grid",
    "cls_norm",
    "register_norms",
    "register_attention",
    "outlier_attention",
    "lost_seed",
    "lost_box",
    "png",
    "error",
]
"""Columns of ``norms.csv``:

- ``image``: the path as given; ``model``: the backbone's label;
- ``outlier_fraction``: outlier patches / patches; ``max_norm``, ``median_norm``: of the
  patch tokens; ``threshold``: the cutoff used; ``num_outliers``, ``num_patches``;
  ``grid``: ``HxW`` patches;
- ``cls_norm``: norm of the [CLS] token; ``register_norms``: the registers' norms
  (model registers then test-time ones), ``;``-separated, empty without registers;
- ``register_attention``: share of the [CLS] attention going to the registers (mean over
  heads); ``outlier_attention``: share of the [CLS] attention, registers left out and
  renormalised, going to the outlier patches (mean over heads);
- ``lost_seed``: ``row col``; ``lost_box``: ``x0 y0 x1 y1`` in patches, end exclusive
  (empty when LOST found nothing);
- ``png``: the figure written for the image; ``error``: why the image or model failed
  (then the other fields are empty), or a note such as ``lost: ...``.
"""

ProgressFn = Callable[[int, int, list[dict[str, Any]]], None]


@dataclass(frozen=True, eq=False)
class ModelDiagnostics:
    """Everything measured for one image with one model."""

    label: str
    image: np.ndarray
    """RGB uint8 network input (before padding)."""
    patch_size: int
    grid: tuple[int, int]
    norms: NormStats
    attention: AttentionMaps
    lost: LostDiagnostics | None
    """``None`` when LOST failed on a degenerate graph (see ``lost_error``)."""
    lost_error: str | None = None


def diagnose(
    backbone: Backbone,
    image: np.ndarray,
    *,
    label: str | None = None,
    threshold: float | str = "auto",
    lost_params: dict[str, Any] | None = None,
) -> ModelDiagnostics:
    """Run ``backbone`` on one RGB uint8 image and compute every diagnostic.

    ``lost_params`` go to :func:`discover.methods.lost.lost` as they are (no calibrated defaults).

    Raises:
        ImageError: the image is unusable for this backbone (e.g. smaller than a patch).
    """
    feats, prepared = backbone.extract([image], norms=True, attention=True)
    grid = feats.grid
    layout = {"num_cls": backbone.num_cls, "num_registers": backbone.num_registers}
    stats = norm_stats(feats.token_norms[0], grid, threshold=threshold, **layout)
    att = cls_attention_maps(feats.cls_attention[0], grid, **layout)
    lost_diag = None
    lost_error = None
    try:
        lost_diag = lost_diagnostics(feats.patches[0], grid, **(lost_params or {}))
    except EmptyGraphError as e:
        lost_error = f"lost: {e}"
    return ModelDiagnostics(
        label=label or backbone.name,
        image=prepared[0].array,
        patch_size=backbone.patch_size,
        grid=grid,
        norms=stats,
        attention=att,
        lost=lost_diag,
        lost_error=lost_error,
    )


def inspect_images(
    paths: Sequence[str | os.PathLike[str]],
    backbones: Sequence[tuple[str, Backbone]],
    out_dir: str | os.PathLike[str],
    *,
    threshold: float | str = "auto",
    lost_params: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    head: int | None = None,
    attention_registers: bool = False,
    panel_size: int = 320,
    max_side: int | None = None,
) -> list[dict[str, Any]]:
    """Write the inspection figure of every image and ``norms.csv``; return the CSV rows.

    Args:
        paths: image files (folders are the caller's business: expand them first).
        backbones: ``(label, backbone)`` pairs, one row of panels each (one or two models).
        out_dir: output folder (created).
        threshold: outlier cutoff, a number or ``"auto"`` (see
            :func:`discover.diagnostics.find_outliers`), the same for every model.
        lost_params: parameters of :func:`discover.methods.lost.lost`, completed per model
            key by key with LOST's calibrated parameters for its family, see
            :func:`lost_settings` (on the backbone's feature kind, keys by default: the
            panel shows what the graph of those features gives).
        progress: called after each image as ``progress(done, total, rows_of_that_image)``.
        head: draw this attention head instead of the mean over heads.
        attention_registers: draw the [CLS] attention as it is (register columns kept in
            the softmax) instead of renormalised over [CLS] and patches.
        panel_size: longer side of each panel, in pixels.
        max_side: downscale images on read so the longer side is at most this (see
            :func:`discover.images.read_image`); the backbone's ``max_size`` still applies.

    Returns:
        One dict per (image, model) with the keys of :data:`CSV_FIELDS`, in input order. An
        unreadable image gives one row per model with ``error`` set; it never raises for a
        bad file.

    Raises:
        ValueError: no backbone, or a bad threshold.
        OSError: the output folder or CSV cannot be written.
    """
    if not backbones:
        raise ValueError("inspect_images needs at least one (label, backbone) pair")
    resolve_threshold(torch.ones(1), threshold)  # a bad value fails here, not mid-run
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    used_names: dict[str, str] = {}
    # Figures are named after the image's path relative to the inputs' common folder.
    parents = [os.path.dirname(os.path.abspath(p)) for p in paths]
    top = os.path.commonpath(parents) if parents else ""

    def relative(name: str) -> str:
        return Path(os.path.relpath(os.path.abspath(name), top)).as_posix()

    opts = {"threshold": threshold, "lost_params": lost_params, "head": head}
    opts |= {"attention_registers": attention_registers, "panel_size": panel_size}
    opts |= {"max_side": max_side, "relative": relative}
    all_rows: list[dict[str, Any]] = []
    total = len(paths)
    with open(out / "norms.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        fh.flush()
        for done, path in enumerate(paths, start=1):
            rows = _inspect_one(path, backbones, out, used_names, **opts)
            writer.writerows(rows)
            fh.flush()
            all_rows.extend(rows)
            if progress is not None:
                progress(done, total, rows)
    return all_rows


def _inspect_one(
    path: str | os.PathLike[str],
    backbones: Sequence[tuple[str, Backbone]],
    out: Path,
    used_names: dict[str, str],
    **opts: Any,
) -> list[dict[str, Any]]:
    name = Path(path).as_posix()
    try:
        loaded = read_image(path, max_side=opts["max_side"])
    except RegdiscoverError as e:
        return [_error_row(name, label, str(e)) for label, _ in backbones]
    results: list[ModelDiagnostics | str] = []
    for label, bb in backbones:
        try:
            results.append(
                diagnose(
                    bb,
                    loaded.array,
                    label=label,
                    threshold=opts["threshold"],
                    lost_params=lost_settings(bb, opts["lost_params"]),
                )
            )
        except (RegdiscoverError, torch.cuda.OutOfMemoryError) as e:
            results.append(str(e) or type(e).__name__)
    good = [r for r in results if isinstance(r, ModelDiagnostics)]
    png = ""
    if good:
        fig = draw_inspection(
            [_figure_row(d, opts["head"], opts["attention_registers"]) for d in good],
            panel_size=opts["panel_size"],
        )
        target = out / f"{unique_stem(opts['relative'](name), used_names)}.png"
        save_png(target, fig)
        png = target.as_posix()
    rows = []
    for (label, _), res in zip(backbones, results, strict=True):
        if isinstance(res, str):
            rows.append(_error_row(name, label, res))
        else:
            rows.append(_row(name, res, png))
    return rows


def _figure_row(d: ModelDiagnostics, head: int | None, registers: bool) -> InspectionRow:
    s = d.norms
    regs = s.register_norms.tolist()
    info = (
        f"outliers {s.num_outliers}/{s.outliers.numel()} ({100 * s.outlier_fraction:.1f}%)"
        f" > {s.threshold:.4g}   median {s.median_norm:.1f}   max {s.max_norm:.1f}"
        f"   [CLS] {float(s.cls_norms[0]):.1f}"
    )
    if regs:
        info += "   reg " + ",".join(f"{v:.3g}" for v in regs)
    what = f"head {head}" if head is not None else "mean"
    if d.attention.registers.shape[-1] == 0:
        tag = ""
    else:
        tag = ", with reg" if registers else ", reg dropped"
    lost = d.lost
    return InspectionRow(
        label=d.label,
        image=d.image,
        patch_size=d.patch_size,
        norms=s.patch_norms,
        outliers=s.outliers,
        attention=d.attention.mean_map(registers=registers, head=head),
        degree=lost.degree if lost else None,
        seed=lost.seed if lost else None,
        box=lost.box if lost else None,
        mask=lost.mask if lost else None,
        expansion=lost.expansion if lost else None,
        info=info,
        attention_title=f"[CLS] attn ({what}{tag})",
    )


def _row(name: str, d: ModelDiagnostics, png: str) -> dict[str, Any]:
    s = d.norms
    att = d.attention
    outlier_att = (att.patches_no_registers * s.outliers.to(att.full.device)).sum(dim=(1, 2))
    row = _empty_row(name, d.label)
    row.update(
        outlier_fraction=_num(s.outlier_fraction),
        max_norm=_num(s.max_norm),
        median_norm=_num(s.median_norm),
        threshold=_num(s.threshold),
        num_outliers=s.num_outliers,
        num_patches=int(s.outliers.numel()),
        grid=f"{d.grid[0]}x{d.grid[1]}",
        cls_norm=_num(float(s.cls_norms[0])),
        register_norms=";".join(str(_num(v)) for v in s.register_norms.tolist()),
        register_attention=_num(float(att.register_mass.mean())),
        outlier_attention=_num(float(outlier_att.mean())),
        png=png,
        error=d.lost_error or "",
    )
    if d.lost is not None:
        row["lost_seed"] = f"{d.lost.seed[0]} {d.lost.seed[1]}"
        row["lost_box"] = " ".join(str(int(v)) for v in d.lost.box)
    return row


def _empty_row(name: str, label: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CSV_FIELDS, "")
    row["image"] = name
    row["model"] = label
    return row


def _error_row(name: str, label: str, error: str) -> dict[str, Any]:
    row = _empty_row(name, label)
    row["error"] = error
    return row


def _num(v: float) -> float:
    v = float(v)
    return v if not math.isfinite(v) else float(f"{v:.6g}")


def lost_settings(backbone: Backbone, given: dict[str, Any] | None) -> dict[str, Any]:
    """LOST's parameters for ``backbone``: ``given``, completed key by key with LOST's
    calibrated defaults for the model's family, then the reference's."""
    params, _ = get_method("lost").resolve(backbone.family, given or {})
    return params.as_dict()


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-model summary of :func:`inspect_images`' rows, models in first-seen order.

    Each dict: ``model``, ``images`` (measured), ``failed``, ``mean_outlier_fraction``
    (over the measured images), ``images_with_outliers``, ``max_norm`` (largest patch norm
    seen), ``median_norm`` (median of the per-image medians).
    """
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_model.setdefault(str(r["model"]), []).append(r)
    summary = []
    for model, rs in by_model.items():
        ok = [r for r in rs if r.get("outlier_fraction") not in ("", None)]
        fr = [float(r["outlier_fraction"]) for r in ok]
        summary.append(
            {
                "model": model,
                "images": len(ok),
                "failed": len(rs) - len(ok),
                "mean_outlier_fraction": sum(fr) / len(fr) if fr else math.nan,
                "images_with_outliers": sum(1 for r in ok if int(r["num_outliers"]) > 0),
                "max_norm": max((float(r["max_norm"]) for r in ok), default=math.nan),
                "median_norm": (
                    statistics.median(float(r["median_norm"]) for r in ok) if ok else math.nan
                ),
            }
        )
    return summary
