"""What the register jobs share: checks and facts about the timm model they work on."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from discover.errors import RegdiscoverError

ACTIVE: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()
"""Models that currently carry test-time registers (one attachment per model: the
:class:`~discover.registers.intervene.TestTimeRegisters` object)."""


def split_backbone(backbone_or_model: nn.Module) -> tuple[nn.Module, Any]:
    """``(timm model, Backbone or None)``."""
    from discover.backbone import Backbone

    if isinstance(backbone_or_model, Backbone):
        return backbone_or_model.model, backbone_or_model
    return backbone_or_model, None


def check_model(model: nn.Module) -> None:
    needed = ("patch_embed", "_pos_embed", "norm_pre", "blocks", "num_prefix_tokens")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise RegdiscoverError(
            f"test-time registers need a timm VisionTransformer or Eva; the model lacks {missing}"
        )
    from timm.layers import Mlp

    acts = []
    for i, blk in enumerate(model.blocks):
        mlp = getattr(blk, "mlp", None)
        if not isinstance(mlp, Mlp) or not hasattr(mlp, "act") or not hasattr(mlp, "fc1"):
            kind = type(mlp).__name__ if mlp is not None else "no MLP"
            raise RegdiscoverError(
                f"block {i} has a {kind}, not a timm Mlp with fc1/act: gated MLPs (SwiGLU, "
                "GluMlp: DINOv3 S+/H+, EVA-02) have no single activation module whose output "
                "is the hidden unit, so their register neurons cannot be moved"
            )
        acts.append(id(mlp.act))
    if len(set(acts)) != len(acts):  # a shared module would fire its hook in every block
        raise RegdiscoverError("the blocks share one activation module; cannot hook per block")


def rotary_attentions(model: nn.Module) -> list[nn.Module]:
    """The attentions that rotate q/k of the tokens after their own ``num_prefix_tokens``
    (timm ``EvaAttention`` with a rotary embedding), which test-time registers must shift."""
    if getattr(model, "rope", None) is None:
        return []
    return [b.attn for b in model.blocks if hasattr(b.attn, "num_prefix_tokens")]


def hidden_units(model: nn.Module, layer: int) -> int:
    return int(model.blocks[layer].mlp.fc1.out_features)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def block_index(value: int, depth: int, what: str) -> int:
    idx = value + depth if value < 0 else value
    if not 0 <= idx < depth:
        raise ValueError(f"{what} must be in [-{depth}, {depth}), got {value}")
    return idx


def model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if not arch:
        return None
    return f"{arch}.{tag}" if tag else str(arch)
