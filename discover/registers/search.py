"""Finding the register neurons of a model (step 1 of test-time registers).

:func:`find_register_neurons` runs images through the model twice: the token norms at
every block's output (where are the outliers, from which block on), then the MLP unit
activations on the outlier tokens (which units write them). See :mod:`discover.registers`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from discover.diagnostics import outlier_threshold
from discover.errors import RegdiscoverError
from discover.registers.model import (
    ACTIVE,
    block_index,
    check_model,
    hidden_units,
    model_device,
    model_name,
    split_backbone,
)
from discover.registers.neurons import RegisterNeurons

__all__ = ["find_register_neurons"]


def find_register_neurons(
    backbone_or_model: nn.Module,
    images: Iterable[np.ndarray] | torch.Tensor,
    *,
    layer: int | None = None,
    threshold: float | str = "auto",
    top_k: int = 10,
    max_layer: int | None = None,
    sparsity: float = 0.5,
    sparsity_fraction: float = 0.5,
    batch_size: int = 4,
) -> RegisterNeurons:
    """Rank the MLP units of a ViT by how much they fire on its high-norm outlier tokens.

    See the module docstring for the method and its defaults.

    Args:
        backbone_or_model: a :class:`discover.backbone.Backbone` or a timm ViT.
        images: RGB uint8 ``[H, W, 3]`` arrays (any sizes; each is prepared, normalised and
            padded like the backbone does, and run alone), or a normalised float tensor
            ``[B, 3, H, W]`` with ``H, W`` multiples of the patch size (run in chunks of
            ``batch_size``). Arrays with a bare model use a temporary ``Backbone`` for the
            preprocessing (the model's own mean/std).
        layer: block whose output norms define the outliers (negative counts from the
            end); ``None`` picks it from the data.
        threshold: a norm cutoff (strictly above = outlier), ``"auto"`` for
            :func:`outlier_threshold` on the pooled patch norms of all images at ``layer``,
            or ``"quantile:Q"`` for their ``Q`` quantile (to study a model without real
            outliers: ``"quantile:0.99"`` flags its top 1% of patch tokens).
        top_k: how many units to keep.
        max_layer: last block whose units may be kept (negative counts from the end);
            ``None`` picks it from the data. Never beyond ``layer``.
        sparsity: activation level a sparse unit stays below...
        sparsity_fraction: ...on at least this share of an image's tokens.
        batch_size: images per forward for a tensor input.

    Returns:
        The :class:`RegisterNeurons` (fewer than ``top_k`` when fewer units score above
        zero). ``stats`` holds ``num_images``, ``images_with_outliers``,
        ``outlier_tokens``, ``patch_tokens``, ``outlier_fraction``, ``median_norm``,
        ``max_norm`` (patch norms at ``layer``), ``layer_log_ratios`` (the layer choice)
        and ``outlier_log_ratio_by_block`` (the ``max_layer`` choice).

    Raises:
        RegdiscoverError: no image, a model with test-time registers attached, or no
            outlier token in any image (lower the threshold or use more images).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, backbone = split_backbone(backbone_or_model)
    check_model(model)
    if model in ACTIVE or (backbone is not None and backbone.extra_registers):
        raise RegdiscoverError("detach the test-time registers before searching for neurons")
    depth = len(model.blocks)
    n_pre = int(model.num_prefix_tokens)

    with _Runner(model, backbone, images, batch_size) as runner:
        # Pass 1: the norm of every token at the output of every block.
        norms = runner.block_norms()  # per image: [depth, T]
        if not norms:
            raise RegdiscoverError("no image to search register neurons on")
        patch_norms = [n[:, n_pre:] for n in norms]  # per image: [depth, P]

        ratios = torch.stack(
            [(p.amax(dim=1) / p.median(dim=1).values.clamp_min(1e-12)).log() for p in patch_norms]
        ).mean(dim=0)  # [depth]
        if layer is None:
            first = depth // 2
            det = first + int(ratios[first:].argmax())
        else:
            det = block_index(layer, depth, "layer")

        pooled = torch.cat([p[det] for p in patch_norms])
        cut, rule = _resolve_cut(threshold, pooled)
        masks = [p[det] > cut for p in patch_norms]  # per image: [P] bool
        with_outliers = [i for i, m in enumerate(masks) if bool(m.any())]
        if not with_outliers:
            raise RegdiscoverError(
                f"no patch token above the norm threshold {cut:.4g} at block {det} in "
                f"{len(norms)} image(s) (max {float(pooled.max()):.4g}, median "
                f"{float(pooled.median()):.4g}): lower the threshold or use more images"
            )

        # How far the outlier tokens stand out at each block: mean over images of
        # log(mean outlier norm / median patch norm).
        by_block = torch.stack(
            [
                (
                    patch_norms[i][:, masks[i]].mean(dim=1)
                    / patch_norms[i].median(dim=1).values.clamp_min(1e-12)
                ).log()
                for i in with_outliers
            ]
        ).mean(dim=0)  # [depth]
        if max_layer is None:
            target = 0.5 * float(by_block[det])
            cap = next((b for b in range(det + 1) if float(by_block[b]) >= target), det)
        else:
            cap = min(block_index(max_layer, depth, "max_layer"), det)

        # Pass 2: unit activations on the images holding outliers.
        scores = runner.unit_scores(
            [(i, masks[i]) for i in with_outliers], cap, sparsity, sparsity_fraction
        )  # [cap + 1, H]

    hidden = scores.shape[1]
    flat = scores.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    picked = [int(j) for j in order[:top_k] if float(flat[j]) > 0.0]
    n_out = int(sum(int(masks[i].sum()) for i in with_outliers))
    n_tok = int(pooled.numel())
    stats = {
        "num_images": len(norms),
        "images_with_outliers": len(with_outliers),
        "outlier_tokens": n_out,
        "patch_tokens": n_tok,
        "outlier_fraction": n_out / n_tok if n_tok else 0.0,
        "median_norm": float(pooled.double().quantile(0.5)),
        "max_norm": float(pooled.max()),
        "layer_log_ratios": [round(float(v), 4) for v in ratios],
        "outlier_log_ratio_by_block": [round(float(v), 4) for v in by_block],
    }
    return RegisterNeurons(
        neurons=[(j // hidden, j % hidden) for j in picked],
        scores=[float(flat[j]) for j in picked],
        model=getattr(backbone, "name", None) if backbone is not None else model_name(model),
        layer=det,
        threshold=cut,
        threshold_rule=rule,
        top_k=top_k,
        max_layer=cap,
        sparsity=sparsity,
        sparsity_fraction=sparsity_fraction,
        stats=stats,
    )


def _resolve_cut(threshold: float | str, pooled: torch.Tensor) -> tuple[float, str]:
    """The numeric cutoff and a description of how it was chosen."""
    if not isinstance(threshold, str):
        value = float(threshold)
        if math.isnan(value):
            raise ValueError("threshold must not be NaN")
        return value, "fixed"
    text = threshold.strip().lower()
    if text == "auto":
        cut = float(outlier_threshold(pooled))
        return cut, "auto: exp(median + max(5 * 1.4826 * MAD, log 2)) of the log patch norms"
    if text.startswith("quantile:"):
        try:
            q = float(text.split(":", 1)[1])
        except ValueError:
            q = math.nan
        if not 0.0 < q < 1.0:
            raise ValueError(f"threshold 'quantile:Q' needs 0 < Q < 1, got {threshold!r}")
        cut = float(pooled.double().quantile(q))
        return cut, f"quantile:{q:g} of the pooled patch norms"
    raise ValueError(f"threshold must be a number, 'auto' or 'quantile:Q', got {threshold!r}")


class _Runner:
    """Runs the images through the model twice (norms, then unit activations)."""

    def __init__(
        self,
        model: nn.Module,
        backbone: Any,
        images: Iterable[np.ndarray] | torch.Tensor,
        batch_size: int,
    ) -> None:
        self.model = model
        self.depth = len(model.blocks)
        self.device = model_device(model)
        self.dtype = next(model.parameters()).dtype  # bf16 once converted, or float64
        self._was_training = model.training
        self.arrays: list[np.ndarray] | None = None
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"expected a [B, 3, H, W] tensor, got {tuple(images.shape)}")
            self.tensor = images
            self.batch_size = batch_size
        else:
            self.tensor = None
            if backbone is None:
                from discover.backbone import Backbone

                backbone = Backbone("custom", model=model, device=self.device)
            self.backbone = backbone
            self.arrays = [backbone.prepare(np.asarray(a)).array for a in images]

    def __enter__(self) -> _Runner:
        self.model.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.train(self._was_training)

    def _inputs(self) -> Iterable[torch.Tensor]:
        if self.tensor is not None:
            for s in range(0, self.tensor.shape[0], self.batch_size):
                yield self.tensor[s : s + self.batch_size].to(self.device, self.dtype)
        else:
            for a in self.arrays or []:
                yield self.backbone.to_tensor([a]).to(self.dtype)

    @torch.inference_mode()
    def block_norms(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        store: dict[int, torch.Tensor] = {}
        hooks = [
            blk.register_forward_hook(
                lambda _m, _i, o, li=li: store.__setitem__(li, o.float().norm(dim=-1).cpu())
            )
            for li, blk in enumerate(self.model.blocks)
        ]
        try:
            for x in self._inputs():
                store.clear()
                self.model.forward_features(x)
                stacked = torch.stack([store[li] for li in range(self.depth)], dim=1)
                out.extend(stacked.unbind(0))  # [depth, T] per image
        finally:
            for h in hooks:
                h.remove()
        return out

    @torch.inference_mode()
    def unit_scores(
        self,
        images: Sequence[tuple[int, torch.Tensor]],
        cap: int,
        sparsity: float,
        sparsity_fraction: float,
    ) -> torch.Tensor:
        """Mean over ``images`` of the per-image unit scores of blocks ``0..cap``."""
        wanted = dict(images)
        n_pre = int(self.model.num_prefix_tokens)
        total = torch.zeros(cap + 1, hidden_units(self.model, 0), dtype=torch.float64)
        current: dict[str, Any] = {}

        def hook(li: int, _m: nn.Module, _i: tuple, act: torch.Tensor) -> None:
            a = act.float()  # [b, T, H]
            t = a.shape[1]
            sparse = (a < sparsity).sum(dim=1) >= sparsity_fraction * t  # [b, H]
            for j, idx in enumerate(current["ids"]):
                if idx not in wanted:
                    continue
                mask = wanted[idx].to(a.device)
                on_outliers = a[j, n_pre:][mask].abs().mean(dim=0)  # [H]
                total[li] += (on_outliers * sparse[j]).double().cpu()

        hooks = [
            self.model.blocks[li].mlp.act.register_forward_hook(
                lambda m, i, o, li=li: hook(li, m, i, o)
            )
            for li in range(cap + 1)
        ]
        try:
            start = 0
            for x in self._inputs():
                ids = list(range(start, start + x.shape[0]))
                start += x.shape[0]
                if not any(i in wanted for i in ids):
                    continue
                current["ids"] = ids
                self.model.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return (total / max(len(wanted), 1)).float()
