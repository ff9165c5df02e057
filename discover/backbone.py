"""The backbone wrapper: a timm Vision Transformer that returns register-free patch features.

Step two of the pipeline (image -> **features** -> graph -> box). For a batch of
equal-size images, :class:`Backbone` returns the last block's features of the patch
grid only, with the [CLS] token and the registers split off:

- ``keys`` (default, as LOST uses), ``queries`` or ``values``: the output of the block's
  attention input projection (``attn.qkv``, or the separate q/k/v projections), before
  any q/k norm and before any rotary embedding;
- ``keys_rope``, ``queries_rope`` (rotary models only, e.g. DINOv3): the keys / queries
  exactly as they enter the attention's dot product, after the model's q/k norm and its
  rotary position embedding (patch tokens rotated, [CLS] and registers not);
- ``tokens``: the last block's output after the final norm (``forward_features``).

The model classes supported (timm ``VisionTransformer`` and ``Eva``) differ in a few steps,
which :mod:`discover.adapters` holds; the forward loop here is shared.

Preprocessing follows LOST: RGB, the model's mean/std (ImageNet for DINO, DINOv2,
DeiT-III; OpenAI's for CLIP), no resize, zero padding at the bottom/right (after
normalisation) up to a multiple of the patch size. ``max_size`` optionally resizes so the
longer side is at most ``max_size`` pixels, both sides a multiple of the patch size.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from discover.adapters import ModelAdapter, adapter_for
from discover.errors import ImageError
from discover.models import DEFAULT_MODEL, OFFLINE_MODEL, ModelSpec, spec_for
from discover.weights import create_vit

FEATURE_KINDS = ("keys", "queries", "values", "tokens")
"""The feature kinds every model has (:meth:`Backbone.forward_all`'s default)."""
ROPE_FEATURE_KINDS = ("keys_rope", "queries_rope")
"""Feature kinds of rotary models only: keys / queries after the rotary embedding."""
PRECISIONS = ("fp32", "bf16", "fp16")
DEFAULT_MAX_PATCHES = 9216


@dataclass(frozen=True)
class Prepared:
    """One image ready for the network, and how to map boxes back to the original."""

    array: np.ndarray
    """RGB uint8 ``[H, W, 3]`` as fed to the network (before padding)."""
    scale: tuple[float, float]
    """``(sx, sy)``: original pixels per network-input pixel."""
    original_size: tuple[int, int]
    """``(width, height)`` of the original upright image."""

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.array.shape[1]), int(self.array.shape[0])


@dataclass(frozen=True, eq=False)
class Features:
    """Features of a batch of equal-size images, split into [CLS], registers and patches."""

    patches: torch.Tensor
    """``[B, h*w, D]`` patch features, row-major over the grid."""
    cls: torch.Tensor
    """``[B, D]`` the [CLS] token's features (same kind as ``patches``)."""
    registers: torch.Tensor
    """``[B, R, D]`` register tokens (trained and test-time); ``R == 0`` without any."""
    grid: tuple[int, int]
    """``(h, w)`` patches."""
    patch_size: int
    token_norms: torch.Tensor | None = None
    """``[B, T]`` L2 norm of every output token of the last block (before the final
    norm), in token order ([CLS], registers, patches); only when asked for."""
    cls_attention: torch.Tensor | None = None
    """``[B, heads, T]`` the [CLS] row of the last block's attention over all tokens."""
    num_prefix_tokens: int = 1
    """Tokens before the patches ([CLS] and registers) in ``token_norms`` and
    ``cls_attention``."""

    def patch_attention(self) -> torch.Tensor:
        """``[B, heads, N]``: :attr:`cls_attention` on the patch tokens only (the softmax
        over every token, restricted to the patch columns, as FOUND and LOST read it)."""
        if self.cls_attention is None:
            raise ValueError("these features were computed without attention=True")
        return self.cls_attention[..., self.num_prefix_tokens :]


