"""Hand-off to other tools: sparsify's folder convention, SAELens's layout, MLflow's registry.

One tiny sweep through the CLI, as a user runs it, with `sweep.register_as`; then `best
--register` and `export`. Each tool loads the result and must give our latents.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from sae import SaeConfig, TopKSae, TrainConfig, architectures, train_sae
from sae.saelens import save_saelens
from sweeps.cli import DEMO_CONFIG, main
from sweeps.config import ConfigError, load_config
from sweeps.results.best import best_trials
from sweeps.results.export import export_run, get_run
from tests.test_sweep import cli, overrides

sparsify = pytest.importorskip("sparsify")

NAME = "interop"
LAYER = 3


def _dense(sae: TopKSae, x):
    acts, idx = sae.encode(x)
    return torch.zeros(len(x), sae.num_latents).scatter_(1, idx, acts)


def _assert_same_latents(ours: TopKSae, theirs) -> None:
    """sparsify's SparseCoder gives our latents and reconstruction."""
    x = torch.randn(32, ours.d_in)
    enc = theirs.encode(x)
    dense = torch.zeros(len(x), ours.num_latents).scatter_(1, enc.top_indices, enc.top_acts)
    torch.testing.assert_close(dense, _dense(ours, x))
    torch.testing.assert_close(
        theirs.decode(enc.top_acts, enc.top_indices), ours(x).sae_out, rtol=1e-5, atol=1e-5
    )


@pytest.fixture(scope="module")
def swept(demo_assets, tmp_path_factory):
    """A 2-trial sweep on layer 3 that registers its best trial at the end, then `best
    --register` (a second version) and `export`; returns (out dir, cfg, logs by command)."""
    out = tmp_path_factory.mktemp("interop") / "out"
    sets = [
        "tune.num_samples=2",
        "tune.asha=false",
        "train.epochs=2",
        "train.eval_every=20",
        "search.layer=3",
        "tune.verbose=0",
        "train.probe=true",  # the downstream metric, from the object store's labels
    ]
    args = overrides(demo_assets, out, NAME, *sets)
    proc = cli(["sweep", "--set", "sweep.register_as=clip-sae", "--config", DEMO_CONFIG, *args])
    logs = {"sweep": proc.communicate(timeout=600)[0]}
    assert proc.returncode == 0, logs["sweep"]
    # These two start no Ray: the same command lines, run in this process.
    commands = {
        "best": ["best", "--register", "clip-sae"],
        "export": ["export", "--out", str(out / "exported")],
    }
    for command, argv in commands.items():
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            assert main([*argv, "--config", DEMO_CONFIG, *args]) == 0
        logs[command] = printed.getvalue()
    cfg = load_config(DEMO_CONFIG, [a for a in args if a != "--set"])
    return out, cfg, logs


def _best(cfg):
    (row,) = best_trials(cfg, top=1)
    return row


def test_a_trial_sae_sits_in_a_layers_folder_that_sparsify_load_many_finds(swept):
    out, cfg, _ = swept
    trials = sorted((out / "ray_results" / NAME / "sae").iterdir())
    assert len(trials) == 2
    for trial in trials:
        assert [p.name for p in trial.iterdir()] == [f"layers.{LAYER}"]
        ours = TopKSae.load(trial / f"layers.{LAYER}")
        cfg_json = json.loads((trial / f"layers.{LAYER}" / "cfg.json").read_text())
        assert cfg_json["num_latents"] == ours.num_latents == ours.d_in * ours.cfg.expansion_factor
        loaded = sparsify.SparseCoder.load_many(str(trial), local=True)
        assert list(loaded) == [f"layers.{LAYER}"]
        assert loaded[f"layers.{LAYER}"].num_latents == ours.num_latents
        _assert_same_latents(ours, loaded[f"layers.{LAYER}"])
    assert _best(cfg).sae_dir == str(
        out / "ray_results" / NAME / "sae" / _best(cfg).trial_id / f"layers.{LAYER}"
    )


