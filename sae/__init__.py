"""TopK sparse autoencoders in pure PyTorch, checkpoint-compatible with EleutherAI sparsify."""

from .config import SaeConfig, TrainConfig
from .model import ForwardOutput, TopKSae
from .trainer import DivergedError, TrainResult, train_sae

__all__ = [
    "SaeConfig",
    "TrainConfig",
    "TopKSae",
    "ForwardOutput",
    "train_sae",
    "TrainResult",
    "DivergedError",
]
