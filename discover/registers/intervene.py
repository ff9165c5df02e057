"""The intervention (step 2 of test-time registers): extra tokens that take over the
register neurons' activations. See :mod:`discover.registers`."""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from discover.errors import RegdiscoverError
from discover.registers.model import (
    ACTIVE,
    check_model,
    hidden_units,
    model_device,
    model_name,
    rotary_attentions,
    split_backbone,
)
from discover.registers.neurons import RegisterNeurons
from discover.registers.shipped import resolve_neurons

__all__ = ["TestTimeRegisters", "attach_test_time_registers"]


class TestTimeRegisters:
    """Test-time registers attached to a model; :meth:`detach` (or leaving a ``with``) removes them.

    Made by :func:`attach_test_time_registers`. Attributes: ``neurons``
    (:class:`RegisterNeurons`), ``num_registers``, ``position`` (index of the first added
    token: the model's own prefix length), ``model``, ``backbone`` (or ``None``).
    """

    __test__ = False  # not a pytest test class

    def __init__(
        self, backbone_or_model: nn.Module, neurons: RegisterNeurons, num_registers: int = 1
    ) -> None:
        if num_registers < 1:
            raise ValueError(f"num_registers must be >= 1, got {num_registers}")
        model, backbone = split_backbone(backbone_or_model)
        check_model(model)
        if model in ACTIVE:
            raise RegdiscoverError("this model already has test-time registers attached")
        depth = len(model.blocks)
        for layer, index in neurons.neurons:
            if layer >= depth or index >= hidden_units(model, layer):
                raise RegdiscoverError(
                    f"register neuron ({layer}, {index}) does not exist in this model "
                    f"({depth} blocks of {hidden_units(model, min(layer, depth - 1))} units): "
                    "was the neuron file computed for another model?"
                )
        name = getattr(backbone, "name", None) if backbone is not None else model_name(model)
        if neurons.model and name and neurons.model != name:
            warnings.warn(
                f"register neurons computed for {neurons.model!r} attached to {name!r}",
                stacklevel=3,
            )
        self.model = model
        self.backbone = backbone
        self.neurons = neurons
        self.num_registers = int(num_registers)
        self.position = (
            backbone.add_registers(num_registers, owner=self)
            if backbone is not None
            else int(model.num_prefix_tokens)
        )
        device = model_device(model)
        self._handles = [model.norm_pre.register_forward_pre_hook(self._insert)]
        self._rotary = rotary_attentions(model)
        for attn in self._rotary:  # the added tokens are not rotated, the patches still are
            attn.num_prefix_tokens += self.num_registers
        for layer, indices in neurons.by_layer().items():
            idx = torch.tensor(indices, dtype=torch.long, device=device)
            act = model.blocks[layer].mlp.act
            self._handles.append(
                act.register_forward_hook(lambda m, i, o, idx=idx: self._move(idx, o))
            )
        ACTIVE[model] = self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _insert(self, module: nn.Module, inputs: tuple) -> tuple:
        out = inputs[0]
        p = self.position
        zeros = out.new_zeros(out.shape[0], self.num_registers, out.shape[2])
        return (torch.cat([out[:, :p], zeros, out[:, p:]], dim=1), *inputs[1:])

    def _move(self, idx: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        p, n = self.position, self.num_registers
        if act.shape[1] <= p + n:
            raise RuntimeError("test-time register hook: the extra tokens are missing")
        idx = idx.to(act.device)
        sel = act[:, :, idx]  # [B, T, k], before any edit
        hi = sel.amax(dim=(1, 2))
        lo = sel.amin(dim=(1, 2))
        peak = torch.where(hi.abs() > lo.abs(), hi, lo)  # signed, per image
        out = act.clone()
        out[:, p : p + n, idx] = peak.view(-1, 1, 1).to(out.dtype)
        out[:, p + n :, idx] = 0
        return out

    def detach(self) -> None:
        """Remove the hooks and give the backbone back its register count (idempotent)."""
        if not self._handles:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        for attn in self._rotary:
            attn.num_prefix_tokens -= self.num_registers
        self._rotary = []
        if self.backbone is not None:
            self.backbone.remove_registers(self.num_registers, owner=self)
        if ACTIVE.get(self.model) is self:
            del ACTIVE[self.model]

    def __enter__(self) -> TestTimeRegisters:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (
            f"TestTimeRegisters({len(self.neurons.neurons)} neurons in blocks "
            f"{sorted(self.neurons.by_layer())}, {self.num_registers} register(s), {state})"
        )


def attach_test_time_registers(
    backbone: nn.Module,
    spec: str | os.PathLike[str] | RegisterNeurons,
    num_registers: int = 1,
) -> TestTimeRegisters:
    """Add ``num_registers`` test-time registers to a backbone (or a bare timm ViT).

    Args:
        backbone: a :class:`discover.backbone.Backbone` (it counts the added tokens as
            registers, so its outputs split exactly) or a timm ``VisionTransformer`` / ``Eva`` (its
            outputs then hold the extra tokens at ``model.num_prefix_tokens``).
        spec: ``"auto"`` (the file shipped for the backbone's model name), a neuron JSON
            file, or a :class:`RegisterNeurons`.
        num_registers: tokens to add; each receives the same activations.

    Returns:
        The attachment; call :meth:`TestTimeRegisters.detach` or use it as a context
        manager (``with attach_test_time_registers(bb, "auto"): ...``).

    Raises:
        RegdiscoverError: ``"auto"`` without a shipped file, an unreadable file, neurons
            outside the model, or registers already attached.
    """
    model, bb = split_backbone(backbone)
    name = getattr(bb, "name", None) if bb is not None else model_name(model)
    neurons = resolve_neurons(spec, name)
    return TestTimeRegisters(backbone, neurons, num_registers)
