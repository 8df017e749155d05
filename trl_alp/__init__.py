"""Adaptive Layerwise Perturbation (ALP) for TRL's GRPO: swap `GRPOTrainer` for `ALPGRPOTrainer`.

The names are imported on first use, so ``import trl_alp`` (and the ``trl-alp`` command's help and usage errors)
does not pay for importing torch, transformers and TRL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ALPConfig
    from .corrections import CORRECTIONS
    from .trainer import ALPGRPOTrainer

__version__ = "0.1.0"
__all__ = ["ALPConfig", "ALPGRPOTrainer", "CORRECTIONS", "__version__"]

_LAZY = {"ALPConfig": ".config", "CORRECTIONS": ".corrections", "ALPGRPOTrainer": ".trainer"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
