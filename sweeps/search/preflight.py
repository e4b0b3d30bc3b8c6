"""Everything checked before Ray starts (the data, the model's shape, devices, the tracking
store, the sweep's name), deleting a sweep for `--overwrite`, and, once Ray runs, whether a
trial fits on any node the cluster has or can launch."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import ray

from sweeps import storage
from sweeps.config import Config, ConfigError
from sweeps.redact import redact
from sweeps.search import study
from sweeps.space import SearchSpace
from sweeps.tracking import runs as tracking
from sweeps.tracking.store import TrackingError, check_tracking_uri

#: Config fields a resume may change: they only shape what the driver prints.
RESUMABLE_FIELDS = ("tune.show_top", "tune.verbose", "tune.checkpoint_interval_s")


class SweepLock:
    """One driver per sweep name: an exclusive flock on `.<name>.lock` beside the sweep's
    directory (in sweep.storage_path, or sweep.out_dir when that is a URI), held from the name
    check to the end of the run. The file names its holder, for the one who is refused."""

    def __init__(self, cfg: Config):
        root = (
            cfg.sweep.out_dir if storage.is_uri(cfg.sweep.storage_path) else cfg.sweep.storage_path
        )
        Path(root).mkdir(parents=True, exist_ok=True)
        self.path = Path(root, f".{cfg.sweep.name}.lock")
        self._file = open(self.path, "a+")  # never truncated before the lock is ours
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise ConfigError(
                f"sweep.name: sweep {cfg.sweep.name!r} is running ({holder}; lock "
                f"{self.path}): wait for it to end, or use another sweep.name"
            ) from None
        self._file.truncate(0)
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        self._file.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {since}")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing drops the flock; the file stays for the next holder


def check_sweep(cfg: Config, resume: bool = False, overwrite: bool = False) -> SweepLock:
    """Everything that can be checked before Ray starts: the data, the model's shape, devices,
    the tracking store, and whether the sweep exists (sweep) or matches its config (resume).
    Returns the sweep's lock, taken for the name check: hold it until the run ends."""
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
    _check_model_dir(cfg.model.name_or_path)
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
        check_tracking_uri(cfg.sweep.resolved_tracking_uri())
        tracking.check_experiment(cfg.sweep.resolved_tracking_uri(), cfg.sweep.experiment_name())
    except TrackingError as e:
        raise ConfigError(f"sweep.tracking_uri: {e}") from None
    if url := cfg.sweep.resolved_optuna_storage():  # creating nothing
        try:
            study.check_storage(url, cfg.sweep.name, owner=cfg.sweep.experiment_path())
        except ValueError as e:
            raise ConfigError(f"sweep.optuna_storage: {e} (or set it to none)") from None
    lock = SweepLock(cfg)
    try:
        _check_sweep_records(cfg, resume, overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


#: What a local checkpoint directory must hold: its config and its weights (one file or shards).
MODEL_FILES = ("config.json",)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _check_model_dir(name_or_path: str) -> None:
    # transformers reads an empty directory's config as the defaults (12 layers of 768) and
    # fails only when the weights load, after Ray started.
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ConfigError(
            f"model.name_or_path: {path} holds no {', '.join(missing)}: point it at a saved "
            "CLIPModel or CLIPVisionModel (save_pretrained), or a hub id"
        )


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
        if parent is None:
            raise ConfigError(
                f"sweep.name: sweep {cfg.sweep.name!r} has Tune state at {path} but no MLflow "
                f"run in experiment {cfg.sweep.experiment_name()!r} of "
                f"{cfg.sweep.resolved_tracking_uri()}: point sweep.tracking_uri at the store "
                "it was tracked in, or start it afresh with `sweep --overwrite`"
            )
        changed = tracking.config_changes(parent, dataclasses.asdict(cfg), RESUMABLE_FIELDS)
        if changed:
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


def delete_sweep(cfg: Config) -> Iterator[str]:
    """Delete a sweep's Tune state, SAEs, MLflow runs and Optuna study (for `sweep
    --overwrite` and `demo`), yielding what it is about to delete before each deletion, for
    the CLI to say."""
    path = cfg.sweep.experiment_path()
    uri = cfg.sweep.resolved_tracking_uri()
    # the sweep's own directory, one level below storage_path, or nothing
    inside = (
        storage.is_uri(path)
        or Path(path).resolve().parent == Path(cfg.sweep.storage_path).resolve()
    )
    if not inside or Path(path).name != cfg.sweep.name:
        raise ConfigError(
            f"--overwrite: {path} is not a sweep directory inside sweep.storage_path "
            f"{cfg.sweep.storage_path}: nothing deleted"
        )
    if storage.exists(path):
        yield f"Tune state and SAEs in {path}"
        storage.delete_dir(path)
    parent = tracking.find_sweep_run(uri, cfg.sweep.experiment_name(), path)
    if parent is not None:
        yield f"MLflow runs in experiment {cfg.sweep.experiment_name()!r}"
        tracking.delete_sweep_runs(uri, parent)
    url = cfg.sweep.resolved_optuna_storage()
    if url and study.owns_study(url, cfg.sweep.name, owner=path):
        yield f"Optuna study {cfg.sweep.name!r} in {redact(url)}"
        study.delete_study(url, cfg.sweep.name, owner=path)


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
