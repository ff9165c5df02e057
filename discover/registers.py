"""Test-time registers: move the high-norm outlier tokens of a ViT onto an extra token.

Jiang, Dravid, Efros and Gandelsman (*Vision Transformers Don't Need Trained Registers*,
NeurIPS 2025; code: nickjiang2378/test-time-registers) trace the high-norm patch tokens of
Darcet et al. to a sparse set of MLP units, the *register neurons*: they fire on the few
patches that become outliers and write the large vector that makes them so. Moving those
units' activation from the patches onto one extra, untrained token at test time makes that
token play the role of a trained register.

Two steps, both on a timm ``VisionTransformer`` (the wrapper :class:`discover.backbone.Backbone`
or the bare model):

1. :func:`find_register_neurons` runs a set of images and ranks every MLP unit
   ``(layer, index)`` (post-GELU output, timm's ``blocks[l].mlp.act``):

   - the outliers are the patch tokens whose norm at the output of block ``layer`` is
     above ``threshold`` (the paper: DINOv2-L, second-to-last block, 150; CLIP-B/16, last
     block, 30);
   - for each image holding outliers and each unit, the score is the mean of ``|act|``
     over the outlier tokens, set to zero unless the unit is *sparse* on that image: its
     activation is below ``sparsity`` (0.5) on at least ``sparsity_fraction`` (half) of
     the image's tokens ([CLS] included);
   - scores are averaged over the images holding outliers (the others are skipped), the
     units of blocks after ``max_layer`` are dropped, and the ``top_k`` best are kept
     (the paper: DINOv2-L top 50 up to block 17; CLIP-B/16 top 10 up to block 5).

   Data-driven defaults (each recorded in the result): ``threshold="auto"`` is
   :func:`discover.diagnostics.outlier_threshold` on the pooled patch norms of all the
   images (a norm at least twice the median and 5 robust standard deviations above it on
   a log scale; ``"quantile:Q"`` takes a quantile instead, for models without real
   outliers); ``layer=None`` is the block of the second half of the network whose
   patch-norm maps have the largest mean log(max / median) ratio; ``max_layer=None`` is
   the first block at whose output the outlier tokens already stand out by half of their
   final log norm ratio (the units that create an outlier must sit at or before the block
   where it appears).

2. :func:`attach_test_time_registers` adds ``num_registers`` zero tokens right after the
   model's own prefix tokens ([CLS] and any trained registers), after the position
   embedding and with none of their own, so the sequence is ``[CLS, regs..., ttr...,
   patches]`` (a forward hook on ``model.patch_drop``, which timm runs right after
   ``_pos_embed`` and before ``norm_pre``; ``model.num_prefix_tokens`` is left alone, as
   ``_pos_embed`` relies on it). In each block holding selected units, a hook on
   ``mlp.act`` writes into every test-time register the largest-magnitude activation of
   that block's selected units (one signed value per image, taken over all tokens and all
   those units, as the reference does) and zeroes those units on the patch tokens; [CLS]
   and trained registers are left alone. The wrapper's ``extra_registers`` grows by
   ``num_registers`` so its split of the output into [CLS] / registers / patches stays
   exact; :meth:`TestTimeRegisters.detach` undoes everything.

Where this differs from the reference on purpose:

- the intervention edits every image of a batch (the reference edits only the first);
- the extra token sits after the prefix, not at the end, and the backbone counts it as a
  register (the reference's DINOv2 output split takes it for a patch and drops the first
  patch instead);
- outliers are searched among the patch tokens only ([CLS] and registers are never
  outliers by definition here), and units scoring zero are never selected.

Neuron lists are small JSON files (:meth:`RegisterNeurons.save`); the one for the offline
DINOv2 ViT-S/14 ships in ``discover/data/<model name>.json`` and is what ``"auto"`` loads.
That model turns out to have no high-norm outliers (its largest patch norm stays within
about 2x the median at every block), so its file was computed on the top 1% of patch
norms and the intervention changes little there; the file's ``notes`` say how it was made.
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import re
import warnings
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from discover.diagnostics import outlier_threshold
from discover.errors import RegdiscoverError

__all__ = [
    "FORMAT",
    "RegisterNeurons",
    "TestTimeRegisters",
    "attach_test_time_registers",
    "find_register_neurons",
    "outlier_threshold",
    "shipped_neurons_path",
]

FORMAT = "regdiscover.register_neurons/1"
"""The ``format`` field of a neuron JSON file."""

_ACTIVE: weakref.WeakKeyDictionary[nn.Module, TestTimeRegisters] = weakref.WeakKeyDictionary()
"""Models that currently carry test-time registers (one attachment per model)."""


# -- the neuron list ----------------------------------------------------------------------
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


# -- the model ----------------------------------------------------------------------------
def _split(backbone_or_model: nn.Module) -> tuple[nn.Module, Any]:
    """``(timm model, Backbone or None)``."""
    from discover.backbone import Backbone

    if isinstance(backbone_or_model, Backbone):
        return backbone_or_model.model, backbone_or_model
    return backbone_or_model, None


def _check_model(model: nn.Module) -> None:
    needed = ("patch_embed", "_pos_embed", "patch_drop", "norm_pre", "blocks", "num_prefix_tokens")
    missing = [a for a in needed if not hasattr(model, a)]
    if missing:
        raise RegdiscoverError(
            f"test-time registers need a timm VisionTransformer; the model lacks {missing}"
        )
    acts = []
    for i, blk in enumerate(model.blocks):
        mlp = getattr(blk, "mlp", None)
        if mlp is None or not hasattr(mlp, "act") or not hasattr(mlp, "fc1"):
            raise RegdiscoverError(
                f"block {i} has no timm Mlp with fc1/act (gated MLPs are not supported)"
            )
        acts.append(id(mlp.act))
    if len(set(acts)) != len(acts):  # a shared module would fire its hook in every block
        raise RegdiscoverError("the blocks share one activation module; cannot hook per block")


def _hidden(model: nn.Module, layer: int) -> int:
    return int(model.blocks[layer].mlp.fc1.out_features)


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# -- finding the neurons ------------------------------------------------------------------
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
    model, backbone = _split(backbone_or_model)
    _check_model(model)
    if model in _ACTIVE or (backbone is not None and backbone.extra_registers):
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
            det = _block_index(layer, depth, "layer")

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
            cap = min(_block_index(max_layer, depth, "max_layer"), det)

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
        model=getattr(backbone, "name", None) if backbone is not None else _model_name(model),
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


def _block_index(value: int, depth: int, what: str) -> int:
    idx = value + depth if value < 0 else value
    if not 0 <= idx < depth:
        raise ValueError(f"{what} must be in [-{depth}, {depth}), got {value}")
    return idx


def _model_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    if not arch:
        return None
    return f"{arch}.{tag}" if tag else str(arch)


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
        self.device = _model_device(model)
        self._own_backbone = None
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
                self._own_backbone = backbone
            self.backbone = backbone
            self.arrays = [backbone.prepare(np.asarray(a)).array for a in images]

    def __enter__(self) -> _Runner:
        self.model.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        self.model.train(self._was_training)
        if self._own_backbone is not None:  # its qkv hook must not stay on the user's model
            self._own_backbone._hook.remove()

    def _inputs(self) -> Iterable[torch.Tensor]:
        if self.tensor is not None:
            for s in range(0, self.tensor.shape[0], self.batch_size):
                yield self.tensor[s : s + self.batch_size].to(self.device, torch.float32)
        else:
            for a in self.arrays or []:
                yield self.backbone.to_tensor([a])

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
        total = torch.zeros(cap + 1, _hidden(self.model, 0), dtype=torch.float64)
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


# -- the intervention ---------------------------------------------------------------------
def shipped_neurons_path(model_name: str) -> Path | None:
    """The neuron file shipped for ``model_name`` (``discover/data/<name>.json``), if any."""
    res = importlib.resources.files("discover").joinpath("data", f"{model_name}.json")
    return Path(str(res)) if res.is_file() else None


def _resolve_spec(
    spec: str | os.PathLike[str] | RegisterNeurons, name: str | None
) -> RegisterNeurons:
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
        model, backbone = _split(backbone_or_model)
        _check_model(model)
        if model in _ACTIVE:
            raise RegdiscoverError("this model already has test-time registers attached")
        depth = len(model.blocks)
        for layer, index in neurons.neurons:
            if layer >= depth or index >= _hidden(model, layer):
                raise RegdiscoverError(
                    f"register neuron ({layer}, {index}) does not exist in this model "
                    f"({depth} blocks of {_hidden(model, min(layer, depth - 1))} units): "
                    "was the neuron file computed for another model?"
                )
        name = getattr(backbone, "name", None) if backbone is not None else _model_name(model)
        if neurons.model and name and neurons.model != name:
            warnings.warn(
                f"register neurons computed for {neurons.model!r} attached to {name!r}",
                stacklevel=3,
            )
        self.model = model
        self.backbone = backbone
        self.neurons = neurons
        self.num_registers = int(num_registers)
        self.position = int(model.num_prefix_tokens)
        device = _model_device(model)
        self._handles = [model.patch_drop.register_forward_hook(self._insert)]
        for layer, indices in neurons.by_layer().items():
            idx = torch.tensor(indices, dtype=torch.long, device=device)
            act = model.blocks[layer].mlp.act
            self._handles.append(
                act.register_forward_hook(lambda m, i, o, idx=idx: self._move(idx, o))
            )
        if backbone is not None:
            backbone.extra_registers += self.num_registers
        _ACTIVE[model] = self

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def _insert(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        p = self.position
        zeros = out.new_zeros(out.shape[0], self.num_registers, out.shape[2])
        return torch.cat([out[:, :p], zeros, out[:, p:]], dim=1)

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
        if self.backbone is not None:
            self.backbone.extra_registers -= self.num_registers
        if _ACTIVE.get(self.model) is self:
            del _ACTIVE[self.model]

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
        backbone: a :class:`discover.backbone.Backbone` (its ``extra_registers`` grows so its
            outputs split exactly) or a timm ``VisionTransformer`` (its outputs then hold the
            extra tokens at ``model.num_prefix_tokens``).
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
    model, bb = _split(backbone)
    name = getattr(bb, "name", None) if bb is not None else _model_name(model)
    neurons = _resolve_spec(spec, name)
    return TestTimeRegisters(backbone, neurons, num_registers)
