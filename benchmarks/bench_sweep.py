"""Per-trial overhead of the sweep service: a sweep of short trials (one at a time, ASHA off) vs
the same trainings with `train_sae` in a plain loop, measured in one run.

overhead of a trial = its wall time on the driver - the time `train_sae` needs for the same
config in a plain loop. It holds Tune's scheduling, the object-store fetch of the layer, the
reports, checkpoints and MLflow logging.

    python benchmarks/bench_sweep.py [--trials 6] [--set section.field=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from sae import train_sae
from sweeps.activations import cache
from sweeps.activations.extract import extract
from sweeps.cli import DEMO_CONFIG, init_ray
from sweeps.config import load_config
from sweeps.demo import prepare_demo
from sweeps.search.driver import run_sweep, trial_settings
from sweeps.search.trial import trial_configs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials in the sweep")
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    model, images = prepare_demo(root / "assets")
    cfg = load_config(
        DEMO_CONFIG,
        [
            f"model.name_or_path={model}",
            f"data.path={images}",
            f"extract.cache_dir={root}/cache",
            f"sweep.out_dir={root}/out",
            "sweep.name=bench",
            f"tune.num_samples={args.trials}",
            "tune.asha=false",
            "tune.max_concurrent=1",
            "tune.verbose=0",
            *args.set,
        ],
    )
    init_ray(None)
    ex = extract(cfg)  # cached before timing: the sweep's extract is a cache hit

    result = run_sweep(cfg)
    # A trial's wall time as the driver sees it: its MLflow child run opens when the trial
    # starts and closes when it completes (actor start, data fetch, reports, checkpoints).
    client = MlflowClient(result.tracking_uri)
    runs = client.search_runs(
        [client.get_run(result.parent_run_id).info.experiment_id],
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{result.parent_run_id}'",
    )
    wall = {r.data.tags["trial_id"]: (r.info.end_time - r.info.start_time) / 1e3 for r in runs}

    # Ray gives each trial worker cpus_per_trial threads (OMP_NUM_THREADS); so does the loop.
    torch.set_num_threads(max(1, int(cfg.tune.cpus_per_trial)))
    fixed = trial_settings(cfg, ex.manifest["tokens_per_image"])
    split = (cfg.train.val_fraction, cfg.train.seed)
    print(f"\n{'trial':>9} {'trial wall s':>12} {'train_sae s':>11} {'overhead':>9}")
    overheads, ratios = [], []
    for row in result.rows:
        acts = cache.load_layer(ex.cache_dir, row.layer, "train", *split)
        val = cache.load_layer(ex.cache_dir, row.layer, "val", *split)
        sae_cfg, train_cfg = trial_configs(row.params, fixed)
        t = time.perf_counter()
        train_sae(acts, sae_cfg, train_cfg, val_acts=val)
        plain = time.perf_counter() - t
        trial_wall = wall[row.trial_id]
        overheads.append(trial_wall - plain)
        ratios.append((trial_wall - plain) / trial_wall)
        print(f"{row.trial_id:>9} {trial_wall:>12.2f} {plain:>11.2f} {ratios[-1]:>9.1%}")
    ray.shutdown()
    print(
        f"median overhead per trial: {statistics.median(overheads):.2f} s = "
        f"{statistics.median(ratios):.1%} of trial time (target <= 15%), "
        f"{len(ratios)} demo-sized trials ({cfg.train.epochs:g} epochs)"
    )


if __name__ == "__main__":
    main()
