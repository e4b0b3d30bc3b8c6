"""`best`: the top trials of a sweep and where their SAEs are, read back from MLflow."""

from __future__ import annotations

import numpy as np

from sweeps import storage
from sweeps.config import Config
from sweeps.schema import SEARCHED_PARAMS, final_name, final_sae_dir
from sweeps.trial_runs import finished_trial_runs


def trial_sae_dir(cfg: Config, trial_id: str, layer: int) -> str | None:
    """A trial's final SAE: `sae/<trial_id>/layers.<L>`, or `sae/<trial_id>` itself where
    sweeps wrote it before they followed sparsify's folder convention; None when there is
    none (a trial stopped early)."""
    root = storage.join(cfg.sweep.experiment_path(), "sae")
    for path in (final_sae_dir(root, trial_id, layer), storage.join(root, trial_id)):
        if storage.exists(storage.join(path, "cfg.json")):
            return path
    return None


def best_trials(cfg: Config, top: int = 5) -> list[dict]:
    """Finished trials of the sweep, best first by the first objective."""
    sweep = cfg.sweep
    uri = sweep.resolved_tracking_uri()
    metric, mode = next(iter(cfg.tune.objective_modes().items()))
    runs = finished_trial_runs(
        uri,
        sweep.experiment_name(),
        sweep.experiment_path(),
        final_name(metric),
        ascending=mode == "min",
        top=top,
    )
    if runs is None:
        raise FileNotFoundError(
            f"no sweep {sweep.name!r} with results {sweep.experiment_path()} in MLflow "
            f"store {uri}: run `sae-sweep sweep` with this config first"
        )
    rows = []
    for run in runs:
        trial_id = run.tags.get("trial_id", "")
        rows.append(
            {
                "trial_id": trial_id,
                "run_id": run.run_id,
                "status": "STOPPED" if run.tags.get("stopped_early") else "DONE",
                **{c: param_value(run.params.get(c)) for c in SEARCHED_PARAMS},
                **{k: run.metrics.get(final_name(k)) for k in ("val/fvu", "val/l0")},
                "dead_frac": run.metrics.get("dead_frac"),
                "sae_dir": trial_sae_dir(cfg, trial_id, int(run.params["layer"])),
                "mlflow_uri": f"runs:/{run.run_id}/sae",
            }
        )
    return rows


def param_value(text: str | None):
    """An MLflow param (always text) as the value it was: an int, a float, None, or the text."""
    if text is None or text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def format_table(rows: list[dict], objectives: dict[str, str], limit: int = 10) -> str:
    cols = [
        "trial_id",
        "status",
        *SEARCHED_PARAMS,
        *dict.fromkeys(["val/fvu", "val/l0", "dead_frac", *objectives]),
    ]
    if any(row.get("error") for row in rows[:limit]):
        cols.append("error")
    cells = [[_fmt(row.get(c)) for c in cols] for row in rows[:limit]]
    widths = [
        max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(cols)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths)).rstrip()]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
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
