"""The method contract: what a discovery method is, takes, returns and declares.

A method is a pure function on one image's patch features::

    fn(feats, grid, *, exclude=None, <inputs it needs>, **params) -> result

- ``feats``: float ``[N, D]``, the ``N = h * w`` patch features in row-major grid order,
  [CLS] and registers removed;
- ``grid``: ``(h, w)``;
- ``exclude``: optional bool ``[N]`` (or ``[h, w]``) of patches removed from the graph
  (how :func:`discover.objects.discover_objects` finds several objects);
- the inputs named in :attr:`Method.needs`, among :data:`INPUTS` (e.g. the [CLS]
  attention), which the pipeline asks the backbone for;
- ``params``: the fields of the method's :class:`Params` dataclass.

The result has at least ``seed`` (flat index into the ``h * w`` grid), ``mask`` (bool
``[h, w]``, never holding an excluded patch), ``box`` (``(x0, y0, x1, y1)`` in patches,
end exclusive) and ``score`` (a float, higher is more object-like; each method says what
it means). A method raises :class:`EmptyGraphError` when nothing is left to discover and
never returns NaN.

Each method module ends with one :func:`register` call of its :class:`Method` record:
the function, its parameters dataclass (defaults and validation), what it needs from the
backbone, and its calibrated defaults per model family. The package imports the built-in
modules (``discover/methods/__init__.py``), so a new method is one file plus one line
there; a method defined elsewhere (a plug-in, a test) registers itself the same way.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

__all__ = [
    "DEFAULT_METHODS",
    "FEATURE_SETTINGS",
    "INPUTS",
    "EmptyGraphError",
    "Grid",
    "Method",
    "MethodResult",
    "Mask",
    "Params",
    "check_grid",
    "check_inputs",
    "default_method",
    "get_method",
    "measured_on_dinov2",
    "method_names",
    "register",
    "unregister",
]

Grid = tuple[int, int]
"""``(h, w)``: rows and columns of the patch grid."""
Mask = torch.Tensor | None
"""An optional bool ``[N]`` (or ``[h, w]``) patch mask, e.g. ``exclude``."""

INPUTS: dict[str, str] = {
    "cls_attention": "[heads, N] float: the last block's attention of the [CLS] token on "
    "the patches (the softmax over every token, restricted to the patch columns)",
}
"""What a method may ask the backbone for, besides the patch features."""

FEATURE_SETTINGS = ("features", "layer")
"""Keys of a family's defaults that choose the backbone's features, not a parameter."""


def measured_on_dinov2(**settings: Any) -> dict[str, dict[str, Any]]:
    """A method's defaults for the DINOv2 family as chosen on the development benchmark
    (README, "Calibration": offline DINOv2 ViT-S/14, the tune split, the one-standard-
    error rule), carried over to DINOv3, which was not measured (no hub weights here; the
    same training family, DINO + iBOT losses)."""
    return {"dinov2": dict(settings), "dinov3": dict(settings)}


class EmptyGraphError(ValueError):
    """Raised by a method when the graph has nothing left to discover."""


class MethodResult(Protocol):
    seed: int
    mask: torch.Tensor
    box: tuple[int, int, int, int]
    score: float


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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class Params:
    """Base class of a method's parameters: a frozen dataclass of options and defaults.

    The defaults are the published method's (the reference); a subclass checks its
    values in :meth:`validate` (called on construction) and raises ``ValueError``.
    """

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` for an out-of-range value (nothing to check here)."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def build(cls, values: Mapping[str, Any], method: str = "") -> Params:
        """The parameters from ``values`` (missing keys take their defaults).

        Raises:
            ValueError: an unknown key (``invalid options for <method>: ...``) or a
                value that :meth:`validate` refuses.
        """
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            known = ", ".join(cls.names()) or "none"
            label = f" for {method}" if method else ""
            raise ValueError(
                f"invalid options{label}: unknown parameter {', '.join(map(repr, unknown))} "
                f"(its parameters: {known})"
            )
        return cls(**values)

    @classmethod
    def parse(cls, key: str, text: str) -> Any:
        """Convert the text of a command-line ``KEY=VALUE`` to the field's type.

        Booleans accept 1/0, true/false, yes/no, on/off; a ``float | str`` field takes a
        number when the text is one and the text otherwise.
        """
        hints = typing.get_type_hints(cls)
        if key not in hints:
            raise ValueError(
                f"unknown parameter {key!r} (its parameters: {', '.join(cls.names())})"
            )
        kinds = _kinds(hints[key])
        t = text.strip()
        if bool in kinds:
            if t.lower() in _TRUE:
                return True
            if t.lower() in _FALSE:
                return False
            raise ValueError(f"{key} must be true or false, got {text!r}")
        if int in kinds:
            try:
                return int(t)
            except ValueError:
                if float not in kinds and str not in kinds:
                    raise ValueError(f"{key} must be an integer, got {text!r}") from None
        if float in kinds:
            try:
                value = float(t)
            except ValueError:
                if str not in kinds:
                    raise ValueError(f"{key} must be a number, got {text!r}") from None
            else:
                if not math.isfinite(value):
                    raise ValueError(f"{key} must be finite, got {text!r}")
                return value
        return t

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def _kinds(hint: Any) -> tuple[type, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(a for a in typing.get_args(hint) if isinstance(a, type))
    return (hint,) if isinstance(hint, type) else (str,)


@dataclass(frozen=True)
class Method:
    """A registered discovery method.

    Attributes:
        name: the name users pass (``--method NAME``).
        fn: the pure function (see the module docstring).
        params: its :class:`Params` dataclass.
        needs: inputs from :data:`INPUTS` the function takes besides the features.
        defaults: calibrated defaults per model family (``{"dinov2": {"features": "queries"}}``),
            applied key by key; besides parameters they may set :data:`FEATURE_SETTINGS`
            (the feature kind and block the backbone returns for this method).
        summary: one line for listings.
    """

    name: str
    fn: Callable[..., Any]
    params: type[Params]
    needs: frozenset[str] = frozenset()
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    summary: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.needs) - set(INPUTS)
        if unknown:
            raise ValueError(f"method {self.name!r} needs unknown inputs {sorted(unknown)}")
        allowed = set(self.params.names()) | set(FEATURE_SETTINGS)
        for family, values in self.defaults.items():
            bad = set(values) - allowed
            if bad:
                raise ValueError(f"{self.name} defaults for {family}: unknown keys {sorted(bad)}")

    def family_defaults(self, family: str) -> dict[str, Any]:
        """The calibrated defaults for ``family`` (parameters and feature settings)."""
        return dict(self.defaults.get(family, {}))

    def resolve(self, family: str, given: Mapping[str, Any]) -> tuple[Params, dict[str, Any]]:
        """``(params, feature settings)`` for a model of ``family``.

        Each key takes, in this order of preference: the caller's value (``None`` and
        ``"auto"`` mean "not given"), the family's calibrated default, the reference
        default. Feature settings (``features``, ``layer``) come back separately, holding
        only what the family's defaults set.
        """
        chosen = {k: v for k, v in self.family_defaults(family).items()}
        for k, v in given.items():
            if v is None or (isinstance(v, str) and v.strip().lower() == "auto"):
                continue
            chosen[k] = v
        feature = {k: chosen.pop(k) for k in FEATURE_SETTINGS if k in chosen}
        return self.params.build(chosen, self.name), feature

    def __call__(
        self,
        feats: torch.Tensor,
        grid: tuple[int, int],
        params: Params | None = None,
        *,
        exclude: torch.Tensor | None = None,
        **inputs: Any,
    ) -> Any:
        """Run the method with ``params`` (default: the reference's) and its inputs."""
        missing = [k for k in self.needs if inputs.get(k) is None]
        if missing:
            raise ValueError(f"method {self.name} needs {', '.join(missing)}")
        p = params if params is not None else self.params()
        extra = {k: inputs[k] for k in self.needs}
        return self.fn(feats, grid, exclude=exclude, **extra, **p.as_dict())


_REGISTRY: dict[str, Method] = {}


def register(method: Method, *, replace: bool = False) -> Method:
    """Add ``method`` to the registry (a name is taken once unless ``replace``)."""
    if method.name in _REGISTRY and not replace and _REGISTRY[method.name] is not method:
        raise ValueError(f"a method named {method.name!r} is registered already")
    _REGISTRY[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method from the registry (for plug-ins and tests)."""
    _REGISTRY.pop(name, None)


def get_method(name: str) -> Method:
    """The method registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown method {name!r}; choose one of: {known}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


DEFAULT_METHODS: dict[str, str] = {"dinov2": "tokencut", "dinov3": "tokencut"}
"""The default method per model family, where calibration chose one (README,
"Calibration": measured on DINOv2, carried over to DINOv3); else LOST, as the LOST paper
ran DINO."""


def default_method(family: str) -> str:
    """The method ``discover boxes`` uses for a model of ``family`` when none is given."""
    return DEFAULT_METHODS.get(family, "lost")
