"""One Ray Tune trial: train an SAE on one cached layer, report, save its state to resume from."""

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
import torch
from ray import tune

from sae import SaeConfig, TrainConfig
from sae.trainer import Trainer, as_acts_tensor
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


PROBE_RIDGE = 1e-3
"""The probe's ridge, relative to its features' mean square (analyze's default)."""


@functools.lru_cache(maxsize=2)
def fit_probe(source, tokens_per_image: int):
    """A RidgeProbe of labels on the training images' activations (one input per image, as in
    `analyze`), or None when they hold fewer than two labels. Fit once per worker and layer."""
    from sweeps.analysis import RidgeProbe, image_features

    train, _ = layer_arrays(source)
    labels, _ = layer_labels(source)
    probe = RidgeProbe(train.shape[1])
    for x_BTD, y_B in _image_batches(train, labels, tokens_per_image):
        ok = y_B >= 0
        probe.update(image_features(x_BTD)[ok], y_B[ok])
    if int((probe.class_counts() > 0).sum()) < 2:
        return None
    probe.fit(probe.default_ridge(PROBE_RIDGE))
    return probe


def _image_batches(rows, labels: np.ndarray, tokens_per_image: int, images: int = 1024):
    """(x_BTD float32, label_B) batches of whole images from (images * T, d) rows."""
    rows = as_acts_tensor(rows)  # read-only object-store arrays without a warning
    for start in range(0, len(labels), images):
        y_B = torch.from_numpy(np.array(labels[start : start + images]))  # a writable copy
        x = rows[start * tokens_per_image : (start + len(y_B)) * tokens_per_image]
        yield x.float().view(len(y_B), tokens_per_image, -1), y_B


@torch.no_grad()
def probe_metrics(trainer: Trainer, probe, val_labels: np.ndarray, tokens_per_image: int):
    """val/probe_acc: the probe's accuracy on the labelled validation images with the SAE's
    reconstruction spliced in; val/probe_acc_orig: on their activations themselves."""
    from sweeps.analysis import image_features

    sae = trainer.export_sae()
    correct, total = {"val/probe_acc": 0, "val/probe_acc_orig": 0}, 0
    for x_BTD, y_B in _image_batches(trainer.val, val_labels, tokens_per_image):
        ok = y_B >= 0
        x_BD = x_BTD.flatten(0, 1).to(sae.device)
        acts, idx = sae.encode(x_BD, exact=trainer.cfg.exact_topk)
        x_hat_BTD = sae.decode(acts, idx).view_as(x_BTD).cpu()
        for key, inputs in (("val/probe_acc", x_hat_BTD), ("val/probe_acc_orig", x_BTD)):
            correct[key] += int((probe.predict(image_features(inputs)[ok]) == y_B[ok]).sum())
        total += int(ok.sum())
    return {key: c / total for key, c in correct.items()} if total else {}


class TrialState:
    """A trial's training state in the sweep's storage, `<root>/step-<N>/` with a `latest`
    file naming the newest. Tune is given no checkpoints: it prunes old ones while the driver
    may still record them, so a driver killed between the two left a resume pointing at a
    deleted checkpoint. Here the pointer moves only once the new state is whole, and the old
    state goes only after that."""

    def __init__(self, root: str):
        self.root = root
        self.pointer = storage.join(root, "latest")
        self.saved = 0

    def save(self, trainer: Trainer) -> None:
        name = f"step-{trainer.step:09d}"
        storage.write_dir(storage.join(self.root, name), trainer.save_state)
        previous = storage.read_text(self.pointer)
        storage.write_text(self.pointer, name)
        if previous and previous != name:
            storage.delete_dir(storage.join(self.root, previous))
        self.saved += 1

    def restore(self, trainer: Trainer) -> None:
        name = storage.read_text(self.pointer)
        if name is None:
            return
        path = storage.join(self.root, name)
        if not storage.is_uri(path):
            trainer.load_state(path)
            return
        with tempfile.TemporaryDirectory() as tmp:
            storage.download_dir(path, tmp)
            trainer.load_state(tmp)

    def delete(self) -> None:
        if storage.exists(self.root):
            storage.delete_dir(self.root)


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
        source = layers[int(config["layer"])]
        acts, val_acts = layer_arrays(source)
        trainer = Trainer(acts, sae_cfg, train_cfg, val_acts=val_acts)
        probe = fit_probe(source, fixed["tokens_per_image"]) if train_cfg.probe else None
        if train_cfg.probe and probe is None:
            raise ValueError("train.probe needs a cache whose training images hold 2+ labels")
        val_labels = layer_labels(source)[1] if probe is not None else None
    except ValueError as e:
        # A config this trial cannot run (k above the width, no CUDA) fails the same way on
        # every retry: end the trial once, with its reason, instead of raising for a retry.
        nan = {key: float("nan") for key in fixed["objectives"]}
        tune.report({**nan, "step": 0, "layer": int(config["layer"]), "error": str(e)})
        return

    # A retried or resumed trial continues from its last saved state, not from step 0.
    state = TrialState(storage.join(fixed["state_root"], tune.get_context().get_trial_id()))
    state.restore(trainer)

    # Which node trained this step: a retried trial may move to another one.
    node_id = ray.get_runtime_context().get_node_id()
    last_save = time.monotonic()

    def report(metrics: dict, trainer: Trainer) -> None:
        nonlocal last_save
        metrics = {**metrics, "layer": int(config["layer"]), "node_id": node_id}
        if probe is not None:
            metrics |= probe_metrics(trainer, probe, val_labels, fixed["tokens_per_image"])
        final = trainer.step >= trainer.total_steps
        if final:
            # The final SAE and its plot's data go to the sweep's storage (shared on a cluster),
            # where the driver logs them to MLflow and `best` finds them.
            frequency_M = trainer.last_stats[1].firing_frequency().cpu().numpy()

            metrics[SAE_DIR_KEY] = sae_dir
            metrics["states_saved"] = state.saved

            def write(directory: Path) -> None:
                trainer.export_sae().save(directory)
                np.save(directory / FREQUENCY_FILE, frequency_M)
                # Last: its presence means the trial is done (see the start of run_trial).
                (directory / FINAL_METRICS).write_text(json.dumps(metrics, default=float))

            storage.write_dir(sae_dir, write)
            state.delete()
        # Reported before the state is saved: a state on storage means Tune holds its results.
        tune.report(metrics)
        if not final and trainer.checkpoint_due():
            if time.monotonic() - last_save >= fixed["checkpoint_interval_s"]:
                state.save(trainer)
                last_save = time.monotonic()

    trainer.fit(report)
