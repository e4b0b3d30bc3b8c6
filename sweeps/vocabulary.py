"""The sweep's vocabulary, defined once: the parameters a sweep searches, the metric keys a
trial reports and their names in MLflow, the objectives, and where a trial's final SAE goes.
Every other module of the service reads these names from here. No Ray, no MLflow."""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae import architectures
from sae.architectures import Architecture
from sweeps import storage


def _searched(section: str, *, log=False, low=0.0, exclusive=False, default=dataclasses.MISSING):
    """A searched hyperparameter: the config section its value goes to ("" for the layer);
    for a number, whether a range of it is log-scaled by default, and its lower bound."""
    meta = {"section": section, "log": log, "low": low, "exclusive": exclusive}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True, kw_only=True)
class Hyperparams:
    """One trial's searched hyperparameters, typed: from Optuna's sample, Tune's config or
    MLflow's params (which are text) alike, through `from_values`.

    The one declaration of what a sweep searches, in the order tables show it: the search
    space's dimensions and bounds (`sweeps.space`), the fields a config may not fix
    (`sweeps.config.SEARCHED`), a trial's SAE and training configs and the leaderboard's
    columns derive from these fields. `search.<name>` gives each one's values."""

    layer: int = _searched("")
    activation: str = _searched("sae", default="topk")
    """The architecture's name (sae.architectures)."""
    k: int = _searched("sae", low=1)
    expansion_factor: int = _searched("sae", low=1)
    lr: float = _searched("train", log=True, exclusive=True)
    auxk_alpha: float = _searched("train", default=0.0)
    """0 where the search turned AuxK off (`search.auxk`)."""
    l0_coefficient: float = _searched("train", log=True, exclusive=True, default=0.0)
    """0 in trials of architectures that do not search it (JumpReLU does)."""

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Hyperparams:
        """The searched values of `values` as their fields' types."""
        kinds = {"int": int, "float": float, "str": str}
        typed = {}
        for f in dataclasses.fields(cls):
            v = values.get(f.name)
            if v is not None and v != "None":
                typed[f.name] = kinds[f.type](float(v) if f.type == "int" else v)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in typed
        ]
        if missing:
            raise ValueError(f"a trial's parameters lack {', '.join(missing)}: {dict(values)}")
        return cls(**typed)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> dict[str, Any]:
        """The values that go to the config section `name` (sae or train)."""
        return {f.name: getattr(self, f.name) for f in searched_fields(name)}


def searched_fields(section: str | None = None) -> tuple[dataclasses.Field, ...]:
    """The searched hyperparameters' fields, of one config section or all."""
    return tuple(
        f
        for f in dataclasses.fields(Hyperparams)
        if section is None or f.metadata["section"] == section
    )


#: Hyperparameters chosen per trial, in the order the summary table and `best` show them.
SEARCHED_PARAMS = tuple(f.name for f in searched_fields())

#: The searched parameters whose values are numbers (the others are named choices).
NUMERIC_PARAMS = tuple(f.name for f in searched_fields() if f.type != "str")

#: Result keys that come from evaluating the SAE (not the optimiser's state or the clock).
EVAL_KEYS = (
    "train/fvu",
    "val/fvu",
    "val/l0",
    "dead_frac",
    "val/never_fired_frac",
    "dense_frac",
    "val/probe_acc",
    "val/probe_acc_orig",
    "val/shrinkage",
)

#: Result keys of the final result only: the dictionary's shape, as
#: sae.metrics.dictionary_metrics names them (spelt out: this module loads no torch).
DICTIONARY_KEYS = (
    "decoder/max_cos",
    "decoder/pairs_over_0.9",
    *(
        f"density/{b}"
        for b in ("never", "below_1e-6", "1e-6", "1e-5", "1e-4", "1e-3", "1e-2", "1e-1")
    ),
)

#: Result keys logged as step metrics when a trial reports them; at the end of a trial also as
#: final metrics named by `final_name` ("val/fvu" -> "fvu").
#: A trial's margin over its control (an SAE trained alike with its decoder frozen at random),
#: logged to the trial's run after the sweep: control/fvu - val/fvu, val/probe_acc -
#: control/probe_acc. Positive: the trial learned more than an encoder alone can.
CONTROL_KEYS = ("control/fvu", "control/margin_fvu", "control/probe_acc", "control/margin_probe")

#: How alike a trial's decoder comes out with other seeds (tune.stability_seeds): the mean
#: over seeds of the Hungarian-matched cosine between decoder rows, in [0, 1].
STABILITY_KEYS = ("stability/decoder_mcc",)

METRIC_KEYS = (
    *EVAL_KEYS,
    *DICTIONARY_KEYS,
    *CONTROL_KEYS,
    *STABILITY_KEYS,
    "auxk_loss",
    "lr",
    "acts_per_s",
)

#: The metrics every summary of trials shows (the console, `best`, the MLflow leaderboard)
#: beside the objectives, with their short labels.
SUMMARY_METRICS = {"val/fvu": "fvu", "val/l0": "L0", "dead_frac": "dead"}