def test_a_trial_in_the_old_layout_stays_readable(swept):
    """Sweeps before the layers.<L> folders wrote the SAE in the trial directory itself."""
    _, cfg, _ = swept
    best = _best(cfg)
    new = Path(best.sae_dir)
    old = new.parent
    for f in list(new.iterdir()):
        shutil.move(f, old / f.name)
    new.rmdir()
    try:
        assert _best(cfg).sae_dir == str(old)
        TopKSae.load(_best(cfg).sae_dir)
    finally:
        new.mkdir()
        for f in [p for p in old.iterdir() if p.is_file()]:
            shutil.move(f, new / f.name)
    assert _best(cfg).sae_dir == str(new)


def test_best_trial_is_registered_at_the_end_and_by_best_and_loads_back(
    swept, monkeypatch, tmp_path
):
    out, cfg, logs = swept
    uri = cfg.sweep.resolved_tracking_uri()
    assert "registered models:/clip-sae/1" in logs["sweep"]
    assert "registered models:/clip-sae/2" in logs["best"]
    client = MlflowClient(uri)
    versions = sorted(
        client.search_model_versions("name = 'clip-sae'"), key=lambda v: int(v.version)
    )
    assert [int(v.version) for v in versions] == [1, 2]
    best = _best(cfg)
    run = client.get_run(best.run_id)
    for v in versions:
        assert v.run_id == best.run_id
        assert v.tags["sweep"] == NAME and v.tags["trial_id"] == best.trial_id
        assert v.tags["layer"] == str(LAYER)
        for key in ("k", "expansion_factor"):
            assert v.tags[key] == run.data.params[key]
        for key in ("fvu", "l0", "dead_frac"):
            assert float(v.tags[key]) == pytest.approx(run.data.metrics[key], rel=1e-5)

    # The one call the README documents, against the SQLite store.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    folder = Path(mlflow.artifacts.download_artifacts("models:/clip-sae/2", dst_path=tmp_path))
    registered = TopKSae.load(folder)
    trained = TopKSae.load(best.sae_dir)
    for (name, a), (_, b) in zip(trained.state_dict().items(), registered.state_dict().items()):
        assert torch.equal(a, b), name
    assert "# TopK SAE:" in (folder / "README.md").read_text()
    _assert_same_latents(trained, sparsify.SparseCoder.load_from_disk(folder))


def test_export_writes_a_model_card_and_a_folder_sparsify_loads(swept):
    out, cfg, logs = swept
    best = _best(cfg)
    folder = out / "exported" / f"layers.{LAYER}"
    assert f"exported {folder}" in logs["export"]
    card = (folder / "README.md").read_text()
    run = MlflowClient(cfg.sweep.resolved_tracking_uri()).get_run(best.run_id)
    for text in (
        cfg.model.name_or_path,
        f"layer {LAYER}",
        "`hidden_states[4]`",
        "**Token mode:** `cls`",
        f"folder `{cfg.data.path}`",
        f"| FVU (fraction of variance unexplained) | {run.data.metrics['fvu']:.4g} |",
        f"| L0 (active latents per input) | {run.data.metrics['l0']:.4g} |",
        f"| dead fraction (never fired on validation) | {run.data.metrics['dead_frac']:.4g} |",
        f"| k | {run.data.params['k']} |",
        f"trial `{best.trial_id}`",
        "SparseCoder.load_from_disk",
        "SAE.load_from_disk",
    ):
        assert text in card, text
    trained = TopKSae.load(best.sae_dir)
    loaded = sparsify.SparseCoder.load_many(str(out / "exported"), local=True)
    assert list(loaded) == [f"layers.{LAYER}"]
    _assert_same_latents(trained, loaded[f"layers.{LAYER}"])


