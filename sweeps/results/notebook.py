"""A sweep in a notebook: its trials as one pandas DataFrame, and a trial's SAE, read from its
MLflow store (through `best`'s readers) without starting Ray.

    from sweeps import load_sweep, load_sae
    df = load_sweep("runs/demo/config.yaml")   # one row per trial, best first
    sae = load_sae(df.iloc[0])                 # the best trial's TopKSae
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from sweeps import storage
from sweeps.config import Config, load_config
from sweeps.results.best import best_trials, why_no_sae
from sweeps.vocabulary import METRIC_KEYS, SEARCHED_PARAMS

#: Trial runs read at most: MLflow's own limit on one search.
MAX_TRIALS = 50_000


def load_sweep(config: str | Path | Config, overrides: Sequence[str] = ()) -> pd.DataFrame:
    """The sweep of a config file (or a Config) as a DataFrame, one row per trial, best first
    by its first objective (trials without a result last): `trial_id`, `status` (DONE,
    STOPPED by ASHA, FAILED, KILLED or RUNNING), every searched hyperparameter, the final
    metrics by their result keys (`val/fvu`, `val/l0`, `dead_frac`, ...), `sae_dir` (None
    without a final SAE), `run_id` (its MLflow run) and `error`. `overrides` are the CLI's
    `--set` values, e.g. ["sweep.out_dir=runs/other"]."""
    cfg = config if isinstance(config, Config) else load_config(config, list(overrides))
    records = best_trials(cfg, top=MAX_TRIALS, finished_only=False)
    # `lr` is also a metric (the schedule's last value): its column is the searched one
    found = {k for r in records for k in r.metrics} - set(SEARCHED_PARAMS)
    metrics = [k for k in METRIC_KEYS if k in found] + sorted(found - set(METRIC_KEYS))
    columns = ["trial_id", "status", *SEARCHED_PARAMS, *metrics, "sae_dir", "run_id", "error"]
    return pd.DataFrame([{c: r.value(c) for c in columns} for r in records], columns=columns)


def load_sae(row: Mapping, device: str = "cpu"):
    """The TopKSae of a trial: a row of `load_sweep` (or any mapping with its `sae_dir`); an
    SAE on a URI (s3://) is downloaded to a temporary directory first."""
    from sae import TopKSae

    sae_dir = row.get("sae_dir")
    if not isinstance(sae_dir, str) or not sae_dir:
        raise ValueError(
            f"trial {row.get('trial_id')} ({row.get('status')}) has no final SAE: "
            f"{why_no_sae(row.get('status'))}; pick a row whose sae_dir is set"
        )
    return TopKSae.load(storage.local_dir(sae_dir), device=device)
