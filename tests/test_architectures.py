"""The architecture registry: every architecture is one class behind one interface, and one
added in a file of its own (plus its registration) is searched, trained, logged and exported
with no other change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from sae import SaeConfig, TopKSae, architectures
from sae.architectures import Architecture
from sae.architectures.batchtopk import THRESHOLD_LR
from sweeps.cli import DEMO_CONFIG
from sweeps.config import load_config
from sweeps.results.best import best_trials
from sweeps.results.export import export_run
from tests.test_sweep import cli

ROOT = Path(__file__).resolve().parents[1]

#: A whole new architecture: a ReLU SAE (every positive latent fires), which SAELens runs as
#: its JumpReLU with thresholds at 0. Nothing else in the project names it.
TOY = '''
"""A ReLU SAE: every latent with a positive pre-activation fires."""

import torch

from sae.architectures import Architecture
from sae.kernels import over_threshold


class ReLU(Architecture):
    name = "relu"
    title = "ReLU"
    saelens = "jumprelu"  # thresholds all 0

    def add_state(self, sae):
        sae.register_buffer("threshold", torch.zeros((), device=sae.W_dec.device))

    def select(self, sae, pre_BM, training, rescore=None):
        return over_threshold(pre_BM, pre_BM > sae.threshold)
'''


def _install_toy(root: Path) -> Path:
    """The toy's file and its one registration, an entry point, as a package installs them."""
    root.mkdir()
    (root / "toy_architecture.py").write_text(TOY)
    meta = root / "toy_architecture-0.1.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-architecture\nVersion: 0.1\n")
    (meta / "entry_points.txt").write_text(
        f"[{architectures.ENTRY_POINTS}]\nrelu = toy_architecture:ReLU\n"
    )
    return root


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy architecture installed for this process and the ones it starts."""
    root = _install_toy(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    architectures.registry.cache_clear()
    yield root
    monkeypatch.undo()
    architectures.registry.cache_clear()


def test_the_built_in_architectures_are_registered_by_name():
    assert architectures.names() == ("topk", "batchtopk", "matryoshka", "jumprelu")
    for name, cls in architectures.registry().items():
        assert issubclass(cls, Architecture) and cls.name == name and cls.title
        assert cls.saelens in ("topk", "jumprelu")
    assert architectures.searched() == ("l0_coefficient",)
    assert [n for n, c in architectures.registry().items() if c.sparsify] == ["topk"]
    with pytest.raises(ValueError, match="one of topk, batchtopk, matryoshka, jumprelu"):
        architectures.get("relu")
    with pytest.raises(ValueError, match=r"activation must be one of .* \(got 'relu'\)"):
        SaeConfig(activation="relu").validate()


def test_configs_and_the_search_space_read_the_registry_without_torch():
    code = (
        "import sys; from sweeps.config import load_config; "
        f"load_config({DEMO_CONFIG!r}, ['search.activation=[topk, jumprelu]']); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.split() == ["False"], out.stderr


def test_an_architecture_someone_else_registers_trains_in_the_library(toy):
    assert architectures.names()[-1] == "relu"
    sae = TopKSae(16, SaeConfig(activation="relu", expansion_factor=2, k=4))
    x = torch.randn(64, 16)
    out = sae(x, batch_topk=True)
    pre = sae.pre_activations(x)
    torch.testing.assert_close(out.dense_latents(32), pre.relu().detach())


@pytest.mark.timeout(900)
def test_a_new_architecture_in_one_file_is_searched_trained_logged_and_exported(
    toy, demo_assets, tmp_path
):
    """The toy above, registered by its entry point: a sweep through the CLI searches it
    beside TopK, trains it on Ray's workers, names it in MLflow and the leaderboard; export
    writes its model card and a folder SAELens loads with its latents."""
    sae_lens = pytest.importorskip("sae_lens")
    sets = [
        *demo_assets,
        f"sweep.out_dir={tmp_path / 'out'}",
        "sweep.name=toy",
        "tune.num_samples=2",
        "tune.controls=0",
        "tune.max_dead_frac=1",
        "train.epochs=1",
        "search.layer=2",
        "search.activation=[topk, relu]",
        "search.points_to_evaluate=[{activation: relu}, {activation: topk}]",
    ]
    proc = cli(["sweep", "--config", DEMO_CONFIG, *[f"--set={s}" for s in sets]])
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log
    cfg = load_config(DEMO_CONFIG, sets)
    done = {r.params.activation: r for r in best_trials(cfg, top=10)}
    assert sorted(done) == ["relu", "topk"], log
    toy_trial = done["relu"]
    client = MlflowClient(cfg.sweep.resolved_tracking_uri())
    run = client.get_run(toy_trial.run_id)
    assert run.data.params["activation"] == "relu"
    assert run.info.run_name.startswith("relu L2 ")
    row = next(line.split() for line in log.splitlines() if line.startswith(toy_trial.trial_id))
    assert row[4] == "relu", log  # the leaderboard: trial_id, front, status, layer, activation
    ours = TopKSae.load(toy_trial.sae_dir)
    assert ours.cfg.activation == "relu" and toy_trial.metrics["val/l0"] > ours.cfg.k
    folder = export_run(cfg, run, tmp_path / "export")
    card = (folder / "README.md").read_text()
    assert card.startswith("# ReLU SAE:") and "SparseCoder" not in card, card[:300]
    assert json.loads((folder / "cfg.json").read_text())["activation"] == "relu"
    theirs = sae_lens.SAE.load_from_disk(str(folder))
    x = torch.randn(32, ours.d_in)
    with torch.no_grad():
        acts, idx = ours.encode(x)
        dense = torch.zeros(len(x), ours.num_latents).scatter_(1, idx, acts)
        torch.testing.assert_close(theirs.encode(x), dense)


@pytest.mark.parametrize("activation", ["batchtopk", "matryoshka", "jumprelu"])
def test_thresholds_are_state_of_the_sae_s_dtype_and_fire_strictly_above(activation):
    """A latent fires where its pre-activation exceeds the threshold, as SAELens's JumpReLU
    (relu(pre) where pre > threshold): one exactly at it stays silent."""
    sae = TopKSae(8, SaeConfig(activation=activation, expansion_factor=2, k=2), dtype=torch.float64)
    assert sae.threshold.dtype == torch.float64 and "threshold" in sae.state_dict()
    with torch.no_grad():
        sae.encoder.weight.zero_()
        sae.encoder.bias.fill_(0.5)
        sae.threshold.fill_(0.5)
    acts, _ = sae.encode(torch.randn(4, 8, dtype=torch.float64))
    assert not acts.any()
    with torch.no_grad():
        sae.threshold.fill_(0.25)
    acts, _ = sae.encode(torch.randn(4, 8, dtype=torch.float64))
    assert (acts == 0.5).all() and acts.shape == (4, 16)


def test_batchtopk_s_threshold_follows_the_smallest_positive_activation_kept():
    sae = TopKSae(8, SaeConfig(activation="batchtopk", expansion_factor=2, k=2))
    step = sae.architecture.after_step
    step(sae, SimpleNamespace(latent_acts=torch.tensor([0.0, 0.5, 2.0, 0.0])))
    assert sae.threshold.item() == 0.5  # the first batch sets it; kept zeros do not count
    step(sae, SimpleNamespace(latent_acts=torch.tensor([1.5, 0.0])))
    assert sae.threshold.item() == pytest.approx(0.5 + THRESHOLD_LR * (1.5 - 0.5))
    before = sae.threshold.item()
    step(sae, SimpleNamespace(latent_acts=torch.zeros(3)))  # nothing positive: unchanged
    assert sae.threshold.item() == before


def test_matryoshka_levels_are_the_fractions_widths_below_the_whole():
    cfg = SaeConfig(activation="matryoshka", matryoshka_fractions=[0.01, 0.5, 0.999])
    assert architectures.get("matryoshka")(cfg).widths(64) == [1, 32]  # 0.999 rounds to 64
