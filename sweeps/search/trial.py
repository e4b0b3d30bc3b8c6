"""One Ray Tune trial: train an SAE on one cached layer, report, save its state to resume from."""

from __future__ import annotations

import dataclasses
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
from sae.metrics import dictionary_metrics
from sae.trainer import DivergedError, Trainer
from sweeps import storage
from sweeps.search.data import layer_arrays, layer_labels
from sweeps.search.probe import fit_probe, probe_metrics
from sweeps.vocabulary import FINAL_METRICS, FREQUENCY_FILE, SAE_DIR_KEY, Hyperparams, final_sae_dir


@dataclass(frozen=True)
class TrialConfig:
    """What every trial of a sweep shares; the sampled hyperparameters come on top."""

    sae: SaeConfig
    """The config's `sae` section as it is: the trial sets k, width and activation."""
    train: TrainConfig
    """The config's `train` section for the SAE library: the trial sets lr, auxk_alpha and
    l0_coefficient.
    Its batch_size counts images, as in the seed's write-up."""
    probe: bool
    """Whether to report the probe metric (`train.probe`)."""
    tokens_per_image: int
    """Activations per image: 1 in `cls` mode, every token in `all` mode."""
    sae_root: str
    """Where finished trials write their SAEs."""
    state_root: str
    """Where unfinished trials keep their training states."""
    objectives: tuple[str, ...]
    checkpoint_interval_s: float


def trial_configs(point: Hyperparams, fixed: TrialConfig) -> tuple[SaeConfig, TrainConfig]:
    """The SAE and training configs of one trial: its sampled point over the fixed settings.
    In `all` token mode a batch of images holds `tokens_per_image` activations each."""
    sae_cfg = dataclasses.replace(fixed.sae, **point.section("sae"))
    batch_size = fixed.train.batch_size * fixed.tokens_per_image
    train_cfg = dataclasses.replace(fixed.train, batch_size=batch_size, **point.section("train"))
    return sae_cfg, train_cfg


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


def run_trial(config: dict[str, Any], *, layers: dict[int, Any], fixed: TrialConfig) -> None:
    """Tune function trainable. `layers` maps a layer to its source: object refs of its
    (train, val) arrays or a CachedLayer."""
    point = Hyperparams.from_values(config)
    sae_dir = final_sae_dir(fixed.sae_root, tune.get_context().get_trial_id(), point.layer)
    finished = storage.read_text(storage.join(sae_dir, FINAL_METRICS))
    if finished is not None:
        # The trial finished after Tune last saved its state (the driver died in between):
        # hand Tune the final result again instead of training a second time.
        tune.report(json.loads(finished))
        return
    try:
        sae_cfg, train_cfg = trial_configs(point, fixed)
        source = layers[point.layer]
        acts, val_acts = layer_arrays(source)
        trainer = Trainer(acts, sae_cfg, train_cfg, val_acts=val_acts)
        probe = fit_probe(source, fixed.tokens_per_image) if fixed.probe else None
        if fixed.probe and probe is None:
            raise ValueError("train.probe needs a cache whose training images hold 2+ labels")
        val_labels = layer_labels(source)[1] if probe is not None else None
    except ValueError as e:  # k above the width, no CUDA, a layer of one constant vector
        _fail(fixed, point, 0, f"layer {point.layer}: {e}")
        return

    # A retried or resumed trial continues from its last saved state, not from step 0.
    state = TrialState(storage.join(fixed.state_root, tune.get_context().get_trial_id()))
    state.restore(trainer)

    # Which node trained this step: a retried trial may move to another one.
    node_id = ray.get_runtime_context().get_node_id()
    last_save = time.monotonic()

    def report(metrics: dict, trainer: Trainer) -> None:
        nonlocal last_save
        metrics = {**metrics, "layer": point.layer, "node_id": node_id}
        if probe is not None:
            metrics |= probe_metrics(trainer, probe, val_labels, fixed.tokens_per_image)
        final = trainer.step >= trainer.total_steps
        if final:
            # The final SAE and its plot's data go to the sweep's storage (shared on a cluster),
            # where the driver logs them to MLflow and `best` finds them.
            frequency_M = trainer.last_stats[1].firing_frequency().cpu()
            metrics |= dictionary_metrics(trainer.sae.W_dec, frequency_M)
            frequency_M = frequency_M.numpy()

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
            if time.monotonic() - last_save >= fixed.checkpoint_interval_s:
                state.save(trainer)
                last_save = time.monotonic()

    try:
        trainer.fit(report)
    except DivergedError as e:
        _fail(fixed, point, trainer.step, str(e))


def _fail(fixed: TrialConfig, point: Hyperparams, step: int, reason: str) -> None:
    """End a trial that would fail the same way on every retry (same data, config and seed):
    one last result holding its reason, which ends it FAILED without a retry, its objectives
    NaN so that it is never the best."""
    nan = {key: float("nan") for key in fixed.objectives}
    tune.report({**nan, "step": step, "layer": point.layer, "error": reason})


def retrain(
    point: Hyperparams, fixed: TrialConfig, source, *, seed: int | None = None, control=False
) -> tuple[dict[str, float], np.ndarray | None]:
    """Train a trial's point again after the sweep: with another `seed` (seed stability), or
    as its `control`, the decoder frozen at its random start (TrainConfig.freeze_decoder).
    (control/fvu, and control/probe_acc with train.probe, for a control; the decoder's rows
    as trained, for a seed); ({}, None) when it diverged."""
    sae_cfg, train_cfg = trial_configs(point, fixed)
    train_cfg = dataclasses.replace(
        train_cfg,
        freeze_decoder=control,
        seed=train_cfg.seed if seed is None else seed,
    )
    acts, val_acts = layer_arrays(source)
    trainer = Trainer(acts, sae_cfg, train_cfg, val_acts=val_acts)
    try:
        result = trainer.fit()
    except DivergedError:
        return {}, None
    if not control:
        return {}, result.sae.W_dec.detach().cpu().numpy()
    out = {"control/fvu": result.metrics["fvu"]}
    probe = fit_probe(source, fixed.tokens_per_image) if fixed.probe else None
    if probe is not None:
        labels = layer_labels(source)[1]
        accuracy = probe_metrics(trainer, probe, labels, fixed.tokens_per_image)
        out["control/probe_acc"] = accuracy["val/probe_acc"]
    return out, None
