"""The sweep service's YAML config: one dataclass per section, read by pydantic
(`sae.config.from_dict`). Each field's docstring is its help text; its bounds and its own rule
(`sae.config.rule`) are in its annotation, checks across fields in `Config.validate`.

A config file is a mapping of sections (`model:`, `data:`, `extract:`) to fields; `--set
section.field=value` overrides take YAML values. Adding a section is adding a field to Config.
"""

from __future__ import annotations

import dataclasses
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import yaml
from annotated_types import Ge, Gt, Le
from pydantic import AfterValidator, with_config

from sae.config import (
    CONFIG,
    ConfigError,
    Count,
    Float,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    SaeConfig,
    Seed,
    TrainConfig,
    field_help,
    from_dict,
    rule,
)
from sweeps import storage
from sweeps.space import SearchConfig
from sweeps.vocabulary import (
    NO_OPTUNA_STORAGE,
    OBJECTIVES,
    check_model_name,
    check_name,
    default_optuna_storage,
    default_tracking_uri,
    searched_fields,
)

#: Fields set per trial by the search space, so not settable in the fixed sections: the
#: searched hyperparameters' (sweeps.vocabulary.Hyperparams), and num_latents, the width that
#: expansion_factor sets.
SEARCHED = {
    section: (*(f.name for f in searched_fields(section)), *extra)
    for section, extra in (("sae", ("num_latents",)), ("train", ()))
}


def fixed_fields(cfg: Config, section: str) -> dict:
    """A section's fields that every trial shares: all of them but those the search sets."""
    searched = SEARCHED.get(section, ())
    values = dataclasses.asdict(getattr(cfg, section))
    return {k: v for k, v in values.items() if k not in searched}


@with_config(CONFIG)
@dataclass
class SweepTrainConfig(TrainConfig):
    """The `train` section: the SAE library's training settings (the searched lr, auxk_alpha
    and l0_coefficient aside), and what the sweep measures beside them."""

    normalize_input: bool = True
    """Scale the activations to a mean squared norm of d_in, folded back into the saved
    weights. On in sweeps (off in the SAE library): they compare layers whose activation norms
    differ, and one lr range needs normalised input."""

    probe: bool = False
    """Sweeps on a cache with labels: at each evaluation also report val/probe_acc, the
    validation accuracy of a linear probe (fit once on the training images' activations) when
    it reads the SAE's reconstruction instead, and val/probe_acc_orig, when it reads the
    activations themselves. Costs one more pass over the validation split per evaluation."""

    def library_config(self, **values) -> TrainConfig:
        """The SAE library's TrainConfig of these settings, with `values` replacing fields."""
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        own = {k: v for k, v in dataclasses.asdict(self).items() if k in fields}
        return TrainConfig(**(own | values))


@with_config(CONFIG)
@dataclass
class ModelConfig:
    """The CLIP checkpoint whose vision activations are cached."""

    name_or_path: Annotated[str, rule(bool, "set a hub id or a local directory")] = (
        "openai/clip-vit-base-patch32"
    )
    """Hub id or local directory of a CLIPModel or CLIPVisionModel checkpoint."""

    revision: str | None = None
    """Hub revision (branch, tag or commit); null: the default branch."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Compute dtype on CUDA (auto: float16). CPU always computes in float32."""


@with_config(CONFIG)
@dataclass
class DataConfig:
    """Where the images come from."""

    source: Literal["hf", "folder", "parquet"] = "hf"
    """hf: a Hugging Face dataset; folder: a directory of images (class subdirectories give
    labels); parquet: Parquet files with an image column."""

    path: Annotated[str, rule(bool, "set the dataset name, directory or Parquet path")] = ""
    """hf: hub name or local save_to_disk directory; folder: the directory; parquet: a file, a
    directory or a glob."""

    config: str | None = None
    """hf: the dataset configuration name, if it has several."""

    split: str = "train"
    """hf: the split to read."""

    image_column: Annotated[str, rule(bool, "name the image column")] = "image"
    """hf/parquet: column holding the images (HF Image feature, bytes, or file paths)."""

    label_column: str | None = "label"
    """hf/parquet: integer label column; null when there are no labels (labels are -1)."""

    limit: Count = 0
    """Keep only the first this many selected rows (0: all)."""

    fraction: Annotated[Float, Gt(0), Le(1)] = 1.0
    """Keep this fraction of rows, chosen by a hash of the row id (stable across runs)."""

    seed: Seed = 0
    """Seed of the fraction's row hash."""


