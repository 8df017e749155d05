"""Adaptive Layerwise Perturbation (ALP) for TRL's GRPO: swap `GRPOTrainer` for `ALPGRPOTrainer`."""

from .config import CORRECTIONS, ALPConfig
from .trainer import ALPGRPOTrainer

__version__ = "0.1.0"
__all__ = ["ALPConfig", "ALPGRPOTrainer", "CORRECTIONS", "__version__"]
