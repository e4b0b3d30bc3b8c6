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

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.result import TRAINING_ITERATION
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from sae.trainer import total_steps
from sweeps import cache, storage, tracking
from sweeps.config import SEARCHED, Config, ConfigError
from sweeps.extract import ExtractResult, extract
from sweeps.mlflow_callback import MlflowTrialCallback
from sweeps.schema import SEARCHED_PARAMS, leaderboard_url
from sweeps.space import SearchSpace
from sweeps.trainable import CachedLayer, TrialState, run_trial

logger = logging.getLogger(__name__)


@dataclass
class SweepResult:
    experiment_path: str
    """A directory or a URI (s3://...), as sweep.storage_path."""
    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    cache_dir: str
    rows: list[dict[str, Any]]
    """One dict per trial: trial_id, status, config values and final metrics, best first."""
    best: list[dict[str, Any]]
    """The best trial, or the Pareto front with several objectives."""
    extraction: ExtractResult
    """What building (or finding) the activation cache did."""
    elapsed_s: float = 0.0


#: Config fields a resume may change: they only shape what the driver prints.
RESUMABLE_FIELDS = ("tune.show_top", "tune.verbose", "tune.checkpoint_interval_s")


def check_sweep(cfg: Config, resume: bool = False, overwrite: bool = False) -> None:
    """Everything that can be checked before Ray starts: the data, the model's shape, devices,
    the tracking store, and whether the sweep exists (sweep) or matches its config (resume)."""
    from transformers import CLIPVisionConfig

    space = SearchSpace.from_config(cfg.search)
    _check_data(cfg)
    if cfg.train.val_fraction <= 0:
        raise ConfigError(
            "train.val_fraction=0 leaves no validation rows, which trials are scored on: use "
            "a fraction such as 0.05"
        )
    if cfg.train.device == "cuda" and cfg.tune.gpus_per_trial == 0:
        raise ConfigError(
            "train.device=cuda but tune.gpus_per_trial=0: a trial gets no GPU; set "
            "tune.gpus_per_trial (e.g. 1 or 0.25) or train.device=auto"
        )
    missing = sorted(set(space.layers()) - set(cfg.extract.layers))
    if missing:
        raise ConfigError(
            f"search.layer includes {missing}, which extract.layers {cfg.extract.layers} does not "
            "cache: add them to extract.layers"
        )
    try:
        vision = CLIPVisionConfig.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision
        )
    except OSError as e:
        raise ConfigError(
            f"model.name_or_path: cannot read {cfg.model.name_or_path!r}: {e}"
        ) from None
    depth = vision.num_hidden_layers
    if max(cfg.extract.layers) >= depth:
        raise ConfigError(
            f"extract.layers/search.layer: {cfg.model.name_or_path} has layers 0..{depth - 1} "
            f"(got {sorted(set(cfg.extract.layers))}); pick layers in that range"
        )
    k_max = space.bounds("k")[1]
    smallest = vision.hidden_size * space.bounds("expansion_factor")[0]
    if k_max > smallest:
        raise ConfigError(
            f"search.k reaches {k_max}, more than the {smallest} latents of the smallest SAE "
            f"(d_model {vision.hidden_size} x expansion_factor "
            f"{space.bounds('expansion_factor')[0]}): lower k or raise expansion_factor"
        )
    try:
        tracking.check_tracking_uri(cfg.sweep.resolved_tracking_uri())
    except tracking.TrackingError as e:
        raise ConfigError(f"sweep.tracking_uri: {e}") from None
    _check_sweep_records(cfg, resume, overwrite)


def _check_data(cfg: Config) -> None:
    import glob

    path = cfg.data.path
    # An hf path may be a hub name; a path that starts like one on disk must exist.
    local = cfg.data.source != "hf" or path.startswith(("/", "./", "../", "~"))
    if local and "://" not in path and not glob.glob(os.path.expanduser(path)):
        raise ConfigError(
            f"data.path: {path!r} does not exist (data.source={cfg.data.source}): fix the path"
        )


