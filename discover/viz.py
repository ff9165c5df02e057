"""Pictures of what was found: the only module that draws.

:func:`draw_result` overlays, on the original image, the seed-expansion mask (tinted),
the seed patch (filled square) and each box (rectangle with its score), the way the
LOST paper shows its predictions; :func:`draw_boxes` draws the boxes of an output record
(the report's thumbnails and figures).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch

# BGR-free: we draw on RGB arrays, so colours are RGB.
_COLOURS = [(255, 64, 64), (64, 160, 255), (64, 220, 64), (255, 200, 0), (220, 64, 255)]


def draw_result(image: np.ndarray, result: object, *, alpha: float = 0.45) -> np.ndarray:
    """Return an RGB uint8 copy of ``image`` with the result's detections drawn.

    ``result`` is a :class:`discover.pipeline.ImageResult`; ``image`` is the original
    picture or any resized copy of it (e.g. the network input): boxes and masks are
    scaled to ``image``'s size.
    """
    out = np.ascontiguousarray(image.copy())
    H, W = out.shape[:2]
    dets = list(getattr(result, "detections", []))
    p = result.patch_size or 1
    fx = W / (result.width or W)
    fy = H / (result.height or H)
    sx, sy = result.scale[0] * fx, result.scale[1] * fy
    for i, det in reversed(list(enumerate(dets))):
        colour = _COLOURS[i % len(_COLOURS)]
        mask = _mask_to_pixels(det.mask, p, sx, sy, (H, W))
        if mask.any():
            tint = np.zeros_like(out)
            tint[:] = colour
            blend = cv2.addWeighted(out, 1 - alpha, tint, alpha, 0)
            out[mask] = blend[mask]
        r, c = det.seed
        s0 = (int(round(c * p * sx)), int(round(r * p * sy)))
        s1 = (int(round((c + 1) * p * sx)) - 1, int(round((r + 1) * p * sy)) - 1)
        cv2.rectangle(out, s0, s1, (255, 255, 0), thickness=-1)
    _draw_boxes(out, [d.box for d in dets], [d.score for d in dets], fx, fy)
    return out


def draw_boxes(
    image: np.ndarray,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float | None],
    *,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Return an RGB uint8 copy of ``image`` with ``boxes`` and their ``scores`` drawn.

    What the report shows for an output record (which has no mask or seed patch): each
    box ``(x0, y0, x1, y1)``, end exclusive, in the pixels of an image of ``size`` =
    ``(width, height)`` (default: ``image``'s own), scaled to ``image``, e.g. a thumbnail.
    Colours and labels are those of :func:`draw_result`; a ``None`` or NaN score has no label.
    """
    out = np.ascontiguousarray(image.copy())
    H, W = out.shape[:2]
    width, height = size if size is not None else (W, H)
    _draw_boxes(out, boxes, scores, W / (width or W), H / (height or H))
    return out


def _draw_boxes(
    out: np.ndarray,
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float | None],
    fx: float,
    fy: float,
    colour: tuple[int, int, int] | None = None,
) -> None:
    """Draw ``boxes`` (scaled by ``fx``, ``fy``) in ``colour``, else one colour each."""
    H, W = out.shape[:2]
    thick = max(2, round(max(H, W) / 300))
    for i, (box, score) in enumerate(zip(boxes, scores, strict=True)):
        colour_i = colour or _COLOURS[i % len(_COLOURS)]
        x0, y0 = int(round(box[0] * fx)), int(round(box[1] * fy))
        x1, y1 = int(round(box[2] * fx)), int(round(box[3] * fy))
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour_i, thick)
        if score is None or not np.isfinite(score):
            continue
        label = f"{score:.2f}"
        scale = max(0.4, max(H, W) / 900)
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(th + 2, y0)
        cv2.rectangle(out, (x0, ty - th - 4), (x0 + tw + 4, ty), colour_i, -1)
        cv2.putText(out, label, (x0 + 2, ty - 3), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1)


