"""How a cached layer reaches the trials: put in Ray's object store by the driver, or read
batch by batch from each node's uncompressed copy of the cache; chosen by `tune.data`."""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from sweeps.activations import cache
from sweeps.config import Config


@dataclass(frozen=True)
class CachedLayer:
    """One layer's train/validation split in the activation cache (on shared storage)."""

    cache_dir: str
    layer: int
    val_fraction: float
    seed: int

    def read(self) -> tuple[np.ndarray, ...]:
        """train and val activations, then train and val labels (see `labels`)."""
        return (
            *(
                cache.load_layer(self.cache_dir, self.layer, split, self.val_fraction, self.seed)
                for split in ("train", "val")
            ),
            *self.labels(),
        )

    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        """Labels per image (-1: none) of both splits, in the order of their activations."""
        return tuple(
            cache.load_labels(self.cache_dir, split, self.val_fraction, self.seed)
            for split in ("train", "val")
        )

    def row_files(self) -> tuple[cache.RowFile, cache.RowFile]:
        """Both splits read batch by batch from the node's uncompressed copy of the layer,
        written there by the first trial that needs it: no trial holds the layer in memory."""
        return tuple(
            cache.RowFile(
                cache.layer_file(self.cache_dir, self.layer, split, self.val_fraction, self.seed)
            )
            for split in ("train", "val")
        )


@functools.lru_cache(maxsize=2)
def _open_once(layer: CachedLayer):
    # Tune reuses trial workers: each opens a layer once, not once per trial.
    return layer.row_files()


def layer_arrays(source) -> tuple:
    """(train, val) activations from object refs the driver put, or read from the cache."""
    if isinstance(source, CachedLayer):
        return _open_once(source)
    # ray.get maps object-store arrays read-only and zero-copy on the trial's node.
    return tuple(ray.get(list(source[:2])))


def layer_labels(source) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) labels per image: the object refs after the activations', or the cache's."""
    if isinstance(source, CachedLayer):
        return source.labels()
    return tuple(ray.get(list(source[2:4])))


def layer_sources(cfg: Config, cache_dir: Path, layers: list[int], tokens_per_image: int):
    """How trials get each layer, and the training rows per layer.

    On one node the driver reads each CLS layer once and puts it in the object store, where
    trials map it without a copy. On several, and for all-token layers (which can outgrow
    memory), trials read batches from each node's uncompressed copy of the cache
    (cache.layer_file), so neither the head's memory nor a trial's bounds the data. `auto`
    decides by the token mode and where the cache lives, not by the nodes alive now: on a
    cluster that scales from zero workers, those come and go."""
    split = (cfg.train.val_fraction, cfg.train.seed)
    n_train = len(cache.load_row_ids(cache_dir, "train", *split)) * tokens_per_image
    n_val = len(cache.load_row_ids(cache_dir, "val", *split))
    if n_train == 0 or n_val == 0:
        raise ValueError(
            f"train.val_fraction={split[0]} leaves {n_train} training and {n_val} validation "
            "rows out of the cache: use a fraction that leaves both"
        )
    mode = cfg.tune.data
    if mode == "auto":
        shared = on_network_fs(cache_dir)
        mode = "cache" if shared or tokens_per_image > 1 else "object_store"
    sources = {}
    for layer in layers:
        spec = CachedLayer(str(cache_dir), layer, *split)
        sources[layer] = spec if mode == "cache" else tuple(map(ray.put, spec.read()))
    return sources, n_train


#: File systems a cluster's nodes share (/proc/mounts types): NFS (EFS), SMB, Lustre, Ceph, ...
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "fuse.sshfs"}


def on_network_fs(path: Path, mounts: str = "/proc/mounts") -> bool:
    """Whether path lies on a network file system: the type of its longest mount point."""
    path = os.path.realpath(path)
    best, fstype = "", ""
    with contextlib.suppress(OSError):  # no /proc (macOS): a local disk as far as we know
        for line in Path(mounts).read_text().splitlines():
            _, point, kind = line.split()[:3]
            point = point.replace("\\040", " ")
            inside = path == point or path.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best):
                best, fstype = point, kind
    return fstype in NETWORK_FS
