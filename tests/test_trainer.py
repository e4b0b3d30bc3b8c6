"""train_sae: learning, AuxK, exact resume, bad input."""

import warnings

import numpy as np
import pytest
import torch

from sae import DivergedError, SaeConfig, TrainConfig, train_sae


def sparse_dictionary_data(seed, d, n_atoms, n, active):
    """Rows that are positive combinations of `active` atoms of a random unit dictionary."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    coef = torch.rand(n, active, generator=g) + 0.5
    return (coef.unsqueeze(2) * atoms[idx]).sum(1), atoms


def test_learns_back_a_known_sparse_dictionary():
    x, atoms = sparse_dictionary_data(0, d=32, n_atoms=64, n=20_000, active=3)
    result = train_sae(
        x,
        SaeConfig(expansion_factor=4, k=3),
        TrainConfig(batch_size=256, epochs=8, lr=3e-3, dead_feature_threshold=5000),
    )
    W = torch.nn.functional.normalize(result.sae.W_dec.detach(), dim=1)
    best_cos = (atoms @ W.T).max(dim=1).values
    # Random unit vectors in 32-d have |cos| ~ 0.18 and the best of 128 rarely passes 0.6, so
    # a mean best cosine above 0.9 means the atoms themselves were found.
    assert best_cos.mean() > 0.9
    assert result.metrics["fvu"] < 0.2
    assert result.metrics["l0"] == 3.0


def test_auxk_leaves_fewer_dead_latents():
    # More atoms than latents, and a high lr that kills latents without AuxK.
    x, _ = sparse_dictionary_data(0, d=32, n_atoms=512, n=16_000, active=4)
    dead = {}
    for alpha in (0.0, 0.25):
        cfg = TrainConfig(
            batch_size=256, epochs=6, lr=3e-2, auxk_alpha=alpha, dead_feature_threshold=2560
        )
        dead[alpha] = train_sae(x, SaeConfig(num_latents=256, k=4), cfg).metrics["dead_frac"]
    assert dead[0.0] > 0.05
    assert dead[0.25] < dead[0.0] / 2


def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path):
    x, _ = sparse_dictionary_data(1, d=16, n_atoms=32, n=3000, active=2)
    cfg = TrainConfig(
        batch_size=128,
        steps=60,
        eval_every=10,
        lr=1e-3,
        auxk_alpha=1 / 32,
        dead_feature_threshold=500,
        seed=3,
    )
    sae_cfg = SaeConfig(expansion_factor=4, k=2)

    def save_at_30(metrics, trainer):
        if metrics["step"] == 30:
            trainer.save_state(tmp_path / "ckpt")

    full = train_sae(x, sae_cfg, cfg, callback=save_at_30)
    resumed = train_sae(x, sae_cfg, cfg, resume_from=tmp_path / "ckpt")
    assert [h["step"] for h in resumed.history] == [40, 50, 60]
    for a, b in zip(full.history[3:], resumed.history):
        assert a["val/fvu"] == b["val/fvu"] and a["train/fvu"] == b["train/fvu"]
    for (name, p), q in zip(full.sae.state_dict().items(), resumed.sae.state_dict().values()):
        assert torch.equal(p, q), name
    state = torch.load(tmp_path / "ckpt" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 30


def test_callback_runs_at_every_eval_interval_with_metrics():
    x = torch.randn(2000, 8)
    seen = []
    train_sae(
        x,
        SaeConfig(expansion_factor=2, k=2),
        TrainConfig(batch_size=100, steps=25, eval_every=10),
        callback=lambda m, t: seen.append(m),
    )
    assert [m["step"] for m in seen] == [10, 20, 25]
    expected = {
        "train/fvu",
        "val/fvu",
        "val/l0",
        "dead_frac",
        "dense_frac",
        "auxk_loss",
        "lr",
        "acts_per_s",
        "train/dead_frac",
        "epoch",
    }
    assert expected <= set(seen[0])


def test_read_only_numpy_input_trains_without_warnings():
    x = np.random.default_rng(0).standard_normal((1000, 8)).astype(np.float16)
    x.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = train_sae(x, SaeConfig(expansion_factor=2, k=2), TrainConfig(steps=5))
    assert np.isfinite(result.metrics["fvu"])


def test_diverging_loss_raises_with_the_step():
    x = torch.randn(500, 8) * 1e19  # squares overflow float32: the loss is not finite
    with pytest.raises(DivergedError, match="at step 0"):
        train_sae(x, SaeConfig(expansion_factor=2, k=2), TrainConfig(steps=5))


@pytest.mark.parametrize(
    "acts, sae_kw, train_kw, message",
    [
        (torch.randn(100, 8), {"k": 100, "expansion_factor": 2}, {}, "k=100 is larger than"),
        (torch.randn(100, 8), {"k": 0}, {}, "k must be > 0"),
        (torch.randn(100, 8), {}, {"lr": 0.0}, "lr must be > 0"),
        (torch.randn(100, 8), {}, {"lr": -1e-3}, "lr must be > 0"),
        (torch.randn(0, 8), {}, {}, "empty"),
        (torch.randn(100), {}, {}, "must be 2-D"),
        (torch.randn(1, 8), {}, {"val_fraction": 0.9}, "leaves no training rows"),
        (
            torch.tensor([[0.0, 1.0], [float("nan"), 0.0]]).repeat(20, 1),
            {"k": 1},
            {},
            r"NaN or inf, first at rows \[1, 3",
        ),
        (torch.tensor([[0.0, float("inf")]]).repeat(20, 1), {"k": 1}, {}, "NaN or inf"),
    ],
)
def test_bad_input_is_rejected_before_training(acts, sae_kw, train_kw, message):
    sae_kw = {"expansion_factor": 2, "k": 2, **sae_kw}
    with pytest.raises(ValueError, match=message):
        train_sae(acts, SaeConfig(**sae_kw), TrainConfig(steps=5, **train_kw))


def test_wrong_d_in_is_rejected(tmp_path):
    a = train_sae(torch.randn(200, 8), SaeConfig(expansion_factor=2, k=2), TrainConfig(steps=2))
    a.sae.save(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="val_acts has d_in=4 but acts has d_in=8"):
        train_sae(
            torch.randn(200, 8), SaeConfig(k=2), TrainConfig(steps=2), val_acts=torch.randn(10, 4)
        )
    with pytest.raises(ValueError, match="d_in"):
        a.sae(torch.randn(3, 5))