def _check_sweep_records(cfg: Config, resume: bool, overwrite: bool) -> None:
    """A name holds one sweep: `sweep` refuses an existing one unless told to overwrite it,
    and `resume` refuses a config that differs from the one the sweep started with."""
    path = cfg.sweep.experiment_path()
    uri = cfg.sweep.resolved_tracking_uri()
    parent = tracking.find_sweep_run(uri, cfg.sweep.experiment_name(), path)
    has_state = storage.exists(path)
    if resume:
        if parent is None and not has_state:
            raise ConfigError(
                f"sweep.name: no sweep {cfg.sweep.name!r} to resume at {path} or in MLflow "
                f"experiment {cfg.sweep.experiment_name()!r}: run `sweep` first, or check "
                "sweep.name and sweep.out_dir/storage_path"
            )
        changed = tracking.config_changes(parent, dataclasses.asdict(cfg), RESUMABLE_FIELDS)
        if parent is not None and changed:
            raise ConfigError(
                f"resume: the config differs from the one sweep {cfg.sweep.name!r} started "
                f"with, in {', '.join(changed)}. A resumed sweep keeps its config; start a new "
                "sweep under another sweep.name to change them"
            )
        return
    if (parent is not None or has_state) and not overwrite:
        held = [f"Tune state at {path}"] if has_state else []
        held += [f"MLflow run {parent.info.run_id}"] if parent is not None else []
        raise ConfigError(
            f"sweep.name: a sweep named {cfg.sweep.name!r} exists ({', '.join(held)}). Use "
            "`sae-sweep resume` to continue it, another sweep.name, or `sweep --overwrite` to "
            "delete its records and SAEs first"
        )


def delete_sweep(cfg: Config) -> list[str]:
    """Delete a sweep's Tune state, SAEs and MLflow runs (for `sweep --overwrite`); returns
    what was deleted, for the CLI to say."""
    path = cfg.sweep.experiment_path()
    uri = cfg.sweep.resolved_tracking_uri()
    deleted = []
    if storage.exists(path):
        storage.delete_dir(path)
        deleted.append(path)
    parent = tracking.find_sweep_run(uri, cfg.sweep.experiment_name(), path)
    if parent is not None:
        n = tracking.delete_sweep_runs(uri, parent)
        deleted.append(f"{n} MLflow runs of experiment {cfg.sweep.experiment_name()!r}")
    return deleted


def check_resources(cfg: Config, local: bool) -> None:
    """Fail at once when no node the cluster has, or that its autoscaler can launch, can run a
    trial; Tune would wait for it forever. Ray must be initialised; `local`: by this process,
    so no autoscaler adds nodes."""
    need = {"CPU": cfg.tune.cpus_per_trial, "GPU": cfg.tune.gpus_per_trial}
    if cfg.train.device == "cuda":
        need["GPU"] = max(need["GPU"], 1e-9)
    node_types = [] if local else _autoscaler_node_types()
    if node_types is None:
        return  # an autoscaler whose node types this driver cannot read: Tune will wait
    shapes = [n["Resources"] for n in ray.nodes() if n["Alive"]] + node_types
    if any(all(shape.get(r, 0) >= v for r, v in need.items()) for shape in shapes):
        return
    largest = {r: max(shape.get(r, 0) for shape in shapes) for r in need}
    raise ConfigError(
        f"tune: a trial needs {need['CPU']:g} CPU and {need['GPU']:g} GPU "
        f"(tune.cpus_per_trial, tune.gpus_per_trial, train.device={cfg.train.device}), but the "
        f"largest node here or in the autoscaler's node types has {largest['CPU']:g} CPU and "
        f"{largest['GPU']:g} GPU: lower the request or add such a node type"
    )


def _autoscaler_node_types() -> list[dict] | None:
    """Resources of the node types the autoscaler can launch: from the cluster config it
    reports to the GCS, else from the config `ray up` leaves on the head; None when neither
    tells (a cluster started by hand, or Ray's fake autoscaler)."""
    import yaml

    config = ray._private.state.state.get_cluster_config()
    if config is not None and config.node_group_configs:
        return [dict(group.resources) for group in config.node_group_configs]
    path = Path("~/ray_bootstrap_config.yaml").expanduser()
    if path.is_file():
        types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
        return [t.get("resources") or {} for t in types.values()]
    return None