#: What to tick under Columns on the MLflow runs page to compare trials there: MLflow keeps
#: column choices in the browser, so a sweep cannot preset them.
RUNS_PAGE_COLUMNS = {"Metrics": tuple(SUMMARY_METRICS), "Parameters": ("layer", "k")}

#: Metrics a sweep may optimise, each with the only mode that makes sense for it.
OBJECTIVES = {
    "val/fvu": "min",
    "train/fvu": "min",
    "val/l0": "min",
    "dead_frac": "min",
    "val/never_fired_frac": "min",
    "dense_frac": "min",
    "val/probe_acc": "max",  # needs train.probe
    "acts_per_s": "max",
}


#: The result key of a finished trial's SAE directory.
SAE_DIR_KEY = "sae_dir"

#: The final result of a finished trial, written beside its SAE.
FINAL_METRICS = "metrics.json"

#: Each latent's firing frequency at the trial's last evaluation, written beside its SAE; the
#: driver draws `firing_frequency.png` from it (trial workers load no plotting library).
FREQUENCY_FILE = "firing_frequency.npy"


#: A name that becomes a directory or an MLflow name: letters, digits, '.', '_' and '-',
#: starting with a letter or digit (so never '.', '..', absolute or hidden).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX = 100


def check_name(value: str, where: str) -> str:
    """`value` if it is a safe name (NAME, at most NAME_MAX characters), else a ValueError that
    names `where` and the rule."""
    if isinstance(value, str) and NAME.fullmatch(value) and len(value) <= NAME_MAX:
        return value
    shown = (
        repr(value)
        if len(str(value)) <= 40
        else repr(str(value)[:40]) + f"... ({len(value)} characters)"
    )
    raise ValueError(
        f"{where} {shown} is not a name: use at most {NAME_MAX} letters, digits, '.', '_' or "
        "'-', starting with a letter or digit"
    )


def check_model_name(name: str, where: str = "cannot register model") -> str:
    """`name` if MLflow's model registry takes it, else a ValueError starting with `where`."""
    if not name.strip() or name != name.strip() or set(name) & set("/:"):
        raise ValueError(
            f"{where} {name!r}: give a name that is not empty, holds no '/' or ':' and neither "
            "starts nor ends with a space"
        )
    return name


def final_sae_dir(sae_root: str, trial_id: str, layer: int) -> str:
    """Where a trial's final SAE goes: `<sae_root>/<trial_id>/layers.<L>`, sparsify's folder
    convention, so `SparseCoder.load_many(<sae_root>/<trial_id>, local=True)` finds it."""
    return storage.join(sae_root, check_name(trial_id, "trial_id"), f"layers.{int(layer)}")


def default_tracking_uri(out_dir: str | Path) -> str:
    """The SQLite store under the sweep's output directory."""
    return f"sqlite:///{Path(out_dir).resolve() / 'mlflow.db'}"


#: sweep.optuna_storage's value that keeps no copy of the Optuna study.
NO_OPTUNA_STORAGE = "none"


def default_optuna_storage(out_dir: str | Path) -> str:
    """The SQLite database of the Optuna study's copy, beside the default MLflow store."""
    return f"sqlite:///{Path(out_dir).resolve() / 'optuna.db'}"


def leaderboard_url(server: str, experiment_id: str, metric: str, mode: str) -> str:
    """The MLflow UI's runs page of an experiment sorted by `metric`: sorted by a metric, it
    lists the trial runs flat, best first, instead of folding them under the sweep's run."""
    from urllib.parse import quote

    key = quote(f"metrics.`{metric}`", safe="")
    ascending = "true" if mode == "min" else "false"
    page = f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs"
    return f"{page}?orderByKey={key}&orderByAsc={ascending}"


def trial_label(config: Mapping[str, Any]) -> str:
    """A trial's hyperparameters in a few characters, `L9 k32 x8 lr3.2e-04 aux0.031` (a
    BatchTopK, Matryoshka or JumpReLU trial starts with its activation's name, and a JumpReLU
    trial ends with its l0_coefficient, `l0c1`): its MLflow run name, its line on the console
    and the leaderboard's."""
    parts = [
        fmt.format(config[key])
        for key, fmt in (("layer", "L{}"), ("k", "k{}"), ("expansion_factor", "x{}"))
        if key in config
    ]
    if "lr" in config:
        parts.append(f"lr{float(config['lr']):.1e}")
    if "auxk_alpha" in config:
        parts.append(f"aux{float(config['auxk_alpha']):.2g}")
    activation = str(config.get("activation", "topk"))
    if activation != "topk":  # the architecture, where not the default
        parts.insert(0, activation)
    label = architectures.registry().get(activation, Architecture).label
    parts += [f"{short}{float(config[p]):.2g}" for p, short in label.items() if p in config]
    return " ".join(parts)


def final_name(key: str) -> str:
    """Final metric name of a result key: "val/fvu" -> "fvu", "train/fvu" -> "train_fvu"."""
    return key.removeprefix("val/").replace("/", "_")


def is_num(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def format_value(v: Any) -> str:
    """A value as every table of the service shows it: 4 significant digits, "-" for none."""
    if v is None:
        return "-"
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):  # a numpy scalar
        v = v.item()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
