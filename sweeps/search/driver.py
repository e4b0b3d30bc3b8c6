"""The sweep driver: cached activations -> Ray Tune trials chosen by Optuna -> MLflow.

Why Optuna still learns sensibly from trials that ASHA stops early: ASHA stops a trial at a
rung only when its validation FVU is worse than the best 1/reduction_factor of the trials that
reached the same step. Tune hands the stopped trial's last result to OptunaSearch, so TPE sees
an FVU measured with less training, i.e. too high. That value can only push the trial further
into TPE's "bad" group, where its peers at that rung already placed it; TPE splits trials into
good and bad by rank, so the configurations that shape its next proposals are the finished,
well-ranked ones, measured in full.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import ray
import torch
from ray import tune
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from sae import TopKSae
from sae.ground_truth import feature_recovery
from sae.trainer import total_steps
from sweeps import signals, storage
from sweeps.activations.extract import ExtractResult, extract
from sweeps.config import Config, fixed_fields
from sweeps.ranking import DEAD_METRIC, PickRule, feasible_front, rank
from sweeps.redact import redact
from sweeps.search.data import layer_sources
from sweeps.search.mlflow_callback import MlflowTrialCallback
from sweeps.search.snapshots import set_aside_torn_snapshot
from sweeps.search.study import StudyCopy
from sweeps.search.trial import TrialConfig, TrialState, retrain, run_trial
from sweeps.space import SearchSpace
from sweeps.tracking import runs as tracking
from sweeps.tracking.client import mlflow_client
from sweeps.tracking.records import TrialRecord
from sweeps.tracking.store import TrackingError
from sweeps.vocabulary import METRIC_KEYS, is_num

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    experiment_path: str
    """A directory or a URI (s3://...), as sweep.storage_path."""
    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    cache_dir: str
    rows: list[TrialRecord]
    """One record per trial, best first."""
    best: list[dict[str, Any]]
    """The pick (sweeps.ranking), then the rest of the Pareto front."""
    extraction: ExtractResult
    """What building (or finding) the activation cache did."""
    elapsed_s: float = 0.0
    optuna_storage: str = ""
    """The RDB storage holding a copy of the Optuna study (sweep.optuna_storage), or ""."""


class _NSGAIISampler(optuna.samplers.NSGAIISampler):
    """NSGA-II that pickles, as Tune pickles the searcher with the experiment: from Optuna 5 its
    generation cache holds a thread lock, which goes out of the pickle and comes back new."""

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_thread_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()  # unused before Optuna 5


def _sampler(cfg: Config):
    seed = cfg.tune.seed
    if cfg.tune.sampler == "nsga2":
        return _NSGAIISampler(seed=seed)
    # TPE samples at random until it has n_startup_trials results (Optuna's default: 10), which
    # would leave a small sweep all random: a quarter of the trials, 2 to 10.
    startup = min(10, max(2, cfg.tune.num_samples // 4))
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)


def trial_settings(cfg: Config, tokens_per_image: int) -> TrialConfig:
    """What every trial shares: the config's `sae` and `train` sections as they are (each trial
    sets the searched fields), and where SAEs and training states go."""
    return TrialConfig(
        sae=dataclasses.replace(cfg.sae),
        train=cfg.train.library_config(),
        probe=cfg.train.probe,
        tokens_per_image=tokens_per_image,
        sae_root=storage.join(cfg.sweep.experiment_path(), "sae"),
        state_root=storage.join(cfg.sweep.experiment_path(), "trial_state"),
        objectives=tuple(cfg.tune.objective_modes()),
        checkpoint_interval_s=cfg.tune.checkpoint_interval_s,
    )


def _trainable(cfg: Config, sources, fixed: TrialConfig):
    resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
    trainable = tune.with_parameters(run_trial, layers=sources, fixed=fixed)
    return tune.with_resources(trainable, resources)


class _OptunaSearch(OptunaSearch):
    """OptunaSearch whose sampler draws afresh after Tuner.restore, and that keeps a copy of
    its study in an RDB storage (study.StudyCopy) when given one.

    Tune saves the searcher with the trials, so a driver that dies after proposing a trial
    but before saving comes back with the sampler's old random state, and would propose that
    lost trial's configuration again."""

    def __init__(
        self, *args, study_copy: StudyCopy | None = None, max_dead_frac: float = 1.0, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.study_copy = study_copy
        self.max_dead_frac = max_dead_frac
        """tune.max_dead_frac: a trial above it is infeasible (Optuna's constraint)."""
        if study_copy is not None:
            study_copy.start(self._ot_study, {})

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._ot_study.sampler.reseed_rng()
        if getattr(self, "study_copy", None) is not None:
            numbers = {t.number: trial_id for trial_id, t in self._ot_trials.items()}
            self._write_copy(lambda: self.study_copy.resume(self._ot_study, numbers))

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        self._copy(trial_id)
        return config

    # Tune saves the trials and the searcher as separate files, so a restored searcher may be
    # one snapshot older than the trials: results of trials it never proposed are not its own.
    # Optuna's intermediate values are kept at the SAE's step, not Tune's iteration: a trial
    # retried from its own saved state counts iterations from 1 again, and Optuna would drop
    # (and warn about) every report up to the old count.
    def on_trial_result(self, trial_id: str, result: dict):
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: result["step"]})
            self._copy(trial_id)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        if trial_id in self._ot_trials:
            # A trial's last result reaches only this call when Tune takes it together with
            # the trial's end (a trial ending itself, or one ASHA stops): it is an evaluation
            # too, which the curve keeps as MLflow's does.
            ot_trial = self._ot_trials[trial_id]
            dead = (result or {}).get(DEAD_METRIC)
            if is_num(dead) and not math.isnan(dead):  # Optuna's samplers read it at the tell
                ot_trial.set_constraint("dead_frac", float(dead) - self.max_dead_frac)
            step = (result or {}).get("step")
            metric = self.metric if isinstance(self.metric, str) else None
            if metric and is_num((result or {}).get(metric)) and is_num(step):
                reported = self._ot_study.get_trials(deepcopy=False)[ot_trial.number]
                if int(step) not in reported.intermediate_values:
                    self.on_trial_result(trial_id, result)
            super().on_trial_complete(trial_id, result, error)
            self._copy(trial_id)

    def _copy(self, trial_id: str) -> None:
        if getattr(self, "study_copy", None) is None or trial_id not in self._ot_trials:
            return
        number = self._ot_trials[trial_id].number
        trial = self._ot_study.get_trials(deepcopy=False)[number]
        self._write_copy(lambda: self.study_copy.sync(trial, trial_id))

    def _write_copy(self, write) -> None:
        # The copy is for looking at: a storage that fails (a database server gone) costs
        # the copy this update, not the sweep. The next update of the trial fills it in.
        try:
            write()
        except Exception as e:
            logger.warning("Optuna storage %s: %s", redact(self.study_copy.url), redact(str(e)))


def _scheduler(cfg: Config, max_steps: int) -> ASHAScheduler | None:
    """ASHA on the sweep's objective (config validation allows it with one objective only)."""
    if not cfg.tune.asha:
        return None
    ((metric, mode),) = cfg.tune.objective_modes().items()
    return ASHAScheduler(
        time_attr="step",
        metric=metric,
        mode=mode,
        max_t=max_steps,
        grace_period=min(cfg.tune.grace_period, max_steps),
        reduction_factor=cfg.tune.reduction_factor,
    )


def _tuner(cfg: Config, space: SearchSpace, trainable, max_steps: int, callbacks, resume: bool):
    # Tune snapshots its experiment at most every 10+ s by default. A trial that finished after
    # the last snapshot is unknown to `resume`, which then runs another in its place; with
    # Tune holding no checkpoints nothing forces a snapshot sooner, so ask for one a second.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    fs = storage.tune_filesystem(cfg.sweep.storage_path)
    if resume:
        # Finished trials stay finished; unfinished and errored ones go on from their states.
        return tune.Tuner.restore(
            cfg.sweep.experiment_path(),
            trainable,
            resume_unfinished=True,
            resume_errored=True,
            storage_filesystem=fs,
        )
    objectives = cfg.tune.objective_modes()
    metric, mode = list(objectives), list(objectives.values())
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
    url = cfg.sweep.resolved_optuna_storage()
    searcher = _OptunaSearch(
        space=space.suggest,
        metric=metric,
        mode=mode,
        sampler=_sampler(cfg),
        max_dead_frac=cfg.tune.max_dead_frac,
        points_to_evaluate=space.optuna_points() or None,
        study_copy=StudyCopy(url, cfg.sweep.name, cfg.sweep.experiment_path(), list(objectives))
        if url
        else None,
    )
    scheduler = _scheduler(cfg, max_steps)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=cfg.tune.max_concurrent),
            scheduler=scheduler,
            num_samples=cfg.tune.num_samples,
            # A trial is seconds to minutes of training: starting a fresh worker process
            # for each would cost a large share of it.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=cfg.sweep.name,
            storage_path=cfg.sweep.storage_path,
            storage_filesystem=fs,
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            verbose=cfg.tune.verbose,
        ),
    )


