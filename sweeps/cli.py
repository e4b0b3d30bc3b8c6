"""The `sae-sweep` command line: one function per subcommand."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import shlex
import signal
import socket
import sys
import threading
import types
import typing
from pathlib import Path

from sae.config import field_help
from sweeps import signals
from sweeps.config import (
    AnalyzeOptions,
    ConfigError,
    config_help,
    load_config,
    load_configs,
    save_config,
)
from sweeps.local_ray import join_ray, start_local_ray
from sweeps.progress import progress_bar
from sweeps.ranking import PickRule
from sweeps.redact import redact
from sweeps.tracking.store import TrackingError
from sweeps.vocabulary import check_model_name, check_name, leaderboard_url

DEMO_CONFIG = str(Path(__file__).parent / "configs" / "demo.yaml")


def check_ray_address(address: str) -> None:
    """Fail in seconds, not after Ray's minute of retries, when a cluster does not answer."""
    if address in ("auto", "local"):
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or hostport, int(port or 10001)), timeout=5).close()
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"Ray cluster at {address} cannot be reached ({e}); check the address and "
            "`ray status` on the head node, or unset RAY_ADDRESS to run locally"
        ) from None


def init_ray(address: str | None, verbose: bool = False) -> bool:
    """Connect to a cluster when an address is given (flag or RAY_ADDRESS), else start one;
    whether it started one. Ray's INFO logs reach the console only with --verbose."""
    import logging

    quiet = {}
    if not verbose:
        quiet = {"logging_level": logging.ERROR}
        for name in ("ray.data", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # On resume Tune warns of each trial that had not written a result yet (no
        # result.json): expected after an interruption, and the sweep's own lines say more.
        logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
        # Tune's "callbacks.on_trial_result operation took 7 s": MLflow's logging, said by
        # the sweep's own lines when it matters.
        logging.getLogger("ray.tune.utils.util").setLevel(logging.ERROR)
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
        join_ray(address, log_to_driver=verbose, **quiet)
        signals.catch()
        return False
    # Loopback only, with Ray's token: see sweeps/local_ray.py.
    start_local_ray(log_to_driver=verbose, **quiet)
    signals.catch()
    return True


#: What to do about an OS error, by errno.
OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or point sweep.out_dir elsewhere",
    errno.EDQUOT: "the disk quota is used up: free space or point sweep.out_dir elsewhere",
    errno.EACCES: "no permission: choose a directory you may write to",
    errno.EPERM: "no permission: choose a directory you may write to",
    errno.EROFS: "the file system is read-only: choose a writable directory",
    errno.ENOTDIR: "a file stands where a directory is needed: fix the path",
    errno.EISDIR: "a directory stands where a file is needed: fix the path",
    errno.ELOOP: "a symbolic link loops: fix the link or the path",
    errno.ENAMETOOLONG: "the path is too long: shorten it",
}


def describe_error(e: Exception) -> str:
    """One line on what went wrong and, where known, what to do."""
    if isinstance(e, OSError) and e.errno in OS_ADVICE:
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f)
        return f"{e.strerror}{': ' + where if where else ''} ({OS_ADVICE[e.errno]})"
    text = redact(" ".join(str(getattr(e, "message", None) or e).split()))  # MlflowException's
    kind = (
        "" if isinstance(e, (FileNotFoundError, ConnectionError, ValueError)) else type(e).__name__
    )
    return (
        f"{kind + ': ' if kind else ''}{text[:500]} (--debug shows the traceback)" if kind else text
    )


def cmd_extract(args: argparse.Namespace) -> int:
    from sweeps.activations.extract import extract

    cfg = load_config(args.config, args.set)
    address = args.address or os.environ.get("RAY_ADDRESS")
    with progress_bar("extract", "img", leave=False) as bar:
        result = extract(
            cfg,
            start_ray=lambda: init_ray(address, args.verbose),  # not on a cache hit
            in_process=False if address else None,  # a cluster's address: Ray Data
            progress=bar,
            verify=args.verify,
            rebuild=args.rebuild,
        )
    checked = " (every part matches its checksum)" if args.verify and result.reused else ""
    print(describe_extract(result) + checked)
    return 0


def describe_extract(result) -> str:
    """One line on what `extract` did."""
    m = result.manifest
    if result.reused:
        return f"extract: cache hit, no work done: {m['rows']} images in {result.cache_dir}"
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(m["skipped"].items())) or "none"
    return (
        f"extract: {m['rows']} images done, {sum(m['skipped'].values())} skipped ({skipped}), "
        f"{m['run']['images_per_s']:.1f} images/s, cache {result.cache_dir}"
    )