def test_saelens_loads_the_export_with_equal_latents(swept):
    sae_lens = pytest.importorskip("sae_lens")
    out, cfg, _ = swept
    folder = out / "exported" / f"layers.{LAYER}"
    ours = TopKSae.load(folder)
    theirs = sae_lens.SAE.load_from_disk(str(folder))  # the default loader
    assert theirs.cfg.architecture() == "topk"
    assert (theirs.cfg.d_in, theirs.cfg.d_sae, theirs.cfg.k) == (
        ours.d_in,
        ours.num_latents,
        ours.cfg.k,
    )
    meta = theirs.cfg.metadata
    assert meta.model_name == cfg.model.name_or_path
    assert meta.hook_name == f"blocks.{LAYER}.hook_resid_post"
    assert meta.hf_hook_name == f"encoder.layers.{LAYER}"
    x = torch.randn(64, ours.d_in)
    with torch.no_grad():
        latents = theirs.encode(x)
        torch.testing.assert_close(latents, _dense(ours, x))
        torch.testing.assert_close(theirs.decode(latents), ours(x).sae_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka", "jumprelu"])
def test_saelens_loads_a_batchtopk_sae_as_jumprelu_with_equal_latents(tmp_path, activation):
    """A trained BatchTopK or Matryoshka SAE opens in SAELens as the JumpReLU SAE SAELens
    itself saves after training either, a JumpReLU SAE as itself, and each gives our latents
    and reconstruction."""
    sae_lens = pytest.importorskip("sae_lens")
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(batch_size=100, steps=200, lr=3e-3, eval_every=200, normalize_input=True)
    ours = train_sae(3 * x, SaeConfig(num_latents=64, k=4, activation=activation), cfg).sae
    assert (ours.threshold > 0).all()
    if activation == "jumprelu":  # one threshold per latent, learnt apart
        assert ours.threshold.shape == (64,) and len(set(ours.threshold.tolist())) > 32
    save_saelens(ours, tmp_path / "layers.0", {"hook_name": "blocks.0.hook_resid_post"})
    torch.testing.assert_close(TopKSae.load(tmp_path / "layers.0").threshold, ours.threshold)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "layers.0"))
    assert theirs.cfg.architecture() == "jumprelu"
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (ours.d_in, ours.num_latents)
    x = 3 * torch.randn(64, ours.d_in)
    with torch.no_grad():
        latents = theirs.encode(x)
        assert 0 < (latents > 0).sum(1).float().mean() < ours.num_latents / 2
        torch.testing.assert_close(latents, _dense(ours, x))
        torch.testing.assert_close(theirs.decode(latents), ours(x).sae_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka", "jumprelu"])
def test_sparsify_refuses_what_it_has_no_architecture_for(tmp_path, activation):
    """sparsify has no BatchTopK, Matryoshka or JumpReLU: it must not load them as TopK."""
    TopKSae(16, SaeConfig(num_latents=64, k=4, activation=activation)).save(tmp_path)
    with pytest.raises(TypeError, match=f"Expected one of .*got {activation}"):
        sparsify.SparseCoder.load_from_disk(tmp_path)


def test_train_probe_reports_probe_accuracies_at_every_evaluation(swept):
    _, cfg, _ = swept
    client = MlflowClient(cfg.sweep.resolved_tracking_uri())
    run = client.get_run(_best(cfg).run_id)
    for key in ("probe_acc", "probe_acc_orig"):  # final metrics, as for fvu
        assert 0 <= run.data.metrics[key] <= 1
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/fvu")]
    for key in ("val/probe_acc", "val/probe_acc_orig"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == steps
    orig = {m.value for m in client.get_metric_history(run.info.run_id, "val/probe_acc_orig")}
    assert len(orig) == 1  # one probe, fit once, on the same images


def test_saelens_export_refuses_an_sae_it_cannot_express(tmp_path):
    sae = TopKSae(8, SaeConfig(expansion_factor=2, k=2))
    sae.register_buffer("input_scale", torch.ones(8))
    with pytest.raises(ValueError, match="cannot express this SAE .*tensor input_scale"):
        save_saelens(sae, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_a_model_name_mlflow_refuses_is_a_config_error_before_any_sweep():
    with pytest.raises(ConfigError, match="sweep.register_as 'sweeps/best': .* holds no '/'"):
        load_config(DEMO_CONFIG, ["sweep.register_as=sweeps/best"])


def test_a_probe_objective_without_train_probe_is_a_config_error():
    with pytest.raises(ConfigError, match="tune.objectives.*only with train.probe=true"):
        load_config(DEMO_CONFIG, ["tune.objectives=[val/probe_acc:max]"])
    load_config(DEMO_CONFIG, ["tune.objectives=[val/probe_acc:max]", "train.probe=true"])


def test_export_of_a_run_that_is_no_trial_says_so(swept):
    _, cfg, _ = swept
    parent = MlflowClient(cfg.sweep.resolved_tracking_uri()).get_run(_best(cfg).run_id)
    parent_id = parent.data.tags["mlflow.parentRunId"]
    with pytest.raises(ValueError, match=f"run {parent_id} is not a trial of a sweep"):
        get_run(cfg, parent_id)


@pytest.mark.timeout(900)
def test_a_sweep_over_every_architecture_hands_each_sae_to_saelens(demo_assets, tmp_path):
    """`search.activation: [topk, batchtopk, matryoshka, jumprelu]` through the CLI: each
    trial's SAE loads back here, and in SAELens with our latents; the run names, params and
    leaderboard name each architecture, and a JumpReLU trial's L0 is the one it reached."""
    sae_lens = pytest.importorskip("sae_lens")
    out = tmp_path / "out"
    archs = ["topk", "batchtopk", "matryoshka", "jumprelu"]
    sets = [
        *demo_assets,
        f"sweep.out_dir={out}",
        "sweep.name=archs",
        "tune.num_samples=4",
        "tune.asha=false",
        "train.epochs=2",
        "search.layer=2",
        f"search.activation=[{', '.join(archs)}]",
        "search.points_to_evaluate=[" + ", ".join(f"{{activation: {a}}}" for a in archs) + "]",
    ]
    # its own process, as a user runs it: this one may hold the suite's Ray already
    proc = cli(["sweep", "--config", DEMO_CONFIG, *[f"--set={s}" for s in sets]])
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log
    assert "l0_coefficient" in log  # the summary table shows JumpReLU's weight
    cfg = load_config(DEMO_CONFIG, sets)
    done = best_trials(cfg, top=10)
    assert sorted(r.params.activation for r in done) == sorted(archs)
    for record in done:
        ours = TopKSae.load(record.sae_dir)
        x = torch.randn(32, ours.d_in)
        assert ours.cfg.activation == record.params.activation
        folder = save_saelens(ours, tmp_path / record.trial_id / "layers.2", {})
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), _dense(ours, x))
    # The MLflow run, its params and the leaderboard name each trial's architecture; a
    # JumpReLU trial logs the l0_coefficient it trained with and the L0 it reached.
    client = MlflowClient(cfg.sweep.resolved_tracking_uri())
    parent = client.get_run(client.get_run(done[0].run_id).data.tags["mlflow.parentRunId"])
    for record in done:
        run = client.get_run(record.run_id)
        activation = record.params.activation
        assert run.data.params["activation"] == activation
        assert run.info.run_name.startswith(activation) == (activation != "topk")
        assert run.info.run_name in parent.data.tags["mlflow.note.content"]
        if activation == "jumprelu":
            assert run.info.run_name.endswith("l0c1")
            assert float(run.data.params["l0_coefficient"]) == 1.0
        l0 = record.metrics["val/l0"]
        assert l0 == run.data.metrics["l0"] and 0 < l0
        if activation == "topk":
            assert l0 <= record.params.k
    # export: each folder loads in SAELens; the model card names the architecture and offers
    # sparsify for TopK only
    for record in done:
        folder = export_run(
            cfg, client.get_run(record.run_id), tmp_path / "export" / record.trial_id
        )
        card = (folder / "README.md").read_text()
        name = architectures.get(record.params.activation).title
        assert card.startswith(f"# {name} SAE:"), card[:200]
        assert ("SparseCoder" in card) == (record.params.activation == "topk")
        theirs = sae_lens.SAE.load_from_disk(str(folder))
        x = torch.randn(32, theirs.cfg.d_in)
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), _dense(TopKSae.load(folder), x))
