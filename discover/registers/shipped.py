"""The register-neuron files shipped with the package (``discover/data/<model>.json``),
which ``--test-time-registers auto`` loads."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from discover.errors import RegdiscoverError
from discover.registers.neurons import RegisterNeurons

__all__ = ["resolve_neurons", "shipped_neurons_path"]


def shipped_neurons_path(model_name: str) -> Path | None:
    """The neuron file shipped for ``model_name`` (``discover/data/<name>.json``), if any."""
    res = importlib.resources.files("discover").joinpath("data", f"{model_name}.json")
    return Path(str(res)) if res.is_file() else None


def resolve_neurons(
    spec: str | os.PathLike[str] | RegisterNeurons, name: str | None
) -> RegisterNeurons:
    """``spec`` as a :class:`RegisterNeurons`: itself, ``"auto"`` (the file shipped for
    the model ``name``) or the path of a neuron file."""
    if isinstance(spec, RegisterNeurons):
        return spec
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        path = shipped_neurons_path(name) if name else None
        if path is None:
            raise RegdiscoverError(
                f"no register-neuron file ships for model {name!r}: compute one with "
                "discover.registers.find_register_neurons(...).save(FILE) on a few images "
                "and pass that FILE instead of 'auto'"
            )
        return RegisterNeurons.load(path)
    return RegisterNeurons.load(spec)
