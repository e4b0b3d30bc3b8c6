"""The search space: each hyperparameter is fixed, a list of choices, or a range.

The space is define-by-run for Optuna: `suggest(trial)` asks for values one by one, so
auxk_alpha is only sampled in trials where `auxk` is on, and l0_coefficient only in JumpReLU
trials. `activation` and `auxk` are categorical switches beside the numeric PARAMS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from pydantic import with_config

from sae import architectures
from sae.config import CONFIG
from sweeps.vocabulary import NUMERIC_PARAMS, searched_fields

#: name -> (value type, log scale by default for ranges, lower bound, bound is exclusive), from
#: the one declaration of the searched hyperparameters (sweeps.vocabulary.Hyperparams)
PARAMS: dict[str, tuple[type, bool, float, bool]] = {
    f.name: (
        {"int": int, "float": float}[f.type],
        *map(f.metadata.get, ("log", "low", "exclusive")),
    )
    for f in searched_fields()
    if f.name in NUMERIC_PARAMS
}


@with_config(CONFIG)
@dataclass
class SearchConfig:
    """Search space. Each of lr, k, layer, expansion_factor, auxk_alpha and l0_coefficient is a
    value (fixed), a list (choices), or {low, high[, log][, step]} (a range; lr and
    l0_coefficient are log-scaled by default)."""

    lr: Any = field(default_factory=lambda: {"low": 1e-4, "high": 1e-2})
    """Adam learning rate."""

    k: Any = field(default_factory=lambda: [16, 32, 64])
    """Active latents per input."""

    layer: Any = 9
    """CLIP vision block whose output the SAE reads; must be among extract.layers."""

    expansion_factor: Any = field(default_factory=lambda: [4, 8])
    """Latents per input dimension."""

    auxk_alpha: Any = 1.0
    """Weight of the AuxK loss; only sampled when auxk is on."""

    auxk: Any = True
    """AuxK on (true), off (false), or searched ([true, false])."""

    activation: Any = "topk"
    """Sparsity rule: topk, batchtopk, matryoshka, jumprelu, or searched (e.g. [topk,
    jumprelu]); matryoshka's level widths are sae.matryoshka_fractions; a jumprelu trial's k is
    the L0 it aims at, and the L0 it reaches is measured."""

    l0_coefficient: Any = 1.0
    """Weight of JumpReLU's sparsity loss (train.l0_coefficient); only sampled in jumprelu
    trials."""

    points_to_evaluate: list[dict] = field(default_factory=list)
    """Known-good settings to try first, e.g. [{lr: 5e-4, k: 64, layer: 11}]."""

    def validate(self) -> None:
        SearchSpace.from_config(self)


@dataclass(frozen=True)
class Dim:
    """One hyperparameter: fixed (`values` of one), choices, or a range [low, high]."""

    name: str
    values: tuple = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def is_range(self) -> bool:
        return self.low is not None


def parse_dim(name: str, spec: Any) -> Dim:
    kind, log_default, bound, exclusive = PARAMS[name]
    where = f"search.{name}"

    def check_value(v):
        if isinstance(v, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                v = float(v)
            except ValueError:
                pass
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: {v!r} is not a number")
        if kind is int and v != int(v):
            raise ValueError(f"{where}: {v!r} must be a whole number")
        if not math.isfinite(v) or v < bound or (exclusive and v == bound):
            op = ">" if exclusive else ">="
            raise ValueError(f"{where}: {v!r} must be {op} {bound:g}")
        return kind(v)

    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step"}
        if unknown or "low" not in spec or "high" not in spec:
            raise ValueError(
                f"{where}: a range is {{low: .., high: .., log: bool, step: ..}} (got {spec!r})"
            )
        low, high = check_value(spec["low"]), check_value(spec["high"])
        if not low < high:
            raise ValueError(f"{where}: empty range, low={low} must be < high={high}")
        log = spec.get("log", log_default)
        if not isinstance(log, bool):
            raise ValueError(f"{where}.log: expected true or false, got {log!r}")
        if log and low <= 0:
            raise ValueError(f"{where}: a log range needs low > 0 (got {low})")
        step = spec.get("step")
        if isinstance(step, str):
            try:
                step = float(step)
            except ValueError:
                pass
        if step is not None:
            if log:
                raise ValueError(
                    f"{where}: a range takes step or log, not both (Optuna cannot step on a log "
                    f"scale); set log: false to use step: {step}"
                )
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
                raise ValueError(f"{where}.step: use a number > 0 (got {step!r})")
            if kind is int and step != int(step):
                raise ValueError(f"{where}.step: must be a whole number (got {step!r})")
        return Dim(name, low=low, high=high, log=log, step=step)
    if isinstance(spec, list):
        if not spec:
            raise ValueError(f"{where}: empty list of choices; give at least one value")
        return Dim(name, values=tuple(dict.fromkeys(check_value(v) for v in spec)))
    return Dim(name, values=(check_value(spec),))


@dataclass(frozen=True)
class SearchSpace:
    dims: dict[str, Dim]
    auxk: tuple[bool, ...]
    points_to_evaluate: tuple[dict, ...] = ()
    activation: tuple[str, ...] = ("topk",)

    @classmethod
    def from_config(cls, cfg: SearchConfig) -> SearchSpace:
        dims = {name: parse_dim(name, getattr(cfg, name)) for name in PARAMS}
        auxk = cfg.auxk if isinstance(cfg.auxk, list) else [cfg.auxk]
        if not auxk or not all(isinstance(a, bool) for a in auxk):
            raise ValueError(f"search.auxk: use true, false or [true, false] (got {cfg.auxk!r})")
        activation = cfg.activation if isinstance(cfg.activation, list) else [cfg.activation]
        if not activation or not all(a in architectures.names() for a in activation):
            raise ValueError(
                f"search.activation: use one or a list of {', '.join(architectures.names())} "
                f"(got {cfg.activation!r})"
            )
        switches = {"auxk", "activation"}
        for i, point in enumerate(cfg.points_to_evaluate):
            unknown = set(point) - set(PARAMS) - switches
            if unknown:
                raise ValueError(
                    f"search.points_to_evaluate[{i}]: unknown keys {sorted(unknown)}; "
                    f"use {sorted([*PARAMS, *switches])}"
                )
        space = cls(
            dims,
            tuple(dict.fromkeys(auxk)),
            tuple(cfg.points_to_evaluate),
            tuple(dict.fromkeys(activation)),
        )
        space.optuna_points()  # validates the points against the space
        space.dry_run()
        return space

    def dry_run(self) -> None:
        """Sample the space once in an in-memory Optuna study, so that what Optuna refuses is
        a config error before Ray starts rather than a trial failure after."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        try:
            self.suggest(study.ask())
        except (ValueError, TypeError) as e:
            raise ValueError(f"search: Optuna rejects the space: {e}") from None

    def bounds(self, name: str) -> tuple[float, float]:
        """Smallest and largest value a dimension can take."""
        d = self.dims[name]
        return (d.low, d.high) if d.is_range else (min(d.values), max(d.values))

    def layers(self) -> list[int]:
        d = self.dims["layer"]
        return list(range(int(d.low), int(d.high) + 1)) if d.is_range else list(d.values)

    def suggest(self, trial) -> dict[str, Any]:
        """Optuna define-by-run: sample the searched values, return the fixed ones."""
        fixed: dict[str, Any] = {}

        def ask(dim: Dim):
            if len(dim.values) == 1:
                fixed[dim.name] = dim.values[0]
            elif dim.values:
                trial.suggest_categorical(dim.name, list(dim.values))
            elif PARAMS[dim.name][0] is int:
                trial.suggest_int(
                    dim.name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log
                )
            else:
                trial.suggest_float(dim.name, dim.low, dim.high, step=dim.step, log=dim.log)

        for name in ("layer", "expansion_factor", "k", "lr"):
            ask(self.dims[name])
        if len(self.activation) == 1:
            activation = fixed["activation"] = self.activation[0]
        else:
            activation = trial.suggest_categorical("activation", [*self.activation])
        own = architectures.get(activation).searched
        for name in architectures.searched():  # another architecture's: 0 in this trial
            if name in own:
                ask(self.dims[name])
            else:
                fixed[name] = 0.0
        auxk = (
            self.auxk[0] if len(self.auxk) == 1 else trial.suggest_categorical("auxk", [*self.auxk])
        )
        if auxk:
            ask(self.dims["auxk_alpha"])
        else:
            fixed["auxk_alpha"] = 0.0
        return fixed

    def optuna_points(self) -> list[dict[str, Any]]:
        """points_to_evaluate as Optuna params: searched dimensions only, checked to lie in the
        space (a point cannot change a fixed value)."""
        out = []
        for i, point in enumerate(self.points_to_evaluate):
            where = f"search.points_to_evaluate[{i}]"
            params = {}
            for name, value in point.items():
                if name in ("auxk", "activation"):
                    choices = getattr(self, name)
                    if value not in choices:
                        raise ValueError(f"{where}: {name}={value!r} is not in {list(choices)}")
                    if len(choices) > 1:
                        params[name] = value
                    continue
                dim = self.dims[name]
                value = parse_dim(name, value).values[0]
                inside = (dim.low <= value <= dim.high) if dim.is_range else value in dim.values
                if not inside:
                    raise ValueError(f"{where}: {name}={value!r} lies outside search.{name}")
                if dim.is_range or len(dim.values) > 1:
                    params[name] = value
            out.append(params)
        return out

    def describe(self) -> dict[str, Any]:
        """A flat, loggable description of the space."""
        out: dict[str, Any] = {}
        for name, d in self.dims.items():
            out[name] = (
                f"[{d.low}, {d.high}]{' log' if d.log else ''}"
                if d.is_range
                else (d.values[0] if len(d.values) == 1 else list(d.values))
            )
        out["auxk"] = list(self.auxk) if len(self.auxk) > 1 else self.auxk[0]
        out["activation"] = (
            list(self.activation) if len(self.activation) > 1 else self.activation[0]
        )
        return out