def run_sweep(
    cfg: Config, resume: bool = False, callbacks: Sequence = (), progress=None, plots=None
) -> SweepResult:
    """Extract (or reuse) the cache, run or resume the sweep, summarise it in MLflow.

    Ray must be initialised and cfg checked with preflight.check_sweep. The parent run exists
    from the start, and any failure of the driver closes it FAILED (KILLED on Ctrl-C) with the
    error. progress: a bar the caller owns, told of each extracted batch (see `extract`) and
    closed when extraction ends. plots: draws a finished trial's plots beside its SAE before
    they are logged (MlflowTrialCallback's `plots`)."""
    space = SearchSpace.from_config(cfg.search)
    started = time.time()
    path = cfg.sweep.experiment_path()
    uri = cfg.sweep.resolved_tracking_uri()
    parent = tracking.start_sweep_run(
        uri,
        cfg.sweep.experiment_name(),
        sweep_id=path,
        config=dataclasses.asdict(cfg),
        search_space=space.describe(),
    )
    try:
        result = _run(cfg, space, parent, uri, resume, callbacks, progress, plots)
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):  # Ctrl-C or SIGTERM: `resume` goes on from here
            reason = f"interrupted by {signals.received().name}"
            tracking.close_open_trial_runs(uri, parent, reason)
            tracking.finish_sweep_run(uri, parent, "KILLED", error=reason)
        else:
            tracking.finish_sweep_run(uri, parent, "FAILED", error=f"{type(e).__name__}: {e}")
        raise
    n_err = sum(r.status == "FAILED" for r in result.rows)
    tracking.finish_sweep_run(uri, parent, "FAILED" if n_err else "FINISHED")
    result.elapsed_s = time.time() - started
    return result


