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