def _mask_to_pixels(
    mask: torch.Tensor | np.ndarray, patch: int, sx: float, sy: float, shape: Sequence[int]
) -> np.ndarray:
    m = np.asarray(mask.cpu() if isinstance(mask, torch.Tensor) else mask, dtype=np.uint8)
    H, W = shape
    gh, gw = m.shape
    # Patch grid -> network-input pixels -> original pixels, nearest neighbour.
    size = (max(1, int(round(gw * patch * sx))), max(1, int(round(gh * patch * sy))))
    # interpolation must be a keyword: cv2.resize's third positional argument is ``dst``.
    big = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
    full = np.zeros((H, W), dtype=bool)
    hh, ww = min(H, big.shape[0]), min(W, big.shape[1])
    full[:hh, :ww] = big[:hh, :ww] > 0
    return full


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """An RGB uint8 array as JPEG bytes (for the report's thumbnails and figures)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])  # fmt: skip
    if not ok:
        raise ValueError(f"cannot encode a {rgb.shape} array as JPEG")
    return buf.tobytes()


def save_png(path: str | os.PathLike[str], rgb: np.ndarray) -> None:
    """Write an RGB uint8 array as a PNG (creates the folder)."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    if not cv2.imwrite(os.fspath(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


# -- inspection figures (``discover inspect``) --------------------------------------------
INSPECT_PAD = 8
"""Pixels around and between the panels of an inspection figure."""
INSPECT_HEADER = 24
"""Height of the strip above each model's row (model name and its numbers)."""
INSPECT_TITLE = 20
"""Height of the title strip above each panel."""
INSPECT_PANELS = 4
"""Panels per row: image, token norms, [CLS] attention, LOST degree."""
_BACKGROUND = (24, 24, 24)
_TEXT = (235, 235, 235)


@dataclass(eq=False)
class InspectionRow:
    """What one model shows of one image in an inspection figure.

    Maps are at patch resolution (``[h, w]`` numpy arrays or tensors) and cover the padded
    network input; ``image`` is the network input before padding, so patch ``(r, c)`` covers
    its pixels ``[r*p, (r+1)*p) x [c*p, (c+1)*p)``.
    """

    label: str
    """Row header, e.g. the model name."""
    image: np.ndarray
    """RGB uint8 ``[H, W, 3]``, the network input."""
    patch_size: int
    norms: np.ndarray | torch.Tensor
    """float ``[h, w]`` patch-token norms (drawn on the figure's shared scale)."""
    outliers: np.ndarray | torch.Tensor
    """bool ``[h, w]``, outlined in red on the norm map."""
    attention: np.ndarray | torch.Tensor
    """float ``[h, w]`` [CLS] attention map (drawn from 0 to its own maximum)."""
    degree: np.ndarray | torch.Tensor | None = None
    """float ``[h, w]`` LOST degree map; ``None`` when LOST did not run."""
    seed: tuple[int, int] | None = None
    """``(row, col)`` of LOST's seed (filled yellow square)."""
    box: tuple[int, int, int, int] | None = None
    """LOST box ``(x0, y0, x1, y1)`` in patches, end exclusive (red rectangle)."""
    mask: np.ndarray | torch.Tensor | None = None
    """bool ``[h, w]`` LOST mask (green outline)."""
    expansion: np.ndarray | torch.Tensor | None = None
    """bool ``[h, w]`` LOST's expanded seed set (cyan dots)."""
    info: str = ""
    """Text after the label in the row header."""
    attention_title: str = "[CLS] attn"
    lost_title: str = "LOST degree"


def inspection_panel_shape(image_hw: tuple[int, int], panel_size: int = 320) -> tuple[int, int]:
    """``(height, width)`` of one panel: the image scaled so its longer side is ``panel_size``."""
    h, w = int(image_hw[0]), int(image_hw[1])
    if h < 1 or w < 1 or panel_size < 1:
        raise ValueError(f"bad image size {image_hw} or panel size {panel_size}")
    s = panel_size / max(h, w)
    return max(1, int(round(h * s))), max(1, int(round(w * s)))