@with_config(CONFIG)
@dataclass
class ExtractConfig:
    """How the activation cache is built."""

    layers: Annotated[
        list[int],
        rule(
            lambda v: v and min(v) >= 0 and len(set(v)) == len(v),
            "give distinct layers >= 0, e.g. [7, 9, 11]",
        ),
    ] = field(default_factory=lambda: [9, 11])
    """Encoder blocks to cache (0-based; layer L = hidden_states[L + 1]), all in one forward."""

    token_mode: Literal["cls", "all"] = "cls"
    """cls: the class token only, (N, d); all: every token, (N, T, d)."""

    cache_dir: Annotated[
        str,
        rule(
            lambda v: "://" not in v,
            "a cache is published by renaming its directory, which object stores cannot do: use "
            "a directory every node mounts (NFS, e.g. EFS at /mnt/shared as in cluster.yaml)",
        ),
        DIRECTORY,
    ] = "cache"
    """Root of the content-addressed caches; shared storage (NFS/...) on a multi-node cluster."""

    cache_dtype: Literal["float16", "float32"] = "float16"
    """Storage dtype of the activations."""

    batch_size: PositiveInt = 64
    """Images per model forward (and per Parquet part)."""

    rows_per_task: PositiveInt = 128
    """Images decoded and preprocessed per CPU task (on Ray Data with GPUs)."""

    num_actors: PositiveInt = 1
    """Model actors on Ray Data (one model copy each); one machine without GPUs runs one model
    in the calling process instead."""

    num_gpus_per_actor: NonNegativeFloat | None = None
    """GPUs per model actor; null: 1 when the cluster has GPUs, else 0 (CPU)."""

    cpu_threads: Count = 0
    """Torch threads per model on CPU; 0: this machine's cores / num_actors on Ray Data, all of
    them in the calling process."""

    decode: Literal["auto", "device", "cpu"] = "auto"
    """Where images are decoded. device: on each model's GPU (nvJPEG through torchvision, other
    files on the CPU); cpu: in CPU processes (tasks ahead of GPU models); auto: device where
    the models get GPUs and torchvision imports, else cpu."""

    max_bad_fraction: Annotated[Float, Ge(0), Le(1)] = 0.01
    """Fail when more than this fraction of images is unusable (they are skipped below it)."""

    max_image_pixels: PositiveInt = 100_000_000
    """Images with more pixels (before or after resizing) are skipped as too_large."""