class Backbone(nn.Module):
    """A timm ViT returning register-free patch features for images of any size.

    Args:
        name: a timm model name (see :data:`MODELS`; any timm ``VisionTransformer`` or
            ``Eva`` model, DINOv3 included, with the attentions :mod:`discover.adapters`
            supports).
        checkpoint: local weights (timm, DINO, DINOv2 or DINOv3 release formats); offline.
        pretrained: download hub weights when no checkpoint is given.
        features: ``keys`` (default), ``queries``, ``values`` or ``tokens``; for rotary
            models also ``keys_rope`` and ``queries_rope`` (after the rotary embedding).
            For a model without a [CLS] token (timm's ``*_gap`` ViTs), ``Features.cls``
            is the mean of the patch features (what its average-pool head reads) and
            ``attention=True`` is refused.
        device: ``cpu``, ``cuda``, ``cuda:1``...
        precision: ``fp32``; ``bf16`` (CPU with native bf16, and GPU): the model's weights
            are converted to bfloat16 and the whole forward runs in it (on the CPU this
            is faster than autocast and, measured on real photos, closer to fp32 boxes);
            ``fp16`` (GPU): autocast to float16. The model is converted in place.
        max_size: resize so the longer side is at most this many pixels.
        max_patches: patch budget for images at native size (``max_size`` unset): a larger
            image is downscaled until its padded grid fits (default 9216, i.e. 96x96
            patches, 1344 px squares at patch 14; LOST's gram matrix then stays below
            about 350 MB). ``None`` disables the budget. Benchmark images (VOC, COCO:
            at most 640 px) are far below it and keep their native size.
        model: an already built timm ViT or Eva (then ``name`` is only a label); build it
            with ``dynamic_img_size=True`` for images of any size.
    """

    def __init__(
        self,
        name: str = DEFAULT_MODEL,
        *,
        checkpoint: str | None = None,
        pretrained: bool = True,
        features: str = "keys",
        layer: int = -1,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        max_size: int | None = None,
        max_patches: int | None = DEFAULT_MAX_PATCHES,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_feature_kind(features)
        if max_size is not None and max_size < 1:
            raise ValueError(f"max_size must be positive, got {max_size}")
        if max_patches is not None and max_patches < 1:
            raise ValueError(f"max_patches must be positive, got {max_patches}")
        self.name = name
        self.spec: ModelSpec = spec_for(name)
        self.features = features
        self.max_size = max_size
        self.max_patches = max_patches
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device)
        if model is None:
            offline = "imgfocus" if name == OFFLINE_MODEL else None
            model = create_vit(
                name, checkpoint=checkpoint, pretrained=pretrained, offline_source=offline
            )
        self.adapter: ModelAdapter = adapter_for(model, name)
        self._check_kind(features)
        self.model = model.eval()
        self.depth = len(model.blocks)
        self.layer = self.block_index(layer)
        if self.precision == "bf16":
            self.model.to(torch.bfloat16)
        ps = model.patch_embed.patch_size
        self.patch_size = int(ps[0] if isinstance(ps, tuple | list) else ps)
        self.embed_dim = int(model.embed_dim)
        self.num_heads = int(model.blocks[-1].attn.num_heads)
        self.model_registers = self.adapter.num_registers
        self.num_cls = self.adapter.num_cls
        self._extra_registers = 0
        self._attachments: list[Any] = []
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = cfg.get("mean", (0.485, 0.456, 0.406))
        std = cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.to(self.device)

    # -- bookkeeping -----------------------------------------------------------------
    @property
    def family(self) -> str:
        """The model family (``dinov2``, ``dino``...), which picks calibrated defaults."""
        return self.spec.family

    @property
    def rotary(self) -> bool:
        """Whether the model applies a rotary position embedding (RoPE) to q and k
        (DINOv3 and timm's other ``Eva`` models with ``use_rot_pos_emb``)."""
        return self.adapter.rotary

    def _check_kind(self, kind: str) -> str:
        check_feature_kind(kind)
        if kind in ROPE_FEATURE_KINDS and not self.adapter.rotary:
            raise ValueError(
                f"features {kind!r} exist only for models with rotary position embeddings "
                f"(e.g. DINOv3); {self.name} has none: use {kind.removesuffix('_rope')!r}"
            )
        return kind

    @property
    def num_registers(self) -> int:
        """Registers split off the output: the model's own plus added ones."""
        return self.model_registers + self._extra_registers

    @property
    def extra_registers(self) -> int:
        """Tokens added after the model's own prefix (test-time registers)."""
        return self._extra_registers

    @property
    def num_prefix_tokens(self) -> int:
        return self.num_cls + self.num_registers

    def add_registers(self, count: int, owner: Any = None) -> int:
        """Declare ``count`` extra register tokens that ``owner`` inserts into the sequence
        right after the model's prefix (and any registers added before).

        The output split then counts them as registers. Returns the position of the first
        one. ``owner`` (something with a ``detach()``) is detached by :meth:`close`.
        """
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        position = int(self.model.num_prefix_tokens) + self._extra_registers
        self._extra_registers += int(count)
        if owner is not None:
            self._attachments.append(owner)
        return position

    def remove_registers(self, count: int, owner: Any = None) -> None:
        """Undo :meth:`add_registers`."""
        if not 0 < count <= self._extra_registers:
            raise ValueError(f"cannot remove {count} of {self._extra_registers} added registers")
        self._extra_registers -= int(count)
        if owner is not None and owner in self._attachments:
            self._attachments.remove(owner)

    def close(self) -> None:
        """Detach everything attached to the model (test-time registers); idempotent.

        The wrapper leaves no hook on the model between calls, so a closed backbone's
        model is the bare timm model again.
        """
        for owner in list(reversed(self._attachments)):
            owner.detach()
        self._attachments.clear()

    def __enter__(self) -> Backbone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def block_index(self, layer: int) -> int:
        """``layer`` as a block index in ``0 .. depth - 1`` (negative counts from the end)."""
        if isinstance(layer, bool) or int(layer) != layer:
            raise ValueError(f"layer must be an integer, got {layer!r}")
        idx = int(layer) + self.depth if layer < 0 else int(layer)
        if not 0 <= idx < self.depth:
            raise ValueError(f"layer must be in [-{self.depth}, {self.depth}), got {layer}")
        return idx

    # -- preprocessing -----------------------------------------------------------------
    def prepare(self, image: np.ndarray, original_size: tuple[int, int] | None = None) -> Prepared:
        """Resize one RGB uint8 image for the network when ``max_size`` asks for it.

        ``original_size`` is the ``(width, height)`` the boxes must refer to, when the
        array was already downscaled on read; default: the array's own size.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageError(f"expected an RGB uint8 array, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        ow, oh = original_size if original_size is not None else (w, h)
        if min(oh, ow) < self.patch_size:
            raise ImageError(
                f"image is {ow}x{oh} pixels, smaller than one {self.patch_size}x"
                f"{self.patch_size} patch"
            )
        arr = image
        p = self.patch_size
        limit = self.max_size
        if limit is None and self.max_patches is not None:
            cells = math.ceil(h / p) * math.ceil(w / p)
            if cells > self.max_patches:
                # Longer side such that the padded grid fits the budget (aspect kept).
                s = math.sqrt(self.max_patches / cells)
                limit = max(p, int(max(h, w) * s) // p * p)
                while _cells(*target_size(w, h, limit, p), p) > self.max_patches and limit > p:
                    limit -= p
        if limit is not None:
            nw, nh = target_size(w, h, limit, p)
            if (nw, nh) != (w, h):
                interp = cv2.INTER_AREA if nw * nh < w * h else cv2.INTER_CUBIC
                arr = cv2.resize(image, (nw, nh), interpolation=interp)
        ih, iw = arr.shape[:2]
        return Prepared(np.ascontiguousarray(arr), (ow / iw, oh / ih), (int(ow), int(oh)))

    def to_tensor(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """Stack equal-size RGB uint8 arrays into a normalised, padded ``[B, 3, Hp, Wp]``.

        Normalisation happens on the model's device (uint8 travels, 4x less than float);
        padding with zeros after normalisation, bottom and right, as LOST does.
        """
        if not arrays:
            raise ValueError("empty batch")
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"a batch needs equal-size images, got {sorted(shapes)}")
        x = torch.from_numpy(np.stack(arrays)).to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        x = (x - self.mean) / self.std
        h, w = x.shape[-2:]
        p = self.patch_size
        ph, pw = (-h) % p, (-w) % p
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), value=0.0)
        return x

    # -- forward -----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        x: torch.Tensor,
        *,
        features: str | None = None,
        layer: int | None = None,
        norms: bool = False,
        attention: bool = False,
    ) -> Features:
        """Features of a normalised, padded batch ``[B, 3, H, W]`` (H, W multiples of the patch).

        Args:
            features: override the wrapper's feature kind for this call (``keys``,
                ``queries``, ``values``, ``tokens``; ``keys_rope``, ``queries_rope`` for
                rotary models).
            layer: override the wrapper's block for this call (``-1``: the last block).
                q/k/v come from that block's attention input projection; ``tokens`` are
                its output (after the final norm for the last block, raw otherwise).
            norms: also return the L2 norm of every output token of the last block.
            attention: also return the [CLS] attention row of the last block (not for
                models without a [CLS] token).
        """
        kind = self._check_kind(features or self.features)
        li = self.layer if layer is None else self.block_index(layer)
        return self._run(x, (kind,), li, norms=norms, attention=attention)[kind]

    @torch.inference_mode()
    def forward_all(
        self,
        x: torch.Tensor,
        kinds: Sequence[str] = FEATURE_KINDS,
        *,
        layer: int | None = None,
        attention: bool = False,
    ) -> dict[str, Features]:
        """Several feature kinds of one block from a single forward (for calibration
        sweeps): ``{kind: Features}``, each as :meth:`forward` returns it."""
        kinds = tuple(self._check_kind(k) for k in kinds)
        li = self.layer if layer is None else self.block_index(layer)
        return self._run(x, kinds, li, norms=False, attention=attention)

    def _run(
        self, x: torch.Tensor, kinds: tuple[str, ...], li: int, *, norms: bool, attention: bool
    ) -> dict[str, Features]:
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        if attention and self.num_cls == 0:
            raise ValueError(
                f"{self.name} has no [CLS] token (a global-average-pool model), so it has no "
                "[CLS] attention: use a method that needs none (lost, tokencut, spectral)"
            )
        grid = (H // p, W // p)
        ad = self.adapter
        last = self.depth - 1
        # The blocks to run, and of which the q/k/v projection or the output is wanted.
        stop = last if (norms or attention) else li
        qkv_at = {last} if attention else set()
        if any(k != "tokens" for k in kinds):
            qkv_at.add(li)
        out_at = {li} if "tokens" in kinds else set()
        if norms:
            out_at.add(last)
        # The model's own dtype: bfloat16 once converted, float64 for a model made double
        # (the tests compare batchings there, free of float32's order-dependent rounding).
        x = x.to(next(self.model.parameters()).dtype)
        qkv: dict[int, tuple[torch.Tensor, ...]] = {}
        outs: dict[int, torch.Tensor] = {}
        with self._autocast():
            t, ctx = ad.embed(x)
            for i in range(stop + 1):
                if i in qkv_at:
                    # The block's own projection of its attention input (recomputed from
                    # the same tensor, so the values are the ones the attention uses).
                    qkv[i] = ad.project(i, ad.attn_input(i, t))
                    if i == stop and i not in out_at:
                        break  # only q/k/v wanted here: not the attention and MLP
                t = ad.block(i, t, ctx)
                if i in out_at:
                    outs[i] = t
            # q/k as the attention's dot product sees them (q/k norm, rotary embedding).
            rotated_at = {last} if attention else set()
            if any(k in ROPE_FEATURE_KINDS for k in kinds):
                rotated_at.add(li)
            rotated = {i: ad.attention_qk(i, qkv[i][0], qkv[i][1], ctx) for i in rotated_at}
        m = self.model
        n_pre = self.num_prefix_tokens
        token_norms = outs[last].float().norm(dim=-1) if norms else None
        cls_attn = self._cls_attention(*rotated[last], ad.scale(last)) if attention else None
        result = {}
        for kind in kinds:
            if kind == "tokens":
                tok = m.norm(outs[li]) if li == last else outs[li]
            elif kind in ROPE_FEATURE_KINDS:
                q_rot, k_rot = rotated[li]
                r = k_rot if kind == "keys_rope" else q_rot  # [B, heads, T, head_dim]
                tok = r.transpose(1, 2).reshape(B, r.shape[2], -1)
            else:
                tok = qkv[li][("queries", "keys", "values").index(kind)]
            T = tok.shape[1]
            if T != n_pre + grid[0] * grid[1]:
                raise RuntimeError(
                    f"token bookkeeping broken: {T} tokens, expected {n_pre} prefix + "
                    f"{grid[0]}x{grid[1]} patches"
                )
            patches = tok[:, n_pre:]
            result[kind] = Features(
                patches=patches,
                cls=tok[:, 0] if self.num_cls else patches.mean(dim=1),
                registers=tok[:, self.num_cls : n_pre],
                grid=grid,
                patch_size=p,
                token_norms=token_norms,
                cls_attention=cls_attn,
                num_prefix_tokens=n_pre,
            )
        return result

    def extract(self, images: Sequence[np.ndarray], **kwargs) -> tuple[Features, list[Prepared]]:
        """Prepare, batch and run equal-size RGB uint8 images in one forward."""
        prepared = [self.prepare(im) for im in images]
        feats = self(self.to_tensor([pr.array for pr in prepared]), **kwargs)
        return feats, prepared

    @staticmethod
    def _cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        """``[B, heads, T]``: softmax of the [CLS] query against every key, from the q/k
        as the attention's dot product sees them (``[B, heads, T, head_dim]``)."""
        logits = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * scale
        return logits.softmax(dim=-1)[:, :, 0]

    def _autocast(self):
        """fp16 runs under autocast; fp32 and bf16 (converted weights) need none."""
        if self.precision != "fp16":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.float16)