def _sampler(cfg: Config):
    import optuna

    seed = cfg.tune.seed
    if cfg.tune.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # TPE samples at random until it has n_startup_trials results (Optuna's default: 10), which
    # would leave a small sweep all random: a quarter of the trials, 2 to 10.
    startup = min(10, max(2, cfg.tune.num_samples // 4))
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=startup)


def _layer_sources(cfg: Config, cache_dir: Path, layers: list[int], tokens_per_image: int):
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
        shared = _on_network_fs(cache_dir)
        mode = "cache" if shared or tokens_per_image > 1 else "object_store"
    sources = {}
    for layer in layers:
        spec = CachedLayer(str(cache_dir), layer, *split)
        sources[layer] = spec if mode == "cache" else tuple(map(ray.put, spec.read()))
    return sources, n_train


#: File systems a cluster's nodes share (/proc/mounts types): NFS (EFS), SMB, Lustre, Ceph, ...
NETWORK_FS = {"nfs", "nfs4", "cifs", "smb3", "lustre", "ceph", "glusterfs", "fuse.sshfs"}


def _on_network_fs(path: Path, mounts: str = "/proc/mounts") -> bool:
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


def _trainable_settings(cfg: Config, tokens_per_image: int) -> dict[str, Any]:
    """What every trial shares: the fixed SAE and training settings and where SAEs go."""
    train = dataclasses.asdict(cfg.train)
    for searched in SEARCHED["train"]:
        train.pop(searched)
    return {
        "sae": {"normalize_decoder": cfg.sae.normalize_decoder, "num_latents": 0},
        "train": train,
        "tokens_per_image": tokens_per_image,
        "sae_root": storage.join(cfg.sweep.experiment_path(), "sae"),
        "objectives": list(cfg.tune.objective_modes()),
        "checkpoint_interval_s": cfg.tune.checkpoint_interval_s,
        "state_root": storage.join(cfg.sweep.experiment_path(), "trial_state"),
    }


def _trainable(cfg: Config, sources, tokens_per_image: int):
    fixed = _trainable_settings(cfg, tokens_per_image)
    resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
    trainable = tune.with_parameters(run_trial, layers=sources, fixed=fixed)
    return tune.with_resources(trainable, resources)


class _OptunaSearch(OptunaSearch):
    """OptunaSearch whose sampler draws afresh after Tuner.restore.

    Tune saves the searcher with the trials, so a driver that dies after proposing a trial
    but before saving comes back with the sampler's old random state, and would propose that
    lost trial's configuration again."""

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._ot_study.sampler.reseed_rng()

    # Tune saves the trials and the searcher as separate files, so a restored searcher may be
    # one snapshot older than the trials: results of trials it never proposed are not its own.
    # Optuna's intermediate values are kept at the SAE's step, not Tune's iteration: a trial
    # retried from its own saved state counts iterations from 1 again, and Optuna would drop
    # (and warn about) every report up to the old count.
    def on_trial_result(self, trial_id: str, result: dict):
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, {**result, TRAINING_ITERATION: result["step"]})

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        if trial_id in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)


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


def set_aside_torn_snapshot(path: str) -> list[str]:
    """Rename to `*.torn` the newest session's snapshot files (`experiment_state-<session>.json`
    and the searcher's state) when one is cut short, and so on back; return the names.

    Tune writes and copies them in place, so a driver killed mid-write can leave one empty or
    truncated, and Tune would then log the error and start the sweep again from nothing. With
    the session set aside whole (the searcher must match the trials), resume takes the one
    before. Object stores (s3://...) never hold a part-written object."""
    if storage.is_uri(path) or not Path(path).is_dir():  # killed before Tune saved anything
        return []
    sessions: dict[str, list[Path]] = {}
    for p in Path(path).iterdir():
        if m := _SNAPSHOT.fullmatch(p.name):
            sessions.setdefault(m[1], []).append(p)
    set_aside = []
    for session in sorted(sessions, reverse=True):
        files = sessions[session]
        if any(p.name.startswith("experiment_state-") for p in files) and all(
            map(_readable, files)
        ):
            break
        for p in files:
            p.rename(p.with_name(p.name + ".torn"))
            set_aside.append(p.name)
    return set_aside


# Tune's per-session snapshot files; its temporary files (tmp-*, .*) are not among them.
_SNAPSHOT = re.compile(r"(?!tmp-)[a-z_-]+-(\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\.(?:json|pkl)")


