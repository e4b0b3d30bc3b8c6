"""Sparse autoencoders (TopK, BatchTopK, Matryoshka, JumpReLU) in pure PyTorch; TopK
checkpoints load in EleutherAI sparsify, all four in SAELens."""

from .config import SaeConfig, TrainConfig

# torch loads on first use of the model or trainer, not with the configs: tools that only
# read configs (the CLI's --help, `sae-sweep best`) start without it.
_LAZY = {
    "TopKSae": "model",
    "ForwardOutput": "model",
    "train_sae": "trainer",
    "TrainResult": "trainer",
    "DivergedError": "trainer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SaeConfig", "TrainConfig", *_LAZY]