def _run(cfg: Config, space: SearchSpace, parent: str, uri, resume, callbacks, progress, plots):
    ex = extract(cfg, progress=progress)
    if progress is not None:
        progress.close()  # the sweep's own display follows
    tracking.set_tags(uri, parent, {"cache_key": ex.manifest["key"]})
    tokens = ex.manifest["tokens_per_image"]
    sources, n_train = layer_sources(cfg, ex.cache_dir, space.layers(), tokens)
    batch = cfg.train.batch_size * tokens
    max_steps = total_steps(cfg.train, n_train, min(batch, n_train))

    path = cfg.sweep.experiment_path()
    fixed = trial_settings(cfg, tokens)
    # Logged as every trial's params: what its config shares with the sweep's other trials.
    shared = {"sae": fixed_fields(cfg, "sae"), "train": fixed_fields(cfg, "train")}
    shared |= {"tokens_per_image": tokens}
    shared |= {"model": {"name_or_path": cfg.model.name_or_path}, "data": {"path": cfg.data.path}}
    callbacks = [MlflowTrialCallback(uri, parent, fixed_params=shared, plots=plots), *callbacks]
    if resume and (torn := set_aside_torn_snapshot(path)):
        logger.warning(
            "resume: Tune's newest snapshot was cut short when the driver died (%s, now "
            "*.torn); going on from the snapshot before it",
            ", ".join(torn),
        )
    # A resumed sweep whose driver died before Tune saved any state starts its trials afresh.
    restore = resume and tune.Tuner.can_restore(path)
    tuner = _tuner(cfg, space, _trainable(cfg, sources, fixed), max_steps, callbacks, restore)
    try:
        grid = tuner.fit()
    except tune.TuneError as e:  # Tune hands on a callback's error as its traceback's text
        if isinstance(e.__context__, TrackingError):
            raise e.__context__ from None
        raise
    for result in grid:  # finished or stopped early: no resume needs their training state
        if result.error is None and result.metrics.get("trial_id"):
            TrialState(storage.join(fixed.state_root, result.metrics["trial_id"])).delete()
    rule = PickRule.from_tune(cfg.tune)
    rows = _records(grid, rule)
    tracking.close_lost_trial_runs(uri, parent, [r.trial_id for r in rows])
    followups = _followups(cfg, rows, rule, fixed, sources)
    tracking.log_followups(uri, parent, followups)
    for row in rows:
        row.metrics.update(followups.get(row.trial_id, {}))  # a frozen record, its own dict
    best = tracking.log_sweep_summary(uri, parent, grid, rule, followups=followups)
    experiment_id = mlflow_client(uri).get_run(parent).info.experiment_id
    return SweepResult(
        path,
        parent,
        uri,
        experiment_id,
        str(ex.cache_dir),
        rows,
        best,
        ex,
        optuna_storage=cfg.sweep.resolved_optuna_storage(),
    )