def _not_a_file(path: str) -> bool:
    """Whether a local directory field is one: it may not exist yet, but where it does (or any
    folder above it does), that is a directory, not a file. A URI is not local."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return "://" in path or p.is_dir()


DIRECTORY = rule(_not_a_file, "it, or a folder above it, is a file, not a directory")

#: The objectives a sweep can have: each metric with its one sensible mode.
_PAIRS = ", ".join(f"{m}:{mode}" for m, mode in OBJECTIVES.items())


def _known(objective: str) -> str:
    """The objective if it is a metric with its mode, else a ValueError that names it."""
    metric, _, mode = objective.rpartition(":")
    if OBJECTIVES.get(metric) != mode:
        raise ValueError(
            f"tune.objectives (got {objective!r}): give metric:mode pairs from {_PAIRS}"
        )
    return objective


@with_config(CONFIG)
@dataclass
class TuneConfig:
    """How Ray Tune runs the trials."""

    num_samples: PositiveInt = 8
    """Trials to run."""

    max_concurrent: PositiveInt = 2
    """Trials running at once (Optuna proposes the next from the finished ones). At 1 a seed
    gives the same sweep on the same machine; above, the order in which trials report, which
    Optuna and ASHA act on, depends on the machine's timing."""

    cpus_per_trial: PositiveFloat = 1.0
    """CPUs reserved per trial."""

    gpus_per_trial: Annotated[
        Float,
        rule(
            lambda v: 0 <= v <= 1,
            "use 0 (CPU), a fraction to share a GPU, or 1: a trial trains on one GPU",
        ),
    ] = 0.0
    """GPUs per trial; fractions share a GPU between trials (0.25: four per GPU)."""

    seed: Seed = 0
    """Seed of the Optuna sampler."""

    sampler: Literal["tpe", "nsga2"] = "tpe"
    """Optuna sampler: tpe (multivariate; multi-objective too) or nsga2."""

    objectives: Annotated[
        list[str],
        rule(bool, "give at least one metric:mode pair"),
        AfterValidator(lambda v: list(map(_known, v))),
    ] = field(default_factory=lambda: ["val/fvu:min", "val/l0:min"])
    """metric:mode pairs; several give a Pareto front. The default, reconstruction against
    sparsity, cannot be won by width or k alone."""

    max_dead_frac: Annotated[Float, Gt(0), Le(1)] = 0.2
    """Largest share of latents never fired on validation rows (1: any). Above it a trial is
    infeasible: a constraint for Optuna's sampler, never the pick."""

    pick_l0: Annotated[
        list[Float],
        rule(
            lambda b: b == [] or (len(b) == 2 and 0 <= b[0] < b[1]),
            "give [low, high] with 0 <= low < high (e.g. [20, 200]), or [] for no band",
        ),
    ] = field(default_factory=list)
    """[low, high]: pick the lowest val/fvu with val/l0 in it; []: of all feasible trials.
    The rule is in docs/sweeps.md, 'The pick'."""

    controls: Count = 1
    """Trials of the feasible front, the pick first, that get a control after the sweep: an
    SAE trained alike with its decoder frozen at random (each costs one trial; 0: none)."""

    stability_seeds: Count = 0
    """Other seeds to retrain the pick with after the sweep (0: none). The front too, as far
    as tune.controls reaches; stability/decoder_mcc, the Hungarian-matched decoder cosine
    between seeds, goes to each one's run."""

    asha: bool = False
    """Stop trials early with ASHA (one objective only, e.g. [val/fvu:min]). With several,
    ASHA would cut the sparse trials of the front."""

    grace_period: PositiveInt = 100
    """ASHA: optimizer steps every trial runs before it can be stopped."""

    reduction_factor: Annotated[int, Ge(2)] = 2
    """ASHA: keep the best 1/reduction_factor of trials at each rung."""

    max_failures: Count = 2
    """Retries of a failed trial, each from its last checkpoint."""

    checkpoint_interval_s: NonNegativeFloat = 60.0
    """Least seconds between saves of a trial's training state. The SAE and Adam's state are
    saved at an eval (see train.checkpoint_every) to <storage_path>/<name>/trial_state: a
    retried or resumed trial goes on from there and redoes at most this much work. 0: at
    every eval."""

    data: Literal["auto", "object_store", "cache"] = "auto"
    """How trials get activations: object_store, cache or auto. object_store: the driver
    loads each layer once and shares it. cache: trials read batches from an uncompressed copy
    of the layer that each node writes once from extract.cache_dir, which must be shared
    storage ($SAE_ARRAY_DIR or the temp directory holds it). auto: cache for all-token layers,
    which can outgrow memory, and when extract.cache_dir is on a network file system such as
    a cluster's NFS/EFS; else object_store. Never from which nodes happen to be up."""

    show_top: PositiveInt = 10
    """Trials in the summary table."""

    verbose: Annotated[int, Ge(0), Le(2)] = 0
    """Console output: 0 a progress bar and a line per trial event; 1 Tune's status tables;
    2 also every result (the --verbose flag)."""

    def objective_modes(self) -> dict[str, str]:
        """{metric: mode} of `objectives`, in order."""
        return dict(o.rsplit(":", 1) for o in self.objectives)