def _readable(path: Path) -> bool:
    data = path.read_bytes()
    for load in (json.loads, ray.cloudpickle.loads):  # Tune pickles some of its *.json too
        try:
            load(data)
            return True
        except Exception:  # cut short: any error a partial file can raise
            pass
    return False


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
    searcher = _OptunaSearch(
        space=space.suggest,
        metric=metric,
        mode=mode,
        sampler=_sampler(cfg),
        points_to_evaluate=space.optuna_points() or None,
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
    cfg: Config, resume: bool = False, callbacks: Sequence = (), progress=None
) -> SweepResult:
    """Extract (or reuse) the cache, run or resume the sweep, summarise it in MLflow.

    Ray must be initialised and cfg checked with check_sweep. The parent run exists from the
    start, and any failure of the driver closes it FAILED (KILLED on Ctrl-C) with the error.
    progress: a bar the caller owns, told of each extracted batch (see `extract`) and closed
    when extraction ends."""
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
        result = _run(cfg, space, parent, uri, resume, callbacks, progress)
    except BaseException as e:
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        tracking.finish_sweep_run(uri, parent, status, error=f"{type(e).__name__}: {e}")
        raise
    n_err = sum(r["status"] == "FAILED" for r in result.rows)
    tracking.finish_sweep_run(uri, parent, "FAILED" if n_err else "FINISHED")
    result.elapsed_s = time.time() - started
    return result


def _run(cfg: Config, space: SearchSpace, parent: str, uri: str, resume: bool, callbacks, progress):
    ex = extract(cfg, progress=progress)
    if progress is not None:
        progress.close()  # the sweep's own display follows
    tracking.set_tags(uri, parent, {"cache_key": ex.manifest["key"]})
    tokens = ex.manifest["tokens_per_image"]
    sources, n_train = _layer_sources(cfg, ex.cache_dir, space.layers(), tokens)
    batch = cfg.train.batch_size * tokens
    max_steps = total_steps(cfg.train, n_train, min(batch, n_train))

    path = cfg.sweep.experiment_path()
    fixed = _trainable_settings(cfg, tokens)
    shared = {k: fixed[k] for k in ("sae", "train", "tokens_per_image")}
    shared |= {"model": {"name_or_path": cfg.model.name_or_path}, "data": {"path": cfg.data.path}}
    callbacks = [MlflowTrialCallback(uri, parent, fixed_params=shared), *callbacks]
    if resume and (torn := set_aside_torn_snapshot(path)):
        logger.warning(
            "resume: Tune's newest snapshot was cut short when the driver died (%s, now "
            "*.torn); going on from the snapshot before it",
            ", ".join(torn),
        )
    # A resumed sweep whose driver died before Tune saved any state starts its trials afresh.
    restore = resume and tune.Tuner.can_restore(path)
    tuner = _tuner(cfg, space, _trainable(cfg, sources, tokens), max_steps, callbacks, restore)
    grid = tuner.fit()
    for result in grid:  # finished or stopped early: no resume needs their training state
        if result.error is None and result.metrics.get("trial_id"):
            TrialState(storage.join(fixed["state_root"], result.metrics["trial_id"])).delete()
    objectives = cfg.tune.objective_modes()
    rows = _rows(grid, objectives)
    tracking.close_lost_trial_runs(uri, parent, [r["trial_id"] for r in rows])
    best = tracking.log_sweep_summary(uri, parent, grid, objectives)
    experiment_id = MlflowClient(uri).get_run(parent).info.experiment_id
    return SweepResult(path, parent, uri, experiment_id, str(ex.cache_dir), rows, best, ex)


def _rows(grid, objectives: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        failed = r.error or m.get("error")
        row = {
            "trial_id": m.get("trial_id", ""),
            "status": "FAILED" if failed else ("DONE" if m.get("sae_dir") else "STOPPED"),
            **{c: r.config.get(c) for c in SEARCHED_PARAMS},
            **{k: m.get(k) for k in ("val/fvu", "val/l0", "dead_frac", "step")},
            **{k: m.get(k) for k in objectives},
            "sae_dir": m.get("sae_dir"),
            "error": str(r.error).strip().splitlines()[-1] if r.error else m.get("error", ""),
        }
        rows.append(row)
    first, mode = next(iter(objectives.items()))
    sign = 1 if mode == "min" else -1

    def key(row):
        v = row.get(first)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (row["status"] == "FAILED", not ok, sign * v if ok else 0.0)

    return sorted(rows, key=key)


def mlflow_ui_hint(result: SweepResult, objectives: dict[str, str]) -> str:
    """How to open the sweep's leaderboard in the MLflow UI."""
    metric, mode = next(iter(objectives.items()))
    uri = result.tracking_uri
    if uri.startswith("sqlite:"):
        url = leaderboard_url("http://127.0.0.1:5000", result.experiment_id, metric, mode)
        return f"MLflow UI: mlflow ui --backend-store-uri {uri}\n  then open {url}"
    url = leaderboard_url(uri, result.experiment_id, metric, mode)
    return f"MLflow UI: {url}\n  (on a cluster, through `ray attach -p` or an SSH tunnel)"