def _sweep(configs, args, resume: bool) -> list:
    """Check (taking each sweep's lock), then run or resume each config's sweep, printing its
    summary; the results."""
    from sweeps.results.plots import trial_plots
    from sweeps.search.console import SweepDisplay
    from sweeps.search.driver import run_sweep
    from sweeps.search.preflight import check_resources, check_sweep, delete_sweep

    overwrite = args.command == "demo" or getattr(args, "overwrite", False)
    locks = []  # one driver per sweep name, from the name check to the end of the run
    try:
        for cfg in configs:  # before Ray starts: no compute is spent on a config that cannot run
            print(f"sweep {cfg.sweep.name}: checking the config, data and stores", flush=True)
            locks.append(check_sweep(cfg, resume=resume, overwrite=overwrite))
        if overwrite:  # said before each deletion
            why = "demo: replacing the last demo" if args.command == "demo" else "--overwrite"
            for cfg in configs:
                for what in delete_sweep(cfg):
                    print(f"{why}: deleting sweep {cfg.sweep.name}'s {what}", flush=True)
        address = args.address or os.environ.get("RAY_ADDRESS")
        print(f"connecting to Ray at {address}" if address else "starting a local Ray", flush=True)
        local = init_ray(args.address, args.verbose)
        for cfg in configs:
            check_resources(cfg, local)
        results = []
        for cfg in configs:
            display = [] if cfg.tune.verbose else [SweepDisplay(cfg.tune.num_samples)]
            with progress_bar("extract", "img", leave=False) as bar:
                result = run_sweep(
                    cfg, resume=resume, callbacks=display, progress=bar, plots=trial_plots
                )
            _print_summary(cfg, result)
            if cfg.sweep.register_as and result.best:
                _register(cfg, cfg.sweep.register_as, run_id=None)
            results.append(result)
        return results
    finally:
        for lock in locks:
            lock.release()


def _print_summary(cfg, result) -> None:
    from sweeps.results.best import format_table, pick_note

    print(describe_extract(result.extraction))
    objectives = cfg.tune.objective_modes()
    print(format_table(result.rows, PickRule.from_tune(cfg.tune), limit=cfg.tune.show_top))
    print(pick_note(cfg, result.rows))
    n_controls = sum("control/fvu" in r.metrics for r in result.rows)
    if n_controls:
        share = n_controls / (n_controls + len(result.rows))
        print(
            f"controls: {n_controls} (tune.controls), each one trial's training: {share:.0%} "
            "of this sweep's training"
        )
    n_failed = sum(r.status == "FAILED" for r in result.rows)
    print(
        f"sweep {cfg.sweep.name}: {len(result.rows)} trials ({n_failed} failed) in "
        f"{result.elapsed_s:.0f}s; results {result.experiment_path}"
    )
    print(mlflow_ui_hint(result, objectives))
    if result.optuna_storage:
        print(optuna_dashboard_hint(result.optuna_storage))


def optuna_dashboard_hint(url: str) -> str:
    """How to open the sweep's Optuna study in optuna-dashboard."""
    import importlib.util

    line = f"Optuna dashboard: optuna-dashboard {redact(url)}"
    if importlib.util.find_spec("optuna_dashboard") is None:
        line += '  (install it: pip install optuna-dashboard, or the "dashboard" extra)'
    return line + "\n  then open http://127.0.0.1:8080"


def mlflow_ui_hint(result, objectives: dict[str, str]) -> str:
    """How to open the sweep's leaderboard in the MLflow UI."""
    metric, mode = next(iter(objectives.items()))
    uri = redact(result.tracking_uri)
    if uri.startswith("sqlite:"):
        url = leaderboard_url("http://127.0.0.1:5000", result.experiment_id, metric, mode)
        return f"MLflow UI: mlflow ui --backend-store-uri {uri}\n  then open {url}"
    url = leaderboard_url(uri, result.experiment_id, metric, mode)
    return f"MLflow UI: {url}\n  (on a cluster, through `ray attach -p` or an SSH tunnel)"


def _exit_code(results) -> int:
    return 0 if all(r.best for r in results) else 1


def _sets(args: argparse.Namespace) -> list[str]:
    return [*args.set, "tune.verbose=2"] if args.verbose else args.set


def _register(cfg, name: str, run_id: str | None) -> None:
    from sweeps.results.export import get_run, register_run

    version = register_run(cfg, get_run(cfg, run_id), name)
    uri = f"models:/{name}/{version.version}"
    print(f"registered {uri} (trial {version.tags.get('trial_id')}, {version.source})")
    print(
        f"  load it: mlflow.set_tracking_uri({redact(cfg.sweep.resolved_tracking_uri())!r}); "
        f"TopKSae.load(mlflow.artifacts.download_artifacts({uri!r}))"
    )


def _resume_hint(argv: list[str]) -> str:
    """The command that continues an interrupted `sweep` or `resume`: the same arguments."""
    rest = [a for a in argv[1:] if a != "--overwrite"]
    return "resume with: " + redact(shlex.join(["sae-sweep", "resume", *rest]))