def _followups(cfg: Config, rows, rule: PickRule, fixed: TrialConfig, sources) -> dict:
    """After the trials: the pick (rows[0]) and the rest of the feasible front, the first
    max(tune.controls, 1) of them, each retrained as Ray tasks with a trial's resources, as
    its control (tune.controls) and with tune.stability_seeds other seeds. {trial_id: its
    control metrics and margins, and stability/decoder_mcc: the mean Hungarian-matched
    cosine between its decoder and each other seed's (sae.ground_truth.feature_recovery)}."""
    tune_cfg = cfg.tune
    if not (tune_cfg.controls or tune_cfg.stability_seeds):
        return {}
    front = {0, *feasible_front([r.metrics for r in rows], rule)}
    chosen = [r for i, r in enumerate(rows) if i in front and r.status == "DONE" and r.sae_dir]
    chosen = chosen[: max(tune_cfg.controls, 1)]
    task = ray.remote(retrain).options(
        num_cpus=tune_cfg.cpus_per_trial, num_gpus=tune_cfg.gpus_per_trial
    )
    controls = {r.trial_id: task.remote(r.params, fixed, sources[r.layer], control=True)
                for r in chosen[: tune_cfg.controls]}  # fmt: skip
    seeds = {
        r.trial_id: [
            task.remote(r.params, fixed, sources[r.layer], seed=fixed.train.seed + i)
            for i in range(1, tune_cfg.stability_seeds + 1)
        ]
        for r in chosen
    }
    out = {}
    for row in chosen:
        metrics = {}
        if row.trial_id in controls:
            metrics, _ = ray.get(controls[row.trial_id])
        if "control/fvu" in metrics:
            metrics["control/margin_fvu"] = metrics["control/fvu"] - row.metrics["val/fvu"]
        if "control/probe_acc" in metrics and "val/probe_acc" in row.metrics:
            trial_acc = row.metrics["val/probe_acc"]
            metrics["control/margin_probe"] = trial_acc - metrics["control/probe_acc"]
        decoders = [W for _, W in ray.get(seeds[row.trial_id]) if W is not None]
        if decoders:
            own = TopKSae.load(storage.local_dir(row.sae_dir)).W_dec
            matched = [feature_recovery(own, torch.tensor(W))["mcc"] for W in decoders]
            metrics["stability/decoder_mcc"] = float(np.mean(matched))
        out[row.trial_id] = metrics
    return out


def _records(grid, rule: PickRule) -> list[TrialRecord]:
    """Tune's results as trial records, failed ones last, the rest best first (the pick
    first: sweeps.ranking.rank)."""
    keys = (*METRIC_KEYS, *rule.objectives)
    records = [TrialRecord.from_tune(r, keys) for r in grid]
    order = rank([r.metrics for r in records], rule)
    return sorted((records[i] for i in order), key=lambda r: r.status == "FAILED")
