"""The method registry: every discovery method is a pure function on one image's
patch features.

Contract (see DESIGN.md): a method is ``fn(feats, grid, *, exclude=None, **params)``
where ``feats`` is a float tensor ``[N, D]`` (N = h*w patch features, row-major,
[CLS] and registers removed), ``grid`` is ``(h, w)`` and ``exclude`` is an optional
bool tensor ``[N]`` of patches removed from the graph (used to find several objects).
It returns a result object with at least:

- ``seed``: int, flat index into the full ``h*w`` grid;
- ``mask``: bool tensor ``[h, w]`` (the kept connected component, never touching an
  excluded patch);
- ``box``: ``(x0, y0, x1, y1)`` ints in patch units, end exclusive;
- ``score``: float confidence, higher means more object-like (each method documents
  what it means).

Methods raise :class:`EmptyGraphError` when nothing is left to search (every patch
excluded, or a degenerate graph), never return NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch


class EmptyGraphError(ValueError):
    """Raised by a method when the graph has nothing left to discover."""


class MethodResult(Protocol):
    seed: int
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float


MethodFn = Callable[..., Any]


def check_grid(n: int, grid: tuple[int, int], what: str = "feats") -> tuple[int, int]:
    """``(h, w)`` of ``grid`` as ints, checked positive and holding exactly ``n`` patches."""
    if len(grid) != 2:
        raise ValueError(f"grid must be (h, w), got {grid!r}")
    h, w = (int(v) for v in grid)
    if h <= 0 or w <= 0:
        raise ValueError(f"grid must be positive (h, w), got {grid!r}")
    if h * w != n:
        raise ValueError(
            f"{what} has {n} rows (patches) but grid {h}x{w} has {h * w}; pass "
            "grid=(rows, cols) of the patch grid, with [CLS] and register tokens removed"
        )
    return h, w


def check_inputs(
    feats: torch.Tensor, grid: tuple[int, int], exclude: torch.Tensor | None
) -> tuple[int, int, torch.Tensor | None]:
    """Validate a method's inputs (the contract above).

    Returns ``(h, w, exclude)`` with ``exclude`` flattened to bool ``[N]`` on
    ``feats.device`` (``[N]`` and ``[h, w]`` are accepted), or ``None``.

    Raises:
        ValueError: ``feats`` not 2-D, a grid that does not hold ``N`` patches, or an
            ``exclude`` that is not a bool tensor of ``N`` elements.
    """
    if feats.ndim != 2:
        raise ValueError(f"feats must be 2-D [N, D], got shape {tuple(feats.shape)}")
    h, w = check_grid(feats.shape[0], grid)
    if exclude is None:
        return h, w, None
    exclude = torch.as_tensor(exclude)
    if exclude.dtype != torch.bool or exclude.numel() != h * w:
        raise ValueError(
            f"exclude must be a bool tensor with {h * w} elements, "
            f"got {exclude.dtype} of shape {tuple(exclude.shape)}"
        )
    return h, w, exclude.reshape(-1).to(feats.device)


_REGISTRY: dict[str, MethodFn] = {}


def register_method(name: str) -> Callable[[MethodFn], MethodFn]:
    """Decorator adding a method function to the registry under ``name``."""

    def deco(fn: MethodFn) -> MethodFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def get_method(name: str) -> MethodFn:
    """Return the method function registered as ``name`` (imports the built-ins)."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown method {name!r}; choose one of: {known}") from None


def method_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def _load_builtins() -> None:
    # Importing the modules registers their methods.
    from discover import lost  # noqa: F401

    try:
        from discover import tokencut  # noqa: F401
    except ImportError:  # pragma: no cover - during development only
        pass
