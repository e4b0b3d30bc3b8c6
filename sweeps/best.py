"""`best`: the top trials of a sweep and where their SAEs are, read back from MLflow."""

from __future__ import annotations

from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from sweeps import storage
from sweeps.config import Config
from sweeps.tracking import final_name
from sweeps.trainable import final_sae_dir
from sweeps.tune import SUMMARY_COLUMNS, experiment_path, format_table


def sweep_parent(client: MlflowClient, cfg: Config):
    """The sweep's parent MLflow run, or None when this config's sweep never ran."""
    experiment = client.get_experiment_by_name(cfg.sweep.experiment or cfg.sweep.name)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id], f"tags.sweep_id = '{experiment_path(cfg)}'", max_results=1
    )
    return found[0] if found else None


def trial_sae_dir(cfg: Config, trial_id: str, layer: int) -> str | None:
    """A trial's final SAE: `sae/<trial_id>/layers.<L>`, or `sae/<trial_id>` itself where
    sweeps wrote it before they followed sparsify's folder convention; None when there is
    none (a trial stopped early)."""
    root = storage.join(experiment_path(cfg), "sae")
    for path in (final_sae_dir(root, trial_id, layer), storage.join(root, trial_id)):
        if storage.exists(storage.join(path, "cfg.json")):
            return path
    return None


def best_trials(cfg: Config, top: int = 5) -> list[dict]:
    """Finished trials of the sweep, best first by the first objective."""
    uri = cfg.sweep.resolved_tracking_uri()
    client = MlflowClient(uri)
    parent = sweep_parent(client, cfg)
    if parent is None:
        raise FileNotFoundError(
            f"no sweep {cfg.sweep.name!r} with results {experiment_path(cfg)} in MLflow store "
            f"{uri}: run `sae-sweep sweep` with this config first"
        )
    metric, mode = next(iter(cfg.tune.objective_modes().items()))
    order = f"metrics.{final_name(metric)} {'ASC' if mode == 'min' else 'DESC'}"
    runs = client.search_runs(
        [parent.info.experiment_id],
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}' and status = 'FINISHED'",
        order_by=[order],
        max_results=top,
    )
    rows = []
    for run in runs:
        trial_id = run.data.tags.get("trial_id", "")
        rows.append(
            {
                "trial_id": trial_id,
                "run_id": run.info.run_id,
                "status": "STOPPED" if run.data.tags.get("stopped_early") else "DONE",
                **{c: run.data.params.get(c) for c in SUMMARY_COLUMNS},
                **{k: run.data.metrics.get(final_name(k)) for k in ("val/fvu", "val/l0")},
                "dead_frac": run.data.metrics.get("dead_frac"),
                "sae_dir": trial_sae_dir(cfg, trial_id, int(run.data.params["layer"])),
                "mlflow_uri": f"runs:/{run.info.run_id}/sae",
            }
        )
    return rows


def print_best(rows: list[dict], cfg: Config) -> None:
    print(format_table(rows, cfg.tune.objective_modes(), limit=len(rows)))
    if rows:
        best = rows[0]
        print(f"best SAE: {best['sae_dir'] or '(stopped early: no final SAE)'}")
        print(f"  in MLflow: {best['mlflow_uri']}  (mlflow.artifacts.download_artifacts)")
        print("  load it: from sae import TopKSae; TopKSae.load(path)")
