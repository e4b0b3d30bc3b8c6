"""Every figure the service draws, as PNG files: a trial's firing frequencies and a sweep's
Pareto front, FVU against each hyperparameter, best trial per layer and parameter importances."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sweeps.ranking import pareto_front  # noqa: E402
from sweeps.vocabulary import FREQUENCY_FILE, NUMERIC_PARAMS  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frequency_histogram(frequency_M: np.ndarray, path: Path) -> Path:
    """Histogram of log10 firing frequency; dead latents (never fired) counted in the title."""
    live = frequency_M[frequency_M > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(live):
        ax.hist(np.log10(live), bins=50, color="#4477aa")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{len(frequency_M) - len(live)} dead of {len(frequency_M)} latents")
    return _save(fig, path)


def trial_plots(sae_dir: Path) -> list[Path]:
    """The plots of a trial's final SAE, drawn beside it from the data the trial left there."""
    data = sae_dir / FREQUENCY_FILE
    if not data.exists():
        return []  # a trial of an older sweep, which drew its plot itself
    return [frequency_histogram(np.load(data), sae_dir / "firing_frequency.png")]


def pareto_plot(trials: list[dict], path: Path) -> Path:
    """Validation FVU against L0 (left) and k (right); the FVU/L0 Pareto front joined."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    layers = sorted({t["layer"] for t in trials})
    for layer in layers:
        mine = [t for t in trials if t["layer"] == layer]
        for ax, x in ((left, "l0"), (right, "k")):
            ax.scatter(
                [t[x] for t in mine], [t["fvu"] for t in mine], label=f"layer {layer}", alpha=0.8
            )
    front = [trials[i] for i in pareto_front(trials, {"fvu": "min", "l0": "min"})]
    front.sort(key=lambda t: t["l0"])
    left.plot([t["l0"] for t in front], [t["fvu"] for t in front], "k--", lw=1, label="Pareto")
    left.set_xlabel("validation L0")
    right.set_xlabel("k")
    right.set_xscale("log", base=2)
    for ax in (left, right):
        ax.set_ylabel("validation FVU")
        ax.legend(fontsize=7)
    return _save(fig, path)


def fvu_vs_params(trials: list[dict], path: Path) -> Path:
    """Validation FVU against each hyperparameter; trials stopped early drawn hollow."""
    fig, axes = plt.subplots(
        1, len(NUMERIC_PARAMS), figsize=(3 * len(NUMERIC_PARAMS), 3), sharey=True
    )
    for ax, name in zip(axes, NUMERIC_PARAMS):
        for stopped, style in ((False, {}), (True, {"facecolors": "none", "edgecolors": "C0"})):
            mine = [t for t in trials if t["stopped"] == stopped and t[name] is not None]
            ax.scatter([t[name] for t in mine], [t["fvu"] for t in mine], **style)
        if name == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(name)
    axes[0].set_ylabel("validation FVU")
    return _save(fig, path)


def importance_plot(importances: dict[str, float], path: Path) -> Path:
    """Optuna's parameter importances for validation FVU."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * max(len(names), 1)))
    ax.barh(names, [importances[n] for n in names], color="#228833")
    ax.set_xlabel("importance for validation FVU (fANOVA)")
    return _save(fig, path)


def best_per_layer(trials: list[dict], path: Path) -> Path:
    """The best trial's validation FVU at each layer, labelled with its k and width."""
    best = {}
    for t in trials:
        if t["layer"] not in best or t["fvu"] < best[t["layer"]]["fvu"]:
            best[t["layer"]] = t
    layers = sorted(best)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(layers)), 3.5))
    bars = ax.bar([str(la) for la in layers], [best[la]["fvu"] for la in layers], color="#aa3377")
    labels = [f"k={best[la]['k']} x{best[la]['expansion_factor']}" for la in layers]
    ax.bar_label(bars, labels, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("best validation FVU")
    return _save(fig, path)
