"""One Ray Tune trial: train an SAE on one cached layer with `train_sae`, report, checkpoint."""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune

from sae import SaeConfig, TrainConfig
from sae.trainer import Trainer
from sweeps import cache, storage
from sweeps.schema import FINAL_METRICS, FREQUENCY_FILE, SAE_DIR_KEY, final_sae_dir


def trial_configs(config: dict[str, Any], fixed: dict[str, Any]) -> tuple[SaeConfig, TrainConfig]:
    """The SAE and training configs of one trial: sampled values over the fixed settings.

    `fixed["train"]["batch_size"]` counts images, as in the seed's write-up; in `all` token
    mode each image holds `tokens_per_image` activations.
    """
    sae_cfg = dataclasses.replace(
        SaeConfig(**fixed["sae"]),
        k=int(config["k"]),
        expansion_factor=int(config["expansion_factor"]),
        activation=config.get("activation", "topk"),
    )
    train = dict(fixed["train"])
    train["batch_size"] = train["batch_size"] * fixed["tokens_per_image"]
    train_cfg = TrainConfig(**train, lr=float(config["lr"]), auxk_alpha=float(config["auxk_alpha"]))
    return sae_cfg, train_cfg


@dataclass(frozen=True)
class CachedLayer:
    """One layer's train/validation split in the activation cache (on shared storage)."""

    cache_dir: str
    layer: int
    val_fraction: float
    seed: int

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(
            cache.load_layer(self.cache_dir, self.layer, split, self.val_fraction, self.seed)
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
    return tuple(ray.get(list(source)))


def run_trial(config: dict[str, Any], *, layers: dict[int, Any], fixed: dict[str, Any]) -> None:
    """Tune function trainable. `layers` maps a layer to its source: object refs of its
    (train, val) arrays or a CachedLayer."""
    sae_dir = final_sae_dir(fixed["sae_root"], tune.get_context().get_trial_id(), config["layer"])
    finished = storage.read_text(storage.join(sae_dir, FINAL_METRICS))
    if finished is not None:
        # The trial finished after Tune last saved its state (the driver died in between):
        # hand Tune the final result again instead of training a second time.
        tune.report(json.loads(finished))
        return
    try:
        sae_cfg, train_cfg = trial_configs(config, fixed)
        acts, val_acts = layer_arrays(layers[int(config["layer"])])
        trainer = Trainer(acts, sae_cfg, train_cfg, val_acts=val_acts)
    except ValueError as e:
        # A config this trial cannot run (k above the width, no CUDA) fails the same way on
        # every retry: end the trial once, with its reason, instead of raising for a retry.
        nan = {key: float("nan") for key in fixed["objectives"]}
        tune.report({**nan, "step": 0, "layer": int(config["layer"]), "error": str(e)})
        return

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        # A retried or restored trial continues from its last checkpoint, not from step 0.
        with checkpoint.as_directory() as directory:
            trainer.load_state(directory)

    # Which node trained this step: a retried trial may move to another one.
    node_id = ray.get_runtime_context().get_node_id()
    last_checkpoint = time.monotonic()

    def report(metrics: dict, trainer: Trainer) -> None:
        nonlocal last_checkpoint
        metrics = {**metrics, "layer": int(config["layer"]), "node_id": node_id}
        final = trainer.step >= trainer.total_steps
        if final:
            # The final SAE and its plot's data go to the sweep's storage (shared on a cluster),
            # where the driver logs them to MLflow and `best` finds them.
            frequency_M = trainer.last_stats[1].firing_frequency().cpu().numpy()

            metrics[SAE_DIR_KEY] = sae_dir

            def write(directory: Path) -> None:
                trainer.export_sae().save(directory)
                np.save(directory / FREQUENCY_FILE, frequency_M)
                # Last: its presence means the trial is done (see the start of run_trial).
                (directory / FINAL_METRICS).write_text(json.dumps(metrics, default=float))

            storage.write_dir(sae_dir, write)
        waited = time.monotonic() - last_checkpoint
        if trainer.checkpoint_due() and (final or waited >= fixed["checkpoint_interval_s"]):
            last_checkpoint = time.monotonic()
            with tempfile.TemporaryDirectory() as tmp:
                trainer.save_state(tmp)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        else:
            tune.report(metrics)

    trainer.fit(report)
