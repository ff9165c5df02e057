"""Discovery methods: the contract (:mod:`discover.methods.base`) and the built-ins.

Importing the package imports every built-in method module, and each registers its
:class:`~discover.methods.base.Method` record, as timm's ``models/__init__`` does for
its architectures. A new built-in method is one module plus one line below.
"""

from discover.methods.base import *  # noqa: F403  (the contract, as base.__all__ lists it)
from discover.methods.base import __all__  # noqa: F401

# The built-in methods (each module registers itself).
from discover.methods import lost  # noqa: E402,F401  isort: skip
from discover.methods import tokencut  # noqa: E402,F401  isort: skip
from discover.methods import dino_seg  # noqa: E402,F401  isort: skip
from discover.methods import found  # noqa: E402,F401  isort: skip
from discover.methods import spectral  # noqa: E402,F401  isort: skip
from discover.methods import vote  # noqa: E402,F401  isort: skip
