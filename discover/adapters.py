"""Model adapters: what the backbone wrapper needs from each timm model class.

:class:`discover.backbone.Backbone` runs one forward loop for every supported model; the
few steps that differ between timm's model classes live here, one adapter per class:

- :class:`ViTAdapter`: timm ``VisionTransformer`` (DINO, DINOv2, DeiT-III, CLIP, the
  ``*_reg4_gap`` / ``*_reg1_gap`` register ViTs, TIPSv2...), absolute position
  embeddings, a fused ``qkv`` projection;
- :class:`EvaAdapter`: timm ``Eva`` (DINOv3, the ``*_rope_reg*`` ViTs, EVA-02...): rotary
  position embeddings (RoPE) applied inside the attention, a fused ``qkv`` with separate
  q/v biases, or separate ``q_proj`` / ``k_proj`` / ``v_proj``.

Each adapter gives the token layout ([CLS] and trained registers), the embedding of an
image batch into tokens (with whatever the blocks need besides the tokens: the rotary
embedding of this grid for Eva), one block's forward, the q/k/v projections of a block
exactly as its attention computes them, and the q/k that enter the attention's dot
product (after the model's q/k norm and, for rotary models, its rotary embedding, applied
to the patch tokens only, as the model does).

Nothing here registers a hook: the wrapper runs the blocks itself and recomputes the
projections of the block it reads from that block's own input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from discover.errors import WeightsError

__all__ = ["EvaAdapter", "ModelAdapter", "ViTAdapter", "adapter_for"]


class ModelAdapter:
    """The steps of a forward that differ between model classes (see the module doc)."""

    kind = "?"
    rotary = False
    """Whether the attention applies a rotary position embedding to q and k."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # -- layout ------------------------------------------------------------------------
    @property
    def num_cls(self) -> int:
        """Leading [CLS] tokens: 1, or 0 for models without one (timm's ``*_gap`` ViTs)."""
        return 1 if getattr(self.model, "cls_token", None) is not None else 0

    @property
    def num_registers(self) -> int:
        """Trained register tokens after the [CLS] token."""
        return int(self.model.num_prefix_tokens) - self.num_cls

    def attn(self, i: int) -> nn.Module:
        return self.model.blocks[i].attn

    def attn_dim(self, i: int) -> int:
        a = self.attn(i)
        return int(a.num_heads * a.head_dim)

    # -- forward -----------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Tokens ``[B, T, D]`` of a normalised batch, and the context the blocks need."""
        raise NotImplementedError

    def block(self, i: int, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        """The output of block ``i`` for input tokens ``t``."""
        raise NotImplementedError

    def attn_input(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """What block ``i`` feeds its attention: ``norm1(t)`` (pre-norm blocks) or ``t``."""
        blk = self.model.blocks[i]
        return t if self._post_norm(blk) else blk.norm1(t)

    def project(self, i: int, xn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(q, k, v)``, each ``[B, T, attn_dim]``: block ``i``'s input projections of
        ``xn`` (its attention input), as the attention computes them, before any q/k norm
        and before any rotary embedding."""
        raise NotImplementedError

    def attention_qk(
        self, i: int, q: torch.Tensor, k: torch.Tensor, ctx: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q, k)`` as ``[B, heads, T, head_dim]``, as they enter the dot product of
        block ``i``'s attention: after the model's q/k norm and its rotary embedding."""
        a = self.attn(i)
        B, T, _ = q.shape
        q = a.q_norm(q.reshape(B, T, a.num_heads, -1).transpose(1, 2))
        k = a.k_norm(k.reshape(B, T, a.num_heads, -1).transpose(1, 2))
        return q, k

    def scale(self, i: int) -> float:
        return float(self.attn(i).scale)

    @staticmethod
    def _post_norm(blk: nn.Module) -> bool:
        return False


class ViTAdapter(ModelAdapter):
    """timm ``VisionTransformer``: absolute position embeddings, fused ``qkv``."""

    kind = "vit"

    @property
    def num_registers(self) -> int:
        return int(getattr(self.model, "num_reg_tokens", 0))

    @property
    def num_cls(self) -> int:
        return int(self.model.num_prefix_tokens) - self.num_registers

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        m = self.model
        t = m.patch_embed(x)
        t = m._pos_embed(t)
        t = m.patch_drop(t)
        t = m.norm_pre(t)
        return t, None

    def block(self, i: int, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.model.blocks[i](t)

    def project(self, i: int, xn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        D = self.attn_dim(i)
        qkv = self.attn(i).qkv(xn)
        return qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]

    @staticmethod
    def _post_norm(blk: nn.Module) -> bool:
        from timm.models.vision_transformer import ResPostBlock

        return isinstance(blk, ResPostBlock)


class EvaAdapter(ModelAdapter):
    """timm ``Eva``: rotary position embeddings inside the attention.

    timm's ``EvaAttention`` rotates q and k of the tokens after its ``num_prefix_tokens``
    (the patches; [CLS] and registers are not rotated) with the embedding that
    ``Eva._pos_embed`` computes for the grid at hand (``dynamic_img_size``), after the
    q/k norm. :meth:`attention_qk` does the same with timm's own function.
    """

    kind = "eva"

    @property
    def rotary(self) -> bool:  # type: ignore[override]
        return getattr(self.model, "rope", None) is not None

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        m = self.model
        if not m.dynamic_img_size:
            ph, pw = m.patch_embed.patch_size
            grid = (x.shape[-2] // ph, x.shape[-1] // pw)
            if grid != tuple(m.patch_embed.grid_size):
                raise ValueError(
                    f"this Eva model was built for a {tuple(m.patch_embed.grid_size)} patch grid "
                    f"and gets {grid}: create it with dynamic_img_size=True"
                )
        t = m.patch_embed(x)
        t, rope = m._pos_embed(t)
        t = m.norm_pre(t)
        return t, rope

    def _rope(self, i: int, ctx: Any) -> Any:
        if ctx is not None and getattr(self.model, "rope_mixed", False):
            return ctx[i]  # one embedding per block
        return ctx

    def block(self, i: int, t: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.model.blocks[i](t, rope=self._rope(i, ctx))

    def project(self, i: int, xn: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a = self.attn(i)
        if a.qkv is None:  # separate projections
            return a.q_proj(xn), a.k_proj(xn), a.v_proj(xn)
        if a.q_bias is None:
            qkv = a.qkv(xn)
        else:  # the same two ways EvaAttention adds its q/v biases (k has none)
            bias = torch.cat((a.q_bias, a.k_bias, a.v_bias))
            if a.qkv_bias_separate:
                qkv = a.qkv(xn)
                qkv += bias
            else:
                qkv = F.linear(xn, weight=a.qkv.weight, bias=bias)
        D = self.attn_dim(i)
        return qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]

    def attention_qk(
        self, i: int, q: torch.Tensor, k: torch.Tensor, ctx: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = super().attention_qk(i, q, k, ctx)
        rope = self._rope(i, ctx)
        if rope is None:
            return q, k
        from timm.layers import apply_rot_embed_cat

        a = self.attn(i)
        n = int(a.num_prefix_tokens)
        half = bool(getattr(a, "rotate_half", False))
        dtype = q.dtype  # EvaAttention casts the rotated q/k back to v's dtype (q's here)
        q = torch.cat([q[:, :, :n], apply_rot_embed_cat(q[:, :, n:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :n], apply_rot_embed_cat(k[:, :, n:], rope, half=half)], dim=2)
        return q.to(dtype), k.to(dtype)

    @staticmethod
    def _post_norm(blk: nn.Module) -> bool:
        from timm.models.eva import EvaBlockPostNorm

        return isinstance(blk, EvaBlockPostNorm)


def adapter_for(model: nn.Module, name: str = "model") -> ModelAdapter:
    """The adapter of a timm model, or :class:`WeightsError` saying why it has none.

    Supported: ``VisionTransformer`` with timm's ``Attention`` in pre-norm ``Block`` or
    ``ResPostBlock`` blocks, and ``Eva`` with ``EvaAttention`` (``EvaBlock`` or
    ``EvaBlockPostNorm``). Other attentions (differential, parallel blocks,
    ``AttentionRope`` with grouped k/v heads) are refused: their q/k/v or [CLS] attention
    would not be what the model computes.
    """
    from timm.layers import Attention
    from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm
    from timm.models.vision_transformer import Block, ResPostBlock

    needed = ("patch_embed", "_pos_embed", "blocks", "norm", "norm_pre", "num_prefix_tokens")
    if isinstance(model, Eva):
        adapter: ModelAdapter = EvaAdapter(model)
        blocks, attns = (EvaBlock, EvaBlockPostNorm), (EvaAttention,)
    elif all(hasattr(model, a) for a in needed + ("patch_drop",)):
        adapter = ViTAdapter(model)
        blocks, attns = (Block, ResPostBlock), (Attention,)
    else:
        raise WeightsError(
            f"{name} is not a timm VisionTransformer or Eva (DINOv3) model with a fused qkv "
            "attention"
        )
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if not isinstance(blk, blocks) or type(attn) not in attns:
            raise WeightsError(
                f"{name}: block {i} is a {type(blk).__name__} with "
                f"{type(attn).__name__ if attn is not None else 'no'} attention; supported: "
                f"{', '.join(b.__name__ for b in blocks)} with {attns[0].__name__}"
            )
    return adapter
