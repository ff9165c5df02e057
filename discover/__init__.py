"""regdiscover: unsupervised object discovery with register-aware ViT features.

Find the main object of an image with TokenCut (the default on DINOv2), LOST, FOUND or
deep spectral methods on the patch features of a self-supervised Vision Transformer,
without labels. With random weights (as here) only LOST still finds a red square::

    >>> import numpy as np
    >>> from discover import Discoverer
    >>> disc = Discoverer("vit_small_patch14_reg4_dinov2", pretrained=False, method="lost")
    >>> image = np.zeros((224, 224, 3), dtype=np.uint8)
    >>> image[60:160, 80:180] = (200, 30, 30)
    >>> detections = disc(image)
    >>> len(detections)
    1
    >>> x0, y0, x1, y1 = detections[0].box  # pixels of the original image

With real weights use ``Discoverer()`` (DINOv2 ViT-S/14 with registers from the hub) or
``Discoverer("vit_small_patch14_dinov2.imgfocus")`` (offline, see the README), and the
one-shot ``discover(path)`` for a single image.
"""

from __future__ import annotations

import importlib
from typing import Any

from discover.errors import DatasetError, ImageError, RegdiscoverError, WeightsError
from discover.models import DEFAULT_MODEL, OFFLINE_MODEL
from discover.version import __version__

# The rest is imported on first use (PEP 562): ``import discover`` (and so the command
# line, its --help and a Ctrl-C while it starts) does not wait for torch.
_LAZY = {
    "Backbone": "discover.backbone",
    "Features": "discover.backbone",
    "Detection": "discover.pipeline",
    "Discoverer": "discover.pipeline",
    "ImageResult": "discover.pipeline",
    "discover": "discover.pipeline",
}

__all__ = [
    "DEFAULT_MODEL",
    "OFFLINE_MODEL",
    "Backbone",
    "DatasetError",
    "Detection",
    "Discoverer",
    "Features",
    "ImageError",
    "ImageResult",
    "RegdiscoverError",
    "WeightsError",
    "__version__",
    "discover",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'discover' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