@with_config(CONFIG)
@dataclass
class SweepConfig:
    """Names and places of a sweep's results."""

    # Names become paths (the Tune experiment, the SAEs) and MLflow names: identifiers only, so
    # that none reaches outside the sweep's own directory (`--overwrite` deletes it).
    name: Annotated[str, AfterValidator(lambda v: check_name(v, "sweep.name"))] = "sweep"
    """Sweep name: the Tune experiment directory and the MLflow experiment."""

    out_dir: Annotated[str, rule(bool, "give a directory"), DIRECTORY] = "runs"
    """Local output directory (Tune results and the MLflow SQLite store by default)."""

    storage_path: Annotated[str, DIRECTORY] = ""
    """Tune's storage and the final SAEs: a directory (on a cluster, shared by every node, e.g.
    NFS) or a URI such as s3://bucket/sweeps; empty: <out_dir>/ray_results."""

    tracking_uri: str = ""
    """MLflow tracking URI; empty: $MLFLOW_TRACKING_URI when set, else the head's `mlflow
    server` on a cluster (the address cluster/prepare-head.sh writes to ~/.clip-sae/tracking_uri),
    else sqlite:///<out_dir>/mlflow.db."""

    experiment: Annotated[
        str, AfterValidator(lambda v: v and check_name(v, "sweep.experiment"))
    ] = ""
    """MLflow experiment; empty: the sweep name."""

    optuna_storage: Annotated[
        str,
        rule(
            lambda u: not u or u.strip().lower() == NO_OPTUNA_STORAGE or "://" in u,
            "give an SQLAlchemy URL such as sqlite:////abs/path/optuna.db, or none",
        ),
    ] = ""
    """Optuna RDB storage for a copy of the sweep's study, which optuna-dashboard opens. An
    SQLAlchemy URL such as sqlite:////abs/optuna.db (a relative
    sqlite:///optuna.db is resolved where the command runs) or postgresql://user@host/db;
    empty: sqlite:///<out_dir>/optuna.db, beside the default MLflow store; none: no copy. A
    writable database of its own, not MLflow's; a sweep writes and deletes only the study it
    created (a study of the same name made elsewhere is refused)."""

    register_as: Annotated[
        str, AfterValidator(lambda v: v and check_model_name(v, "sweep.register_as"))
    ] = ""
    """At the end of `sweep`, `resume` and `demo`, register the best trial's SAE in MLflow's
    model registry under this name (a new version each time); empty: register nothing."""

    def experiment_name(self) -> str:
        return self.experiment or self.name

    def experiment_path(self) -> str:
        """The sweep's Tune experiment: an absolute directory or a URI (s3://...)."""
        return storage.join(self.storage_path, self.name)

    def resolved_tracking_uri(self) -> str:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        uri = self.tracking_uri or env or _cluster_tracking_uri()
        return uri or default_tracking_uri(self.out_dir)

    def resolved_optuna_storage(self) -> str:
        """The URL of the study's copy, or "" for none."""
        if self.optuna_storage.strip().lower() == NO_OPTUNA_STORAGE:
            return ""
        return self.optuna_storage or default_optuna_storage(self.out_dir)


