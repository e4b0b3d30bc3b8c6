"""A corpus of bad inputs and faults, run through the CLI as a user meets them: each one ends
in one line that names the field or file and what to do, exit code 2, no traceback, and
before Ray starts (many once failed 20-40 s later, after Ray started, with a traceback)."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from sae import SaeConfig, TopKSae
from sweeps import cli
from sweeps.cli import DEMO_CONFIG, main


@pytest.fixture(scope="module")
def world(tmp_path_factory, demo_assets):
    """Files the bad inputs point at: a file, an empty model directory, a model directory
    without weights, damaged checkpoints, config files."""
    root = tmp_path_factory.mktemp("bad")
    (root / "afile").write_text("not a directory")
    (root / "empty-model").mkdir()
    (root / "config-only-model").mkdir()
    (root / "config-only-model" / "config.json").write_text("{}")
    TopKSae(32, SaeConfig(expansion_factor=2, k=4)).save(root / "sae")
    for name, edit in {
        "no-k": lambda c: c.pop("k"),
        "no-d_in": lambda c: c.pop("d_in"),
        "wide": lambda c: c.update(num_latents=16),
    }.items():
        TopKSae(32, SaeConfig(expansion_factor=2, k=4)).save(root / name)
        cfg = json.loads((root / name / "cfg.json").read_text())
        edit(cfg)
        (root / name / "cfg.json").write_text(json.dumps(cfg))
    files = {
        "empty.yaml": "",
        "comments.yaml": "# nothing but a comment\n",
        "list.yaml": "- model\n- data\n",
        "syntax.yaml": "model: {name_or_path: x\n",
        "tabs.yaml": "model:\n\tname_or_path: x\n",
        "unknown-section.yaml": "modle:\n  name_or_path: x\n",
        "bomb.yaml": _alias_bomb(),
        "two-docs.yaml": "sweep: {name: a}\n---\nsweep: {name: b}\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    sets = [f"--set={s}" for s in [*demo_assets, f"sweep.out_dir={root / 'out'}"]]
    # analyze reads the activation cache before the SAE: build it (in-process, no Ray)
    assert main(["extract", "--config", DEMO_CONFIG, *sets]) == 0
    # the store too, here: MLflow logs its creation where mlflow was imported before the CLI
    # could quiet it (in this test process, not a user's)
    from sweeps.tracking.client import mlflow_client

    mlflow_client(f"sqlite:///{root / 'out' / 'mlflow.db'}").search_experiments()
    return root, sets


def _alias_bomb() -> str:
    """427 bytes that expand to 9**9 values: once 69 s and 2.6 GB before failing."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(8):
        prev, me = chr(97 + i), chr(98 + i)
        lines.append(f"{me}: &{me} [{', '.join(['*' + prev] * 9)}]")
    return "bombs:\n" + "\n".join("  " + line for line in lines) + "\nsearch:\n  k: *i\n"