def cmd_sweep(args: argparse.Namespace) -> int:
    return _exit_code(_sweep(load_configs(args.config, _sets(args)), args, resume=False))


def cmd_resume(args: argparse.Namespace) -> int:
    return _exit_code(_sweep(load_configs(args.config, _sets(args)), args, resume=True))


def cmd_demo(args: argparse.Namespace) -> int:
    from sweeps.demo import factor_scores, prepare_demo

    # The packaged demo config's paths are relative to where the command runs.
    cfg = load_config(args.config or DEMO_CONFIG, _sets(args), base=None if args.config else ".")
    prepare_demo(Path(cfg.model.name_or_path).parent)
    # The demo's config with its paths resolved, for `best`, `analyze` and `export`: the model
    # and images exist only now, so the config read them as hub ids (relative) on a first run.
    saved = save_config(cfg, Path(cfg.sweep.out_dir, "config.yaml"))
    args.interrupted = "resume with: " + shlex.join(["sae-sweep", "resume", "--config", str(saved)])
    (result,) = _sweep([cfg], args, resume=False)
    best = result.rows[0] if result.rows else None
    if best is None or not best.sae_dir:
        return _exit_code([result])
    print(f"best SAE: {best.sae_dir}")
    scores = factor_scores(
        best.sae_dir,
        result.cache_dir,
        best.layer,
        cfg.data.path,
        cfg.train.val_fraction,
        cfg.train.seed,
    )
    found = {k: v for k, v in scores.items() if v[1] >= 0.9}
    print(
        f"demo: {len(found)} of {len(scores)} image factors have a latent that picks them out "
        "(AUROC >= 0.9 on validation images): "
        + ", ".join(f"{k} (latent {latent})" for k, (latent, _) in found.items())
    )
    from sweeps.results.analyze import analyze

    # the best trial's report: what its latents respond to
    print(analyze(cfg, AnalyzeOptions()).headline())
    print(f"next: sae-sweep best --config {saved}  (or analyze, export)")
    return _exit_code([result])


def _check_store(cfg) -> None:
    """The tracking store answers, checked before `best`, `export` or `analyze` reads it:
    MLflow itself retries a store it cannot open for two minutes."""
    from sweeps.tracking.store import TrackingError, check_tracking_uri

    try:
        check_tracking_uri(cfg.sweep.resolved_tracking_uri())
    except TrackingError as e:
        raise ConfigError(f"sweep.tracking_uri: {e}") from None


def cmd_best(args: argparse.Namespace) -> int:
    from sweeps.results.best import (
        MAX_RANKED,
        best_trials,
        format_table,
        pick_note,
        sae_folder,
        why_no_sae,
    )

    if args.top < 1:
        raise ConfigError(f"--top (got {args.top}): list 1 or more trials")
    if args.register is not None:  # refused before anything is read
        check_model_name(args.register)
    for cfg in load_configs(args.config, args.set):
        _check_store(cfg)
        rows = best_trials(cfg, top=MAX_RANKED)  # the pick is chosen among all of them
        print(format_table(rows, PickRule.from_tune(cfg.tune), limit=args.top))
        if rows:
            print(pick_note(cfg, rows))
            best = rows[0]
            folder = sae_folder(cfg, best.trial_id, best.layer)
            print(f"best SAE: {best.sae_dir or 'none: ' + why_no_sae(best.status, folder)}")
            print(f"  in MLflow: {best.mlflow_uri}  (mlflow.artifacts.download_artifacts)")
            print("  load it: from sae import TopKSae; TopKSae.load(path)")
        if args.register is not None:
            _register(cfg, args.register, run_id=None)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sweeps.results.export import export_run, get_run, record_of, sparsify_loads

    cfg = load_config(args.config, args.set)
    _check_store(cfg)
    run = get_run(cfg, args.run_id)
    trial = run.data.tags.get("trial_id", run.info.run_id)
    out = args.out or Path(cfg.sweep.out_dir, "export", check_name(trial, "trial_id"))
    folder = export_run(cfg, run, out)
    print(f"exported {folder} (model card: {folder / 'README.md'})")
    print(f"  here:     TopKSae.load({str(folder)!r})")
    if sparsify_loads(record_of(run).params.activation):
        print(f"  sparsify: SparseCoder.load_many({str(folder.parent)!r}, local=True)")
    print(f"  SAELens:  SAE.load_from_disk({str(folder)!r})")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from sweeps.results.analyze import analyze

    fields = [f.name for f in dataclasses.fields(AnalyzeOptions)]
    opts = AnalyzeOptions(**{f: getattr(args, f) for f in fields if getattr(args, f) is not None})
    cfg = load_config(args.config, args.set)
    _check_store(cfg)
    print(analyze(cfg, opts).headline())
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give latent ids like 1,2,3") from None


