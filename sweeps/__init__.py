"""The CLIP SAE sweep service. `load_sweep` and `load_sae` (sweeps/results/notebook.py) load
on first use, so that importing sweeps loads no Ray, MLflow, torch or pandas."""

_LAZY = {"load_sweep": "sweeps.results.notebook", "load_sae": "sweeps.results.notebook"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
