"""Several objects per image, on top of any registered discovery method.

:func:`discover_objects` runs a method (LOST, TokenCut, ...) repeatedly on one image:
after each object, the patches of its mask are excluded from the graph and the method
is run again on what is left. It stops after ``max_objects`` searches, or when the
method raises :class:`~discover.methods.base.EmptyGraphError` (nothing left to cut).
Objects scoring below ``min_score`` are dropped (their patches still leave the graph, so
the search goes on past them). Boxes overlapping a better-scored box (IoU strictly above
``iou_threshold``) are then suppressed, and the survivors are returned by decreasing
score.

What the scores mean. Every object's ``score`` is the method's own ``score`` on the
graph it was found in: the whole image for the first object, the remaining patches for
the next ones.

- TokenCut: ``1 - lambda_2`` of the normalized Laplacian of the remaining graph, in
  ``(-0.5, 1]``; near 1 when a group of patches is cut off cleanly from the rest.
- LOST: ``share * contrast`` of the seed set's similarity (see :func:`discover.methods.lost.lost`),
  about 2 for a compact object against a uniform background, below 0.5 on noise, 0 when
  the mask covers every remaining patch.

Both are scale-free, so they can be compared between the steps of one image, but only
roughly: each is measured relative to the graph that was left (removing a strong object
changes the spread of the similarities LOST normalizes by, and the normalized cut of a
smaller graph), so a later object can outscore the first one. The scores of different
methods are on different scales and must not be compared; choose ``min_score`` per
method.

Order. Results are sorted by score, highest first; equal scores keep the order in which
the objects were found (``step``). The first object found (``step == 0``, the plain
method's answer) is therefore not always first in the list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from discover.boxes import suppress
from discover.methods.base import EmptyGraphError, Method, Params, get_method

__all__ = ["ObjectDetection", "discover_objects"]


@dataclass(frozen=True, eq=False)
class ObjectDetection:
    """One object found by :func:`discover_objects`.

    Attributes:
        box: ``(x0, y0, x1, y1)`` in patch units, end exclusive.
        score: the method's score for this object (see the module docstring).
        seed: flat index of the object's seed patch in the full ``h*w`` grid.
        mask: bool ``[h, w]``, the object's patches.
        result: the method's raw result object (e.g. a ``LostResult``).
        step: 0 for the first object found (the plain method's answer), 1 for the object
            found once the first was excluded, and so on.
    """

    box: tuple[int, int, int, int]
    score: float
    seed: int
    mask: Tensor
    result: Any
    step: int


def check_object_options(max_objects: int, min_score: float | None, iou_threshold: float) -> None:
    """Raise ``ValueError`` for a bad ``max_objects``, ``min_score`` or ``iou_threshold``."""
    if isinstance(max_objects, bool) or int(max_objects) != max_objects or max_objects < 1:
        raise ValueError(f"max_objects must be an integer >= 1, got {max_objects!r}")
    if min_score is not None and math.isnan(float(min_score)):
        raise ValueError("min_score must be a number or None, got NaN")
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold!r}")


def discover_objects(
    feats: Tensor,
    grid: tuple[int, int],
    *,
    method: str | Method = "lost",
    max_objects: int = 1,
    min_score: float | None = None,
    iou_threshold: float = 0.5,
    inputs: dict[str, Any] | None = None,
    **params: Any,
) -> list[ObjectDetection]:
    """Find up to ``max_objects`` objects in one image with a registered method.

    Args:
        feats: ``[N, D]`` patch features (row-major, [CLS] and registers removed).
        grid: ``(h, w)`` patch grid, ``h * w == N``.
        method: a registered method or its name (``discover.methods.method_names()``).
        max_objects: at most this many searches (>= 1), so at most this many objects.
            With 1 the result is the plain method's answer (unless ``min_score`` drops it).
        min_score: objects scoring below it are dropped from the result; their patches
            are still removed from the graph and the search goes on with the next object.
            It applies to the first object too, so an image with no convincing object
            gives ``[]``. ``None`` keeps every object found.
        iou_threshold: a box is suppressed when its IoU with a better-scored kept box is
            strictly greater than this (greedy NMS, :func:`discover.boxes.suppress`).
        inputs: what the method needs besides the features (``cls_attention``...).
        **params: the method's parameters (e.g. ``k_patches`` for LOST, ``tau`` for
            TokenCut), or ``params=`` an instance of its :class:`Params`. An ``exclude``
            here removes those patches from every search.

    Returns:
        The kept objects, by decreasing score (ties in discovery order).

    Raises:
        ValueError: bad arguments, or an unknown method.
        EmptyGraphError: the very first search found nothing (as the plain method);
            later ones only end the search.
        RuntimeError: the method returned a mask with excluded patches (a method bug).
    """
    m = method if isinstance(method, Method) else get_method(method)
    check_object_options(max_objects, min_score, iou_threshold)
    h, w = (int(v) for v in grid)
    n = h * w

    user_exclude = params.pop("exclude", None)
    given = params.pop("params", None)
    chosen = given if isinstance(given, Params) else m.params.build(params, m.name)
    extra = inputs or {}
    excluded = torch.zeros(n, dtype=torch.bool, device=feats.device)
    if user_exclude is not None:
        user_exclude = torch.as_tensor(user_exclude, device=feats.device)
        if user_exclude.dtype != torch.bool or user_exclude.numel() != n:
            raise ValueError(
                f"exclude must be a bool tensor with {n} elements, "
                f"got {user_exclude.dtype} of shape {tuple(user_exclude.shape)}"
            )
        user_exclude = user_exclude.reshape(n)
        excluded = user_exclude.clone()

    found: list[ObjectDetection] = []
    for step in range(int(max_objects)):
        # The first search gets exactly what the caller gave, so max_objects=1 is the
        # plain method call.
        exclude = user_exclude if step == 0 else excluded.clone()
        try:
            res = m(feats, grid, chosen, exclude=exclude, **extra)
        except EmptyGraphError:
            if step == 0:
                raise
            break
        score = float(res.score)
        mask = res.mask
        flat = mask.reshape(n).to(excluded.device)
        if bool((flat & excluded).any()):
            raise RuntimeError(f"method {m.name!r} returned a mask with excluded patches")
        excluded = excluded | flat
        if min_score is not None and score < min_score:
            continue
        found.append(
            ObjectDetection(
                box=tuple(int(v) for v in res.box),
                score=score,
                seed=int(res.seed),
                mask=mask,
                result=res,
                step=step,
            )
        )

    if len(found) <= 1:
        return found
    boxes = torch.tensor([d.box for d in found], dtype=torch.float64)
    scores = torch.tensor([d.score for d in found], dtype=torch.float64)
    return [found[i] for i in suppress(boxes, scores, iou_threshold)]