def _cells(w: int, h: int, p: int) -> int:
    return math.ceil(h / p) * math.ceil(w / p)


def target_size(w: int, h: int, max_size: int, patch_size: int) -> tuple[int, int]:
    """Network input size for an image of ``w x h`` under ``max_size``.

    Images whose longer side is already at most ``max_size`` are not resized. Larger ones
    are scaled so the longer side is at most ``max_size``, each side rounded to a multiple
    of the patch size (at least one patch).
    """
    if max(w, h) <= max_size:
        return w, h
    s = max_size / max(w, h)
    p = patch_size
    nw = max(p, int(round(w * s / p)) * p)
    nh = max(p, int(round(h * s / p)) * p)
    nw = min(nw, max(p, max_size // p * p))
    nh = min(nh, max(p, max_size // p * p))
    return nw, nh


def check_feature_kind(kind: str) -> str:
    """``kind`` if it is one of :data:`FEATURE_KINDS` or :data:`ROPE_FEATURE_KINDS` (else
    ``ValueError``; whether the model has rotary embeddings is the backbone's check)."""
    if kind not in FEATURE_KINDS + ROPE_FEATURE_KINDS:
        raise ValueError(
            f"features must be one of {FEATURE_KINDS + ROPE_FEATURE_KINDS}, got {kind!r}"
        )
    return kind


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device that exists on this machine (else ``ValueError``
    naming it): ``cpu``, ``cuda``, ``cuda:N`` or, on Apple machines, ``mps``."""
    text = str(device)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"unknown device {text!r}: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {text!r} requested but CUDA is not available here")
        n = torch.cuda.device_count()
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {text!r} requested but this machine has {n} CUDA device(s)")
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {text!r} requested but MPS is not available here")
        return dev
    raise ValueError(f"device {text!r} is not supported: use cpu, cuda or cuda:N")


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type == "cpu":
        if precision == "fp16":
            warnings.warn("fp16 is for GPUs; using bf16 on the CPU instead", stacklevel=3)
            precision = "bf16"
        if precision == "bf16" and not cpu_supports_bf16():
            warnings.warn("this CPU has no native bf16 support; using fp32", stacklevel=3)
            precision = "fp32"
    return precision