def _analyze_flags() -> list[tuple[str, dict]]:
    """One flag per AnalyzeOptions field, its type from the annotation, its help the docstring."""
    helps, hints = field_help(AnalyzeOptions), typing.get_type_hints(AnalyzeOptions)
    flags = []
    for f in dataclasses.fields(AnalyzeOptions):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):  # X | None: X
            hint = next(h for h in typing.get_args(hint) if h is not type(None))
        kind = {int: int, list[int]: _int_list}.get(hint)  # str: argparse's own
        flags.append((f"--{f.name.replace('_', '-')}", {"type": kind, "help": helps[f.name]}))
    return flags


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: all defaults)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field (value parsed as YAML); repeatable",
    )
    parser.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or local)")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's logs and Tune's status tables instead of the progress bar",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error, not one line"
    )


class _Command(argparse.ArgumentParser):
    """A subcommand whose --help ends with every config field and its value in `fields_of`, a
    config file (None: the defaults). Read when help is shown, so running a command costs none
    of it."""

    fields_of: str | None = None

    def format_help(self) -> str:
        cfg = load_config(self.fields_of) if self.fields_of else None
        self.epilog = (
            "config fields (--set section.field=value; each in full in docs/configuration.md):\n"
            + config_help(cfg)
        )
        return super().format_help()


def _commands() -> dict[str, tuple]:
    """name: (its function, what it does, its own flags as (flag, add_argument's keywords))."""
    switch = {"action": "store_true"}
    verify = "on a cache hit, check every part against its checksum (reads the whole cache)"
    overwrite = "delete an existing sweep of the same name (Tune state, SAEs, MLflow runs) "
    register = "register the best trial's SAE as a new version of this MLflow model"
    return {
        "extract": (
            cmd_extract,
            "cache CLIP vision activations of a dataset",
            [
                ("--verify", switch | {"help": verify}),
                ("--rebuild", switch | {"help": "delete this config's cache and build it again"}),
            ],
        ),
        "demo": (cmd_demo, "the offline demo: a tiny CLIP, generated images, a real sweep", []),
        "sweep": (
            cmd_sweep,
            "extract when the cache is missing, then run the sweep",
            [("--overwrite", switch | {"help": overwrite + "before starting"})],
        ),
        "resume": (cmd_resume, "continue an interrupted sweep (same config)", []),
        "best": (
            cmd_best,
            "the top trials and where their SAEs are",
            [
                ("--top", {"type": int, "default": 5, "help": "how many trials to list"}),
                ("--register", {"metavar": "NAME", "help": register}),
            ],
        ),
        "export": (
            cmd_export,
            "write a trial's SAE for sparsify and SAELens, with a model card",
            [
                ("--run-id", {"help": "MLflow run of the trial (default: the best one)"}),
                (
                    "--out",
                    {"help": "output directory (default: <sweep.out_dir>/export/<trial id>)"},
                ),
            ],
        ),
        "analyze": (
            cmd_analyze,
            "latent statistics, top images, downstream checks, sweep plots",
            _analyze_flags(),
        ),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Command)
    for name, (func, text, flags) in _commands().items():
        cmd = sub.add_parser(
            name, help=text, description=text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        cmd.fields_of = DEMO_CONFIG if name == "demo" else None  # its help shows the demo's
        _common(cmd)
        for flag, options in flags:
            cmd.add_argument(flag, **options)
        cmd.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # What the console says when a signal stops the command; commands may say more.
    args.interrupted = "stopped before it finished; run the command again"
    if args.command in ("sweep", "resume"):
        args.interrupted = _resume_hint(argv)
    if not getattr(args, "verbose", False):
        # Tune's console output engine prints its header even when silent; the classic one,
        # at verbose=0, prints nothing. MLflow's INFO lines (creating tables) stay out too.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # Ctrl-C reaches this process rather than Tune's handler, which ended the sweep as if it
    # had finished (exit 0, parent FINISHED, a half-trained best trial).
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signals.catch()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        sig = signals.received()
        print(f"interrupted ({sig.name}): {args.interrupted}", file=sys.stderr)
        return 128 + sig
    except ConfigError as e:
        if args.debug:
            raise
        print(f"config error: {redact(str(e))}", file=sys.stderr)
        return 2
    except TrackingError as e:  # the tracking server stopped answering: the sweep's state kept
        if args.debug:
            raise
        hint = f"; {args.interrupted}" if args.command in ("sweep", "resume", "demo") else ""
        print(f"error: {redact(str(e))}{hint}", file=sys.stderr)
        return 2
    except Exception as e:  # a user's mistake or the environment's fault: one line, no traceback
        if args.debug:
            raise
        print(f"error: {describe_error(e)}", file=sys.stderr)
        return 2
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in handlers.items():
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
