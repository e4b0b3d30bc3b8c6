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
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from sae.trainer import total_steps
from sweeps import cache, storage, tracking
from sweeps.config import Config, ConfigError
from sweeps.extract import extract
from sweeps.space import SearchSpace
from sweeps.trainable import CachedLayer, run_trial

SUMMARY_COLUMNS = ("layer", "k", "expansion_factor", "lr", "auxk_alpha")


@dataclass
class SweepResult:
    experiment_path: str
    """A directory or a URI (s3://...), as sweep.storage_path."""
    parent_run_id: str
    tracking_uri: str
    rows: list[dict[str, Any]]
    """One dict per trial: trial_id, status, config values and final metrics, best first."""
    best: list[dict[str, Any]]
    """The best trial, or the Pareto front with several objectives."""


def check_sweep(cfg: Config) -> None:
    """Checks that need the model's shape or the tracking store, run before Ray starts."""
    from transformers import CLIPVisionConfig

    space = SearchSpace.from_config(cfg.search)
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


def experiment_path(cfg: Config) -> str:
    """The sweep's Tune experiment: an absolute directory or a URI (s3://...)."""
    return storage.join(cfg.sweep.storage_path, cfg.sweep.name)


def _sampler(cfg: Config):
    import optuna

    seed = cfg.tune.seed
    if cfg.tune.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def _layer_sources(cfg: Config, cache_dir: Path, layers: list[int], tokens_per_image: int):
    """How trials get each layer, and the training rows per layer.

    On one node the driver reads each CLS layer once and puts it in the object store, where
    trials map it without a copy. On several, and for all-token layers (which can outgrow
    memory), trials map each node's uncompressed copy of the cache (cache.layer_file) and read
    batches from it, so neither the head's memory nor a trial's bounds the data."""
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
        nodes = [n for n in ray.nodes() if n["Alive"]]
        mode = "object_store" if len(nodes) == 1 and tokens_per_image == 1 else "cache"
    sources = {}
    for layer in layers:
        spec = CachedLayer(str(cache_dir), layer, *split)
        sources[layer] = spec if mode == "cache" else tuple(map(ray.put, spec.read()))
    return sources, n_train


def _trainable(cfg: Config, sources, tokens_per_image: int):
    train = dataclasses.asdict(cfg.train)
    for searched in ("lr", "auxk_alpha"):
        train.pop(searched)
    fixed = {
        "sae": {"normalize_decoder": cfg.sae.normalize_decoder, "num_latents": 0},
        "train": train,
        "tokens_per_image": tokens_per_image,
        "sae_root": storage.join(experiment_path(cfg), "sae"),
    }
    resources = {"cpu": cfg.tune.cpus_per_trial, "gpu": cfg.tune.gpus_per_trial}
    trainable = tune.with_parameters(run_trial, layers=sources, fixed=fixed)
    return tune.with_resources(trainable, resources)


def _tuner(cfg: Config, space: SearchSpace, trainable, max_steps: int, callback, resume: bool):
    path = experiment_path(cfg)
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(
                f"no sweep to resume at {path}: run `sweep` first, or check sweep.name and "
                "sweep.storage_path"
            )
        # Finished trials stay finished; unfinished and errored ones go on from checkpoints.
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    objectives = cfg.tune.objective_modes()
    metric, mode = list(objectives), list(objectives.values())
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
    searcher = OptunaSearch(
        space=space.suggest,
        metric=metric,
        mode=mode,
        sampler=_sampler(cfg),
        points_to_evaluate=space.optuna_points() or None,
    )
    scheduler = None
    if cfg.tune.asha:
        scheduler = ASHAScheduler(
            time_attr="step",
            metric="val/fvu",
            mode="min",
            max_t=max_steps,
            grace_period=min(cfg.tune.grace_period, max_steps),
            reduction_factor=cfg.tune.reduction_factor,
        )
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
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=cfg.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=cfg.tune.verbose,
        ),
    )


def run_sweep(cfg: Config, resume: bool = False) -> SweepResult:
    """Extract (or reuse) the cache, run or resume the sweep, summarise it in MLflow.

    Ray must be initialised and cfg checked with check_sweep."""
    space = SearchSpace.from_config(cfg.search)
    started = time.time()
    ex = extract(cfg)
    tokens = ex.manifest["tokens_per_image"]
    sources, n_train = _layer_sources(cfg, ex.cache_dir, space.layers(), tokens)
    batch = cfg.train.batch_size * tokens
    max_steps = total_steps(cfg.train, n_train, min(batch, n_train))

    path = experiment_path(cfg)
    uri = cfg.sweep.resolved_tracking_uri()
    parent = tracking.start_sweep_run(
        uri,
        cfg.sweep.experiment or cfg.sweep.name,
        sweep_id=path,
        config=dataclasses.asdict(cfg),
        search_space=space.describe(),
        cache_key=ex.manifest["key"],
    )
    callback = tracking.MlflowTrialCallback(uri, parent)
    tuner = _tuner(cfg, space, _trainable(cfg, sources, tokens), max_steps, callback, resume)
    grid = tuner.fit()

    objectives = cfg.tune.objective_modes()
    best = tracking.log_sweep_summary(uri, parent, grid, objectives)
    tracking.finish_sweep_run(uri, parent, failed=any(r.error for r in grid))
    rows = _rows(grid, objectives)
    print(format_table(rows, objectives, limit=cfg.tune.show_top))
    n_err = sum(r["status"] == "ERROR" for r in rows)
    print(
        f"sweep {cfg.sweep.name}: {len(rows)} trials ({n_err} errored) in "
        f"{time.time() - started:.0f}s; results {path}"
    )
    print(mlflow_ui_hint(uri))
    return SweepResult(path, parent, uri, rows, best)


def _rows(grid, objectives: dict[str, str]) -> list[dict[str, Any]]:
    rows = []
    for r in grid:
        m = r.metrics or {}
        row = {
            "trial_id": m.get("trial_id", ""),
            "status": "ERROR" if r.error else ("DONE" if m.get("sae_dir") else "STOPPED"),
            **{c: r.config.get(c) for c in SUMMARY_COLUMNS},
            **{k: m.get(k) for k in ("val/fvu", "val/l0", "dead_frac", "step")},
            **{k: m.get(k) for k in objectives},
            "sae_dir": m.get("sae_dir"),
            "error": str(r.error).strip().splitlines()[-1] if r.error else "",
        }
        rows.append(row)
    first, mode = next(iter(objectives.items()))
    sign = 1 if mode == "min" else -1

    def key(row):
        v = row.get(first)
        ok = isinstance(v, (int, float)) and math.isfinite(v)
        return (row["status"] == "ERROR", not ok, sign * v if ok else 0.0)

    return sorted(rows, key=key)


def format_table(rows: list[dict], objectives: dict[str, str], limit: int = 10) -> str:
    cols = [
        "trial_id",
        "status",
        *SUMMARY_COLUMNS,
        *dict.fromkeys(["val/fvu", "val/l0", "dead_frac", *objectives]),
    ]
    cells = [[_fmt(row.get(c)) for c in cols] for row in rows[:limit]]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more trials (sae-sweep best --top N)")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, np.generic):
        return _fmt(v.item())
    return str(v)


def mlflow_ui_hint(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return (
            f"open the MLflow UI: mlflow ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
        )
    return f"open the MLflow UI at {uri} (through `ray dashboard` or an SSH tunnel on a cluster)"