def inspection_figure_size(
    image_hw: tuple[int, int], n_rows: int, panel_size: int = 320
) -> tuple[int, int]:
    """``(height, width)`` in pixels of :func:`draw_inspection`'s figure.

    With ``(ph, pw)`` from :func:`inspection_panel_shape`::

        height = PAD + n_rows * (HEADER + TITLE + ph + PAD)
        width  = PAD + 4 * (pw + PAD)
    """
    ph, pw = inspection_panel_shape(image_hw, panel_size)
    height = INSPECT_PAD + n_rows * (INSPECT_HEADER + INSPECT_TITLE + ph + INSPECT_PAD)
    width = INSPECT_PAD + INSPECT_PANELS * (pw + INSPECT_PAD)
    return height, width


def colorize(
    values: np.ndarray | torch.Tensor,
    vmin: float,
    vmax: float,
    colormap: int = cv2.COLORMAP_VIRIDIS,
) -> np.ndarray:
    """Map a 2-D array to RGB uint8 with an OpenCV colormap; ``vmin``/``vmax`` are the ends."""
    v = _as_numpy(values).astype(np.float64)
    span = float(vmax) - float(vmin)
    if span > 0 and np.isfinite(span):
        u = np.clip((v - float(vmin)) / span, 0.0, 1.0)
    else:
        u = np.zeros_like(v)
    u8 = np.rint(np.nan_to_num(u) * 255.0).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, colormap), cv2.COLOR_BGR2RGB)


def draw_inspection(
    rows: Sequence[InspectionRow],
    *,
    panel_size: int = 320,
    norm_range: tuple[float, float] | None = None,
) -> np.ndarray:
    """The inspection figure of one image: one row per model, four panels per row.

    Panels: the image; the patch-token norm map (viridis, outliers outlined in red) on a
    colour scale shared by all rows, ``norm_range`` or ``0`` to the largest patch norm of
    any row, written in the panel title (``norm 0-412``); the [CLS] attention map (inferno,
    ``0`` to its maximum); LOST's degree map (bone, lowest to highest degree) with the
    expanded seed set (cyan dots), the mask (green outline), the seed (yellow square) and the
    box (red). The figure size is :func:`inspection_figure_size` of the first row's image.

    Returns:
        RGB uint8 ``[height, width, 3]``.
    """
    if not rows:
        raise ValueError("nothing to draw: no rows")
    ph, pw = inspection_panel_shape(rows[0].image.shape[:2], panel_size)
    height, width = inspection_figure_size(rows[0].image.shape[:2], len(rows), panel_size)
    fig = np.empty((height, width, 3), dtype=np.uint8)
    fig[:] = _BACKGROUND
    if norm_range is None:
        vmax = max(float(np.max(_as_numpy(r.norms))) for r in rows)
        norm_range = (0.0, vmax)
    n0, n1 = float(norm_range[0]), float(norm_range[1])
    y = INSPECT_PAD
    for row in rows:
        text = row.label + (f"   {row.info}" if row.info else "")
        _put_text(fig, text, INSPECT_PAD, y, width - 2 * INSPECT_PAD, INSPECT_HEADER, 0.5)
        y += INSPECT_HEADER
        panels = _inspection_panels(row, (ph, pw), (n0, n1))
        x = INSPECT_PAD
        for title, panel in panels:
            _put_text(fig, title, x, y, pw, INSPECT_TITLE, 0.42)
            fig[y + INSPECT_TITLE : y + INSPECT_TITLE + ph, x : x + pw] = panel
            x += pw + INSPECT_PAD
        y += INSPECT_TITLE + ph + INSPECT_PAD
    return fig


