"""The SAE architectures, registered in one place: `ARCHITECTURES`, name -> class.

Built in: TopK, BatchTopK, Matryoshka, JumpReLU. Another package adds one without changing
this one through an entry point in the group `clip_sae.architectures` naming its class
(`toy = my_package.toy:Toy`); every process (Ray's workers too) finds it where the package is
installed or on PYTHONPATH. The sweep's search space, the trainer, the export, the model card
and the leaderboard read the registry.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from .base import Architecture
from .batchtopk import BatchTopK
from .jumprelu import JumpReLU
from .matryoshka import Matryoshka
from .topk import TopK

BUILT_IN = (TopK, BatchTopK, Matryoshka, JumpReLU)

ENTRY_POINTS = "clip_sae.architectures"


@functools.cache
def registry() -> dict[str, type[Architecture]]:
    """Every architecture by name: the built-in ones, then the entry points'."""
    found = {cls.name: cls for cls in BUILT_IN}
    for point in entry_points(group=ENTRY_POINTS):
        cls = point.load()
        if not (isinstance(cls, type) and issubclass(cls, Architecture)):
            raise TypeError(f"entry point {point.value} is not an sae.architectures.Architecture")
        if cls.name in found and found[cls.name] is not cls:
            raise ValueError(f"entry point {point.value}: the name {cls.name!r} is taken")
        found[cls.name] = cls
    return found


def names() -> tuple[str, ...]:
    return tuple(registry())


def get(name: str) -> type[Architecture]:
    """The architecture called `name`; a ValueError listing the others if none is."""
    try:
        return registry()[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {', '.join(names())} (got {name!r})") from None


def searched() -> tuple[str, ...]:
    """Every architecture's own searched hyperparameters, in registration order."""
    return tuple(dict.fromkeys(p for cls in registry().values() for p in cls.searched))


__all__ = [
    "Architecture",
    "BatchTopK",
    "JumpReLU",
    "Matryoshka",
    "TopK",
    "get",
    "names",
    "registry",
    "searched",
]
