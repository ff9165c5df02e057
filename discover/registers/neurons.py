"""The register-neuron file: which MLP units of a model make its outlier tokens.

A small JSON file (``format: regdiscover.register_neurons/1``) written by
:meth:`RegisterNeurons.save` and read by :meth:`RegisterNeurons.load`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from discover.errors import RegdiscoverError

FORMAT = "regdiscover.register_neurons/1"
"""The ``format`` field of a neuron JSON file."""


@dataclass
class RegisterNeurons:
    """Register neurons of one model, the settings that found them and how they scored.

    Attributes:
        neurons: ``(layer, index)`` of each selected MLP unit, best first (``index`` is a
            column of ``blocks[layer].mlp.fc1``'s output).
        scores: the mean outlier activation of each selected unit (same order).
        model: the model name the neurons belong to (``None`` when unknown).
        layer: the block whose output norms define the outliers (non-negative).
        threshold: the norm cutoff used (a token is an outlier when strictly above it).
        threshold_rule: ``"fixed"`` or a description of the automatic rule.
        top_k: how many units were asked for.
        max_layer: the last block whose units could be selected.
        sparsity: the activation a sparse unit stays below on most tokens.
        sparsity_fraction: the share of tokens a sparse unit must stay below it on.
        stats: counts and norm statistics of the run (see :func:`find_register_neurons`).
        images: descriptions of the images used (file names, sources), filled by the caller.
        notes: free text (how the file was made, caveats).
    """

    neurons: list[tuple[int, int]]
    scores: list[float] = field(default_factory=list)
    model: str | None = None
    layer: int = -1
    threshold: float = math.nan
    threshold_rule: str = "fixed"
    top_k: int = 0
    max_layer: int = -1
    sparsity: float = 0.5
    sparsity_fraction: float = 0.5
    stats: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    notes: str = ""

    def __post_init__(self) -> None:
        self.neurons = [(int(layer), int(index)) for layer, index in self.neurons]
        if any(layer < 0 or index < 0 for layer, index in self.neurons):
            raise RegdiscoverError(f"negative neuron coordinates in {self.neurons}")
        if len(set(self.neurons)) != len(self.neurons):
            raise RegdiscoverError("the neuron list holds duplicates")
        self.scores = [float(s) for s in self.scores]
        if self.scores and len(self.scores) != len(self.neurons):
            raise RegdiscoverError(
                f"{len(self.scores)} scores for {len(self.neurons)} neurons in the neuron list"
            )

    def by_layer(self) -> dict[int, list[int]]:
        """The selected unit indices grouped by block, blocks in increasing order."""
        out: dict[int, list[int]] = {}
        for layer, index in self.neurons:
            out.setdefault(layer, []).append(index)
        return dict(sorted(out.items()))

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready content of :meth:`save`."""
        return {
            "format": FORMAT,
            "model": self.model,
            "neurons": [[layer, index] for layer, index in self.neurons],
            "scores": [round(s, 6) for s in self.scores],
            "settings": {
                "layer": self.layer,
                "threshold": _json_float(self.threshold),
                "threshold_rule": self.threshold_rule,
                "top_k": self.top_k,
                "max_layer": self.max_layer,
                "sparsity": self.sparsity,
                "sparsity_fraction": self.sparsity_fraction,
            },
            "stats": _jsonable(self.stats),
            "images": list(self.images),
            "notes": self.notes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RegisterNeurons:
        """Inverse of :meth:`to_dict`; raises :class:`RegdiscoverError` on a bad layout."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RegdiscoverError(f"not a register-neuron file (expected format {FORMAT!r})")
        try:
            neurons = [(int(a), int(b)) for a, b in data["neurons"]]
            settings = data.get("settings", {})
            threshold = settings.get("threshold")
            return cls(
                neurons=neurons,
                scores=[float(s) for s in data.get("scores", [])],
                model=data.get("model"),
                layer=int(settings.get("layer", -1)),
                threshold=math.nan if threshold is None else float(threshold),
                threshold_rule=str(settings.get("threshold_rule", "fixed")),
                top_k=int(settings.get("top_k", len(neurons))),
                max_layer=int(settings.get("max_layer", -1)),
                sparsity=float(settings.get("sparsity", 0.5)),
                sparsity_fraction=float(settings.get("sparsity_fraction", 0.5)),
                stats=dict(data.get("stats", {})),
                images=[str(s) for s in data.get("images", [])],
                notes=str(data.get("notes", "")),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise RegdiscoverError(f"malformed register-neuron file: {err}") from err

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the neuron list as a small JSON file."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        # One line per innermost list of numbers (a neuron, the per-block ratios).
        text = _NUMBER_LIST.sub(lambda m: "[" + " ".join(m.group(1).split()) + "]", text)
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RegisterNeurons:
        """Read a file written by :meth:`save`."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as err:
            raise RegdiscoverError(f"cannot read the register-neuron file {path}: {err}") from err
        except ValueError as err:
            raise RegdiscoverError(f"{path} is not valid JSON: {err}") from err
        return cls.from_dict(data)


_NUMBER_LIST = re.compile(r"\[\s+([-+0-9.eE,\s]+?)\s+\]")


def _json_float(x: float) -> float | None:
    return None if not math.isfinite(x) else float(x)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return _json_float(round(obj, 6))
    if isinstance(obj, np.generic | torch.Tensor):
        return _jsonable(obj.item())
    return obj