class _NotMlflow(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.end_headers()

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def not_mlflow():
    """Another HTTP server on the port (its 404 once passed for a tracking server)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotMlflow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# (id, command line after the command's --config/--set, what the one line must say)
SET_CASES = [
    ("inf epochs", ["train.epochs=.inf"], "train.epochs (got inf): use a finite number"),
    ("nan lr", ["search.lr=.nan"], "search.lr"),
    ("negative tune seed", ["tune.seed=-1"], "tune.seed (got -1): use a seed in 0..4294967295"),
    ("huge train seed", ["train.seed=18446744073709551616"], "train.seed"),
    ("huge data seed", ["data.seed=4294967296"], "data.seed"),
    ("negative data limit", ["data.limit=-5"], "data.limit"),
    ("zero fraction", ["data.fraction=0"], "data.fraction"),
    ("huge batch", ["train.batch_size=1e30"], "train.batch_size"),
    ("zero samples", ["tune.num_samples=0"], "tune.num_samples"),
    ("zero eval_every", ["train.eval_every=0"], "eval_every must be > 0"),
    ("negative warmup", ["train.lr_warmup_steps=-1"], "lr_warmup_steps"),
    ("unknown schedule", ["train.lr_schedule=exp"], "train.lr_schedule"),
    ("no validation", ["train.val_fraction=0"], "train.val_fraction"),
    ("all validation", ["train.val_fraction=1"], "val_fraction"),
    ("cuda without gpus", ["train.device=cuda"], "tune.gpus_per_trial"),
    ("cache_dir is a file", ["extract.cache_dir={root}/afile"], "is a file, not a directory"),
    ("unknown decoder", ["extract.decode=gpu"], "extract.decode"),
    ("out_dir is a file", ["sweep.out_dir={root}/afile"], "sweep.out_dir"),
    ("out_dir under a file", ["sweep.out_dir={root}/afile/x"], "is a file, not a directory"),
    ("storage is a file", ["sweep.storage_path={root}/afile"], "sweep.storage_path"),
    ("empty model dir", ["model.name_or_path={root}/empty-model"], "holds no config.json"),
    ("model without weights", ["model.name_or_path={root}/config-only-model"], "holds no"),
    ("missing data path", ["data.path={root}/nothing-here"], "data.path"),
    ("sqlite is a directory", ["sweep.tracking_uri=sqlite:///{root}"], "names a directory"),
    ("sqlite without a file", ["sweep.tracking_uri=sqlite://"], "sweep.tracking_uri"),
    ("unreachable server", ["sweep.tracking_uri=http://127.0.0.1:9"], "is not reachable"),
    ("not an mlflow server", ["sweep.tracking_uri={not_mlflow}"], "not an MLflow tracking"),
    ("unknown field", ["train.nope=1"], "unknown train field(s): nope"),
    ("unknown section", ["nope.x=1"], "nope"),
    ("wrong type", ["tune.num_samples=eight"], "expected an integer"),
    ("searched in sae", ["sae.k=3"], "sae.k is chosen per trial"),
    ("k above width", ["search.k=[8, 1000]", "search.expansion_factor=2"], "search.k reaches"),
    ("layer not cached", ["search.layer=[2, 7]"], "does not cache"),
    ("layer not in model", ["search.layer=[9]", "extract.layers=[9]"], "has layers 0..3"),
    ("empty range", ["search.lr={{low: 0.1, high: 0.01}}"], "search.lr: empty range"),
    ("bad activation", ["search.activation=relu"], "search.activation"),
    ("zero l0_coefficient", ["search.l0_coefficient=0"], "search.l0_coefficient: 0"),
    ("searched l0_coefficient in train", ["train.l0_coefficient=2"], "is chosen per trial"),
    ("negative bandwidth", ["sae.jumprelu_bandwidth=-0.1"], "jumprelu_bandwidth must be > 0"),
    ("negative jumprelu init", ["train.jumprelu_init_threshold=-1"], "jumprelu_init_threshold"),
    ("bad objective", ["tune.objectives=[val/fvu:max]"], "tune.objectives"),
    ("asha with pareto", ["tune.asha=true"], "tune.asha"),
    ("placeholder", ["sweep.storage_path=s3://REPLACE_ME-bucket/x"], "REPLACE_ME"),
    ("bad register name", ["sweep.register_as=a/b"], "sweep.register_as"),
    ("optuna storage not a URL", ["sweep.optuna_storage=optuna.db"], "sweep.optuna_storage"),
    ("optuna storage under a file", ["sweep.optuna_storage=sqlite:///{root}/afile/o.db"],
     "sweep.optuna_storage: Optuna storage sqlite:///"),
    ("unknown optuna database", ["sweep.optuna_storage=nodb://x/y"], "sweep.optuna_storage"),
]  # fmt: skip

FILE_CASES = [
    ("empty file", "empty.yaml", "holds no config"),
    ("comment-only file", "comments.yaml", "holds no config"),
    ("a list, not a mapping", "list.yaml", "a config is a mapping of sections"),
    ("YAML syntax error", "syntax.yaml", "invalid YAML"),
    ("tabs", "tabs.yaml", "YAML forbids tabs"),
    ("unknown section in a file", "unknown-section.yaml", "unknown config section(s): modle"),
    ("alias bomb", "bomb.yaml", "expands to more than 100000 values"),
    ("missing file", "no-such.yaml", "cannot read config file"),
]


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Every error here comes before Ray starts: reaching it fails the test."""

    def start(*args, **kwargs):
        pytest.fail("Ray was started: the error came too late")

    monkeypatch.setattr(cli, "init_ray", start)


def _one_line_error(argv, capsys, want: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert want in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("command", ["sweep", "resume"])
@pytest.mark.parametrize("case", SET_CASES, ids=[c[0] for c in SET_CASES])
def test_a_bad_value_is_one_line_before_ray(case, command, world, not_mlflow, capsys):
    root, sets = world
    _, values, want = case
    extra = [f"--set={v.format(root=root, not_mlflow=not_mlflow)}" for v in values]
    _one_line_error([command, "--config", DEMO_CONFIG, *sets, *extra], capsys, want)


@pytest.mark.parametrize("command", ["sweep", "extract", "best"])
@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_a_bad_config_file_is_one_line(case, command, world, capsys):
    root, _ = world
    _, name, want = case
    err = _one_line_error([command, "--config", str(root / name)], capsys, want)
    assert str(root / name) in err


def test_a_file_of_several_sweeps_is_refused_by_one_sweep_commands(world, capsys):
    root, _ = world
    _one_line_error(["export", "--config", str(root / "two-docs.yaml")], capsys, "holds 2 configs")


@pytest.mark.parametrize(
    "name, want",
    [
        ("no-k", "cfg.json lacks k"),
        ("no-d_in", "cfg.json lacks d_in"),
        ("wide", "does not match"),
        ("missing", "cfg.json is missing"),
    ],
)
def test_a_bad_checkpoint_for_analyze_is_one_line_naming_the_file(name, want, world, capsys):
    root, sets = world
    argv = ["analyze", "--config", DEMO_CONFIG, *sets, "--checkpoint", str(root / name)]
    argv += ["--layer", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert want in err and str(root / name) in err and err.count("\n") == 1, err


def test_an_unknown_run_id_for_export_is_one_line(world, capsys):
    root, sets = world
    assert main(["export", "--config", DEMO_CONFIG, *sets, "--run-id", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_debug_shows_the_traceback_the_one_line_hides(world):
    root, sets = world
    with pytest.raises(Exception, match="holds no config"):
        main(["sweep", "--config", str(Path(root) / "empty.yaml"), "--debug"])


def test_a_deleted_experiment_is_refused_before_ray_with_the_command_to_restore_it(world, capsys):
    from mlflow.tracking import MlflowClient

    root, sets = world
    uri = f"sqlite:///{root / 'out' / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    err = _one_line_error(
        ["sweep", "--config", DEMO_CONFIG, *sets, "--set=sweep.name=gone"], capsys, "is deleted"
    )
    assert "mlflow experiments restore --experiment-id" in err and uri in err


def test_resume_of_tune_state_without_its_mlflow_runs_says_so(world, capsys):
    """It once raised AttributeError: the records check read the missing parent run."""
    root, sets = world
    (root / "out" / "ray_results" / "orphan").mkdir(parents=True)
    (root / "out" / "ray_results" / "orphan" / "experiment_state-x.json").write_text("{}")
    argv = ["resume", "--config", DEMO_CONFIG, *sets, "--set=sweep.name=orphan"]
    err = _one_line_error(argv, capsys, "has Tune state at")
    assert "sweep --overwrite" in err


STORE_FAULTS = {
    "unreachable server": "http://127.0.0.1:9",
    "not an mlflow server": "{not_mlflow}",
    "sqlite is a directory": "sqlite:///{root}",
    "sqlite under a file": "sqlite:///{root}/afile/mlflow.db",
}


@pytest.mark.parametrize("command", ["sweep", "resume", "best", "export", "analyze"])
@pytest.mark.parametrize("fault", STORE_FAULTS, ids=list(STORE_FAULTS))
def test_every_command_meets_a_broken_tracking_store_with_one_line(
    command, fault, world, not_mlflow, capsys
):
    root, sets = world
    uri = STORE_FAULTS[fault].format(root=root, not_mlflow=not_mlflow)
    assert main([command, "--config", DEMO_CONFIG, *sets, f"--set=sweep.tracking_uri={uri}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def trial_runs(world):
    """A TopK and a JumpReLU trial run in the world's store, as a sweep logs them (trial_id
    tag, searched params, final metrics, the SAE under sae/): run id by activation."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    root, _ = world
    client = MlflowClient(f"sqlite:///{root / 'out' / 'mlflow.db'}")
    experiment = client.create_experiment("trials", artifact_location=str(root / "artifacts"))
    runs = {}
    for activation in ("topk", "jumprelu"):
        run_id = client.create_run(experiment, tags={"trial_id": activation}).info.run_id
        params = {"layer": 2, "k": 4, "expansion_factor": 2, "lr": 1e-3, "auxk_alpha": 0.03}
        params |= {"activation": activation, "l0_coefficient": 1.0 * (activation == "jumprelu")}
        metrics = [Metric(k, 0.5, 0, 0) for k in ("fvu", "l0", "dead_frac")]
        client.log_batch(run_id, metrics, [Param(k, str(v)) for k, v in params.items()])
        sae = root / f"{activation}-sae"
        TopKSae(64, SaeConfig(expansion_factor=2, k=4, activation=activation)).save(sae)
        client.log_artifacts(run_id, str(sae), "sae")
        client.set_terminated(run_id)
        runs[activation] = run_id
    return runs


@pytest.mark.parametrize("activation", ["topk", "jumprelu"])
def test_export_offers_sparsify_only_for_an_sae_sparsify_loads(
    activation, world, trial_runs, tmp_path, capsys
):
    """A JumpReLU export once printed a sparsify loader line, though sparsify refuses it."""
    root, sets = world
    argv = ["export", "--config", DEMO_CONFIG, *sets, "--run-id", trial_runs[activation]]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"SAE.load_from_disk('{tmp_path / 'layers.2'}')" in out
    assert ("SparseCoder" in out) == (activation == "topk"), out


def test_export_over_an_earlier_export_is_refused_and_loses_nothing(
    world, trial_runs, tmp_path, capsys
):
    """A second export to the same --out once overwrote the first's files with exit code 0."""
    root, sets = world
    argv = ["export", "--config", DEMO_CONFIG, *sets, "--out", str(tmp_path)]
    assert main([*argv, "--run-id", trial_runs["topk"]]) == 0
    folder = tmp_path / "layers.2"
    (folder / "NOTES.md").write_text("a user's notes")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    capsys.readouterr()
    err = _one_line_error([*argv, "--run-id", trial_runs["jumprelu"]], capsys, str(folder))
    assert "already exists" in err and "choose another --out, or delete that folder" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_export_prints_no_download_progress_bar(world, trial_runs, tmp_path):
    """MLflow drew its download bar on stderr. In its own process: tqdm reads TQDM_DISABLE,
    which the suite sets, when it is imported."""
    root, sets = world
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    argv = ["export", "--config", DEMO_CONFIG, *sets, "--run-id", trial_runs["topk"]]
    proc = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", *argv, "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and "exported" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr == ""


# (flags after `analyze --config ... --checkpoint <a good SAE>`, what the one line must say)
ANALYZE_CASES = [
    (["--batch-size", "0"], "--batch-size (got 0): use 1 or more"),
    (["--batch-size", "-8"], "--batch-size (got -8): use 1 or more"),
    (["--top-images", "0"], "--top-images (got 0): use 1 or more"),
    (["--top-latents", "-1"], "--top-latents (got -1): use 0 (every live latent) or more"),
    (["--downstream-images", "-1"], "--downstream-images (got -1): use 0 (skip the zero-shot"),
    (["--latents", "3,999"], "latents [999] do not exist: this SAE has 0..127"),
    (["--layer", "7"], "layer 7 is not in the activation cache (layers [2, 3])"),
]


@pytest.mark.parametrize("flags, want", ANALYZE_CASES, ids=[" ".join(c[0]) for c in ANALYZE_CASES])
def test_analyze_refuses_a_size_or_count_that_makes_no_sense(flags, want, world, tmp_path, capsys):
    """`--batch-size 0` was once accepted; each is refused before the scan, naming its flag."""
    root, sets = world
    TopKSae(64, SaeConfig(expansion_factor=2, k=4)).save(tmp_path / "sae")
    argv = ["analyze", "--config", DEMO_CONFIG, *sets, "--checkpoint", str(tmp_path / "sae")]
    argv += ["--layer", "2", *flags, "--out", str(tmp_path / "report")]
    _one_line_error(argv, capsys, want)
    assert not (tmp_path / "report").exists()


def test_analyze_refuses_an_sae_with_non_finite_weights(world, tmp_path, capsys):
    """An SAE whose weights held NaN was once analysed to `fvu nan` with exit code 0."""
    root, sets = world
    sae = TopKSae(64, SaeConfig(expansion_factor=2, k=4))
    with torch.no_grad():
        sae.W_dec.fill_(float("nan"))
    sae.save(tmp_path / "nan")
    argv = ["analyze", "--config", DEMO_CONFIG, *sets, "--checkpoint", str(tmp_path / "nan")]
    argv += ["--layer", "2", "--out", str(tmp_path / "report")]
    err = _one_line_error(argv, capsys, f"SAE {tmp_path / 'nan'} holds non-finite weights")
    assert "W_dec" in err
    assert not (tmp_path / "report").exists()