def _inspection_panels(
    row: InspectionRow, shape: tuple[int, int], norm_range: tuple[float, float]
) -> list[tuple[str, np.ndarray]]:
    ph, pw = shape
    img = row.image
    H, W = img.shape[:2]
    p = int(row.patch_size)
    image_panel = cv2.resize(img, (pw, ph), interpolation=cv2.INTER_AREA)
    geo = (p, (H, W), (ph, pw))

    norms = _as_numpy(row.norms).astype(np.float64)
    norm_panel = _grid_panel(colorize(norms, *norm_range, cv2.COLORMAP_VIRIDIS), *geo)
    outliers = _as_numpy(row.outliers).astype(bool)
    for r, c in zip(*np.nonzero(outliers), strict=True):
        (x0, y0), (x1, y1) = _cell(int(r), int(c), *geo)
        cv2.rectangle(norm_panel, (x0, y0), (x1, y1), (255, 0, 0), 1)
    n_out = int(outliers.sum())
    norm_title = f"norm {norm_range[0]:.0f}-{norm_range[1]:.0f}, {n_out} outlier(s)"

    att = _as_numpy(row.attention).astype(np.float64)
    amax = float(att.max()) if att.size else 0.0
    att_panel = _grid_panel(colorize(att, 0.0, amax, cv2.COLORMAP_INFERNO), *geo)
    att_title = f"{row.attention_title} 0-{amax:.3g}"

    if row.degree is None:
        lost_panel = np.zeros((ph, pw, 3), dtype=np.uint8)
        lost_title = f"{row.lost_title}: none"
    else:
        deg = _as_numpy(row.degree).astype(np.float64)
        d0, d1 = float(deg.min()), float(deg.max())
        lost_panel = _grid_panel(colorize(deg, d0, d1, cv2.COLORMAP_BONE), *geo)
        if row.mask is not None:
            m = _as_numpy(row.mask).astype(np.uint8)
            big = _grid_panel(m[:, :, None].repeat(3, axis=2), *geo)[:, :, 0]
            contours, _ = cv2.findContours(big, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(lost_panel, contours, -1, (0, 220, 0), 1)
        if row.expansion is not None:
            for r, c in zip(*np.nonzero(_as_numpy(row.expansion)), strict=True):
                (x0, y0), (x1, y1) = _cell(int(r), int(c), *geo)
                rad = max(1, min(x1 - x0, y1 - y0) // 5)
                cv2.circle(lost_panel, ((x0 + x1) // 2, (y0 + y1) // 2), rad, (0, 255, 255), -1)
        if row.seed is not None:
            (x0, y0), (x1, y1) = _cell(int(row.seed[0]), int(row.seed[1]), *geo)
            cv2.rectangle(lost_panel, (x0, y0), (x1, y1), (255, 255, 0), -1)
        if row.box is not None:
            bx0, by0, bx1, by1 = (int(v) for v in row.box)
            (x0, y0), _ = _cell(by0, bx0, *geo)
            _, (x1, y1) = _cell(by1 - 1, bx1 - 1, *geo)
            cv2.rectangle(lost_panel, (x0, y0), (x1, y1), (255, 40, 40), 2)
        lost_title = f"{row.lost_title} {d0:.0f}-{d1:.0f}"
    return [
        (f"image {W}x{H}", image_panel),
        (norm_title, norm_panel),
        (att_title, att_panel),
        (lost_title, lost_panel),
    ]


def _grid_panel(
    grid_rgb: np.ndarray, patch: int, input_hw: tuple[int, int], panel_hw: tuple[int, int]
) -> np.ndarray:
    """Nearest-neighbour map from a patch-grid image to a panel showing the network input."""
    gh, gw = grid_rgb.shape[:2]
    (H, W), (ph, pw) = input_hw, panel_hw
    rows = np.minimum(((np.arange(ph) + 0.5) * H / ph // patch).astype(np.int64), gh - 1)
    cols = np.minimum(((np.arange(pw) + 0.5) * W / pw // patch).astype(np.int64), gw - 1)
    return np.ascontiguousarray(grid_rgb[rows][:, cols])


def _cell(
    r: int, c: int, patch: int, input_hw: tuple[int, int], panel_hw: tuple[int, int]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive panel-pixel corners of patch ``(r, c)``, clipped to the panel."""
    (H, W), (ph, pw) = input_hw, panel_hw
    sy, sx = ph / H, pw / W
    x0 = min(pw - 1, int(np.floor(c * patch * sx)))
    y0 = min(ph - 1, int(np.floor(r * patch * sy)))
    x1 = min(pw - 1, max(x0, int(np.ceil((c + 1) * patch * sx)) - 1))
    y1 = min(ph - 1, max(y0, int(np.ceil((r + 1) * patch * sy)) - 1))
    return (x0, y0), (x1, y1)


def _put_text(
    canvas: np.ndarray, text: str, x: int, y: int, width: int, height: int, scale: float
) -> None:
    """Write ``text`` in the box ``(x, y, width, height)``, shrunk or cut to fit."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    tw, th = cv2.getTextSize(text, font, scale, 1)[0]
    while tw > width - 4 and scale > 0.3:
        scale = max(0.3, scale - 0.04)
        tw, th = cv2.getTextSize(text, font, scale, 1)[0]
    while tw > width - 4 and len(text) > 1:
        text = text[:-2] + "~"
        tw, th = cv2.getTextSize(text, font, scale, 1)[0]
    sub = canvas[y : y + height, x : x + width]
    baseline = (height + th) // 2
    cv2.putText(sub, text, (2, baseline), font, scale, _TEXT, 1, cv2.LINE_AA)


def _as_numpy(a: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().float().numpy() if a.is_floating_point() else a.cpu().numpy()
    return np.asarray(a)


GROUND_TRUTH_COLOUR = (64, 220, 64)
"""Green: the annotated boxes in :func:`gallery`."""
PREDICTION_COLOUR = (255, 64, 64)
"""Red: the predicted box in :func:`gallery`."""


@dataclass(frozen=True)
class GalleryItem:
    """One tile of :func:`gallery`: an RGB image, its annotated boxes, the predicted box
    (``None``: the method found none) in the image's pixels, end exclusive, and a caption."""

    image: np.ndarray
    truth: Sequence[Sequence[float]]
    predicted: Sequence[float] | None
    caption: str = ""


def gallery(items: Sequence[GalleryItem], *, columns: int = 4, tile: int = 320) -> np.ndarray:
    """An RGB uint8 grid of ``items``, each fitted in a ``tile``-pixel square: annotated
    boxes in green, the prediction in red, the caption on a dark strip at the bottom.

    Raises:
        ValueError: no item, or ``columns`` / ``tile`` below 1.
    """
    if not items or columns < 1 or tile < 1:
        raise ValueError("gallery needs at least one item, columns >= 1 and tile >= 1")
    rows = (len(items) + columns - 1) // columns
    sheet = np.full((rows * tile, min(columns, len(items)) * tile, 3), 255, np.uint8)
    for i, item in enumerate(items):
        h, w = item.image.shape[:2]
        f = tile / max(h, w)
        size = (max(1, round(w * f)), max(1, round(h * f)))
        small = cv2.resize(np.ascontiguousarray(item.image), size, interpolation=cv2.INTER_AREA)
        truth = list(item.truth)
        _draw_boxes(small, truth, [None] * len(truth), f, f, GROUND_TRUTH_COLOUR)
        if item.predicted is not None:
            _draw_boxes(small, [item.predicted], [None], f, f, PREDICTION_COLOUR)
        if item.caption:
            cv2.rectangle(small, (0, size[1] - 18), (size[0], size[1]), (0, 0, 0), -1)
            cv2.putText(small, item.caption, (4, size[1] - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                        (255, 255, 255), 1, cv2.LINE_AA)  # fmt: skip
        r, c = divmod(i, columns)
        sheet[r * tile : r * tile + size[1], c * tile : c * tile + size[0]] = small
    return sheet