@with_config(CONFIG)
@dataclass
class Config:
    """A whole config file: one attribute per section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sae: SaeConfig = field(default_factory=SaeConfig)
    train: SweepTrainConfig = field(default_factory=SweepTrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        for section, name in PATH_FIELDS:  # `~/x` is the user's; readers do not expand it
            body, value = getattr(self, section), getattr(getattr(self, section), name)
            setattr(body, name, os.path.expanduser(value) if isinstance(value, str) else value)
        # Storage must be absolute for Ray; resolve local paths against where the command runs.
        storage = self.sweep.storage_path or str(Path(self.sweep.out_dir) / "ray_results")
        self.sweep.storage_path = storage if "://" in storage else str(Path(storage).resolve())
        # So is the study copy's relative SQLite file (sqlite:///rel/optuna.db).
        name, sep, query = self.sweep.optuna_storage.removeprefix("sqlite:///").partition("?")
        relative = name and not name.startswith(("/", ":memory:", "file:"))
        if self.sweep.optuna_storage.startswith("sqlite:///") and relative:
            self.sweep.optuna_storage = f"sqlite:///{Path(name).resolve()}{sep}{query}"

    def validate(self) -> None:
        """pydantic's checks of every field's type, bounds and rule (again after
        `from_mapping`'s, for a Config built in Python), then those across fields and on disk."""
        from_dict(type(self), dataclasses.asdict(self), where="")
        for section in dataclasses.fields(self):  # a value copied from a cluster YAML or README
            for name, value in dataclasses.asdict(getattr(self, section.name)).items():
                fix = f"replace the placeholder {PLACEHOLDER}... with your own value"
                _check(PLACEHOLDER not in str(value), f"{section.name}.{name}", fix, value)
        for section in ("sae", "search"):  # the SAE library's and the search's own
            try:
                getattr(self, section).validate()
            except ValueError as e:
                raise ConfigError(re.sub(rf"^(?!{section}\.)", f"{section}.", str(e))) from None
        objectives = self.tune.objectives
        asha = "ASHA stops trials on one metric, which would cut trials on the Pareto front of "
        fix = asha + "several objectives: set tune.asha=false for a multi-objective sweep"
        _check(not (self.tune.asha and len(objectives) > 1), "tune.asha", fix, True)
        probed = [o for o in objectives if o.startswith("val/probe_acc")]
        fix = "val/probe_acc is reported only with train.probe=true"
        _check(self.train.probe or not probed, "tune.objectives", fix, probed)


# Here, not in analyze.py: the CLI builds its parser from these before it quiets MLflow's
# logging, and importing analyze.py loads MLflow, torch and matplotlib.
@with_config(CONFIG)
@dataclass
class AnalyzeOptions:
    """What `analyze` looks at; the CLI flags of the same names."""

    run_id: str | None = None
    """MLflow run id of the trial to analyse (default: the sweep's best trial)."""

    checkpoint: str | None = None
    """An SAE checkpoint directory to analyse instead of a trial."""

    layer: int | None = None
    """Layer a --checkpoint SAE reads (default: its trial's layer, or the cache's only layer)."""

    latents: list[int] = field(default_factory=list)
    """Latents whose top images are shown, e.g. 1,2,3 (default: --top-latents)."""

    top_latents: Annotated[int, rule(lambda v: v >= 0, "use 0 (every live latent) or more")] = 0
    """Latents whose top images are shown when --latents is not given: the top N by
    --criterion (0: every live latent). The report lists every latent either way."""

    criterion: str = "max_act"
    """How latents are ranked: max_act, mean_act (when firing) or frequency."""

    top_images: Annotated[int, rule(lambda v: v >= 1, "use 1 or more")] = 16
    """Top-activating images shown per latent."""

    batch_size: Annotated[int, rule(lambda v: v >= 1, "use 1 or more")] = 1024
    """Inputs per encode batch (tokens in all-token mode; whole images); memory grows with it
    and the SAE's width, not with the dataset."""

    downstream_images: Annotated[
        int, rule(lambda v: v >= 0, "use 0 (skip the zero-shot check) or more")
    ] = 1000
    """Validation images for the zero-shot check, stratified by class (0: skip it)."""

    class_names: str = ""
    """Readable class names for the zero-shot prompts: a JSON file mapping the dataset's label
    names (e.g. ImageNet WNIDs) to names, or a text file with one name per label, in label
    order (default: the dataset's label names)."""

    prompts: str = "a photo of a {}."
    """Zero-shot prompt templates, separated by |, or "ensemble" for the CLIP paper's 7
    ImageNet templates."""

    out: str = ""
    """Output directory (default: <sweep.out_dir>/analysis/<trial id or checkpoint name>)."""

    def validate(self) -> None:
        """Types and each field's rule; the errors name the flags (--top-images, ...)."""
        try:
            from_dict(type(self), dataclasses.asdict(self), where="")
        except ConfigError as e:
            flag = re.sub(r"^\w+", lambda m: "--" + m[0].replace("_", "-"), str(e))
            raise ConfigError(flag) from None


#: Marks a value the cluster YAMLs leave for the user to fill in (a bucket, a file system).
PLACEHOLDER = "REPLACE_ME"

#: Written by cluster/prepare-head.sh on a cluster's head: the address of its MLflow server, for
#: sweeps started there however they are launched (`ray job submit`, `ray submit`, `ray exec`).
CLUSTER_TRACKING_FILE = "~/.clip-sae/tracking_uri"


def _cluster_tracking_uri() -> str:
    path = Path(CLUSTER_TRACKING_FILE).expanduser()
    return path.read_text().strip() if path.is_file() else ""


def _check(ok: bool, name: str, fix: str, value=dataclasses.MISSING) -> None:
    if not ok:
        got = "" if value is dataclasses.MISSING else f" (got {value!r})"
        raise ConfigError(f"{name}{got}: {fix}")


def to_mapping(cfg: Config) -> dict:
    """cfg as a config file holds it, which `from_mapping` reads back: without the sections'
    fields that the search sets per trial."""
    values = dataclasses.asdict(cfg)
    return values | {name: fixed_fields(cfg, name) for name in SEARCHED}


def from_mapping(values: dict, where: str = "") -> Config:
    """Build and validate a Config from a config file's sections (`where`: the file); unknown
    sections and fields are errors that list the valid ones."""
    sections = [f.name for f in dataclasses.fields(Config)]
    if unknown := sorted(set(values) - set(sections)):
        where += ": " if where else ""
        raise ConfigError(
            f"{where}unknown config section(s): {', '.join(unknown)}; valid: {', '.join(sections)}"
        )
    for section, searched in SEARCHED.items():
        for name in set(searched) & set(values.get(section) or ()):
            fix = f"is chosen per trial: set it under search.{name}"
            if name == "num_latents":
                fix = "is the width search.expansion_factor sets: set that"
            raise ConfigError(f"{section}.{name} {fix}")
    cfg = from_dict(Config, {k: {} if v is None else v for k, v in values.items()}, where="")
    cfg.validate()
    return cfg


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Apply `section.field=value` strings (value parsed as YAML) to a raw config mapping."""
    for item in overrides:
        target, sep, raw = item.partition("=")
        section, _, name = target.strip().partition(".")
        _check(
            bool(sep and section and name), f"override {item!r}", "write it as section.field=value"
        )
        if values.get(section) is None:  # absent, or a section left empty in the file
            values[section] = {}
        body = values[section]
        _check(isinstance(body, dict), f"section {section}", "give a mapping of fields")
        try:
            body[name] = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return values


def _read_yaml(path: Path) -> list:
    """The YAML documents of a config file, empty ones left out; syntax errors name the file,
    line and column."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        detail = ", ".join(filter(None, [getattr(e, "context", None), problem]))
        hint = " (indent with spaces: YAML forbids tabs)" if "'\\t'" in problem else ""
        raise ConfigError(f"{where}: invalid YAML: {detail}{hint}") from None
    fix = "nested YAML aliases? A config is a few sections of fields"
    _check(not _too_big(docs, MAX_VALUES), f"{path} expands to more than {MAX_VALUES} values", fix)
    fix = "write its sections (model:, data:, sweep:, ...), or leave out --config for all defaults"
    _check(bool(docs), f"{path} holds no config (it is empty or only comments)", fix)
    return docs


#: More values than any config holds: a few aliases nested 9 deep expand to billions.
MAX_VALUES = 100_000


def _too_big(value, limit: int) -> bool:
    """Whether `value` holds more than `limit` values once its aliases are expanded; stops
    counting there, so an alias bomb costs at most `limit` steps."""
    stack, seen = [value], 0
    while stack and seen <= limit:
        v = stack.pop()
        seen += 1
        stack += (
            [*v.keys(), *v.values()] if isinstance(v, dict) else v if isinstance(v, list) else []
        )
    return seen > limit


def load_configs(
    path: str | Path | None,
    overrides: list[str] = (),
    base: str | Path | None = None,
    one: bool = False,
) -> list[Config]:
    """Every YAML document of a file as a validated Config (None: one all-defaults config).

    A file may hold several sweeps separated by `---` (seed-models.yaml does); overrides apply
    to each. Relative paths in the file resolve against `base`, by default the file's directory,
    so a command finds the same sweep from any directory; paths in overrides resolve against
    the current directory. one: the file must hold exactly one document."""
    docs = _read_yaml(Path(path)) if path is not None else [{}]
    _check(not one or len(docs) == 1, f"{path} holds {len(docs)} configs", "this command takes one")
    base = Path(base if base is not None else Path(path).parent if path is not None else ".")
    configs = []
    for i, values in enumerate(docs):
        where = f"{path} (document {i + 1})" if len(docs) > 1 else str(path or "")
        _check(isinstance(values, dict), where, "a config is a mapping of sections (model:, ...)")
        _resolve_paths(values, base.resolve())
        configs.append(from_mapping(apply_overrides(values, list(overrides)), where))
    return configs


#: Fields holding local paths; (section, field) -> whether the value may instead be a hub id,
#: in which case it is resolved only when the file's directory holds it.
PATH_FIELDS = {
    ("model", "name_or_path"): True,
    ("data", "path"): True,
    ("extract", "cache_dir"): False,
    ("sweep", "out_dir"): False,
    ("sweep", "storage_path"): False,
}


def _resolve_paths(values: dict, base: Path) -> None:
    for (section, name), maybe_hub in PATH_FIELDS.items():
        body = values.get(section)
        value = body.get(name) if isinstance(body, dict) else None
        if not value or not isinstance(value, str) or "://" in value or value[0] in "/~":
            continue  # ~: the user's home, which Config expands
        resolved = base / value
        if not maybe_hub or resolved.exists() or value.startswith(("./", "../")):
            body[name] = str(resolved)


def save_config(cfg: Config, path: Path) -> Path:
    """Write cfg as a config file that loads again from any directory: the searched fields
    left out (to_mapping), and every path field that names something here made absolute."""
    values = to_mapping(cfg)
    for (section, name), _ in PATH_FIELDS.items():
        value = values[section][name]
        if value and "://" not in value and Path(value).expanduser().exists():
            values[section][name] = str(Path(value).expanduser().resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def load_config(
    path: str | Path | None, overrides: list[str] = (), base: str | Path | None = None
) -> Config:
    """Read a one-document YAML config (None: all defaults), apply overrides, validate."""
    (config,) = load_configs(path, overrides, base, one=True)
    return config


def config_help(cfg: Config | None = None, width: int = 100) -> str:
    """Every `section.field` with its value in `cfg` (default: the defaults) and the first
    sentence of its help, wrapped to `width`, for the CLI; docs/configuration.md has the rest."""
    cfg, lines = cfg or Config(), []
    for section in dataclasses.fields(cfg):
        body = getattr(cfg, section.name)
        lines.append(f"{section.name}:")
        for name, text in field_help(type(body)).items():  # every field has help (a test)
            first = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
            text = f"{section.name}.{name} = {getattr(body, name)!r}: {first}"
            lines += textwrap.wrap(text, width, initial_indent="  ", subsequent_indent="      ")
    return "\n".join(lines)
