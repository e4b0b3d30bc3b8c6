"""train_sae: learning, AuxK, exact resume, bad input."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from sae import DivergedError, SaeConfig, TrainConfig, train_sae
from sae.metrics import SaeStats
from sae.trainer import Trainer, geometric_median


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


def test_a_frozen_decoder_control_keeps_its_random_dictionary_and_reconstructs_worse():
    """TrainConfig.freeze_decoder: the decoder stays at its random start (bit for bit), the
    encoder and biases train, and the known dictionary beats it by a wide FVU margin."""
    x, _ = sparse_dictionary_data(0, d=32, n_atoms=64, n=8_000, active=3)
    sae_cfg = SaeConfig(expansion_factor=4, k=3)
    fvu = {}
    for freeze in (False, True):
        cfg = TrainConfig(batch_size=256, epochs=4, lr=3e-3, freeze_decoder=freeze)
        trainer = Trainer(x, sae_cfg, cfg)
        start = {k: v.clone() for k, v in trainer.sae.state_dict().items()}
        fvu[freeze] = trainer.fit().metrics["fvu"]
        end = trainer.sae.state_dict()
        assert torch.equal(end["W_dec"], start["W_dec"]) == freeze
        assert not torch.equal(end["encoder.weight"], start["encoder.weight"])
    assert fvu[True] > fvu[False] + 0.2, fvu


def test_auxk_leaves_fewer_dead_latents():
    # More atoms than latents, and a high lr that kills latents without AuxK.
    x, _ = sparse_dictionary_data(0, d=32, n_atoms=512, n=16_000, active=4)
    dead = {}
    for alpha in (0.0, 0.25):
        cfg = TrainConfig(
            batch_size=256,
            epochs=6,
            lr=3e-2,
            auxk_alpha=alpha,
            dead_feature_threshold=2560,
            encoder_init_norm=0.5,  # nn.Linear-sized rows at a high lr: latents die without AuxK
        )
        dead[alpha] = train_sae(x, SaeConfig(num_latents=256, k=4), cfg).metrics["dead_frac"]
    assert dead[0.0] > 0.05
    assert dead[0.25] < dead[0.0] / 2


@pytest.mark.parametrize(
    "activation, normalize_input", [("topk", False), ("batchtopk", True), ("jumprelu", True)]
)
def test_resumed_run_reproduces_the_uninterrupted_run(tmp_path, activation, normalize_input):
    x, _ = sparse_dictionary_data(1, d=16, n_atoms=32, n=3000, active=2)
    x = 7 * x + 3  # an input scale to fold away, and an offset for b_dec
    cfg = TrainConfig(
        normalize_input=normalize_input,
        batch_size=128,
        steps=60,
        eval_every=10,
        lr=1e-3,
        auxk_alpha=1 / 32,
        dead_feature_threshold=500,
        seed=3,
    )
    sae_cfg = SaeConfig(expansion_factor=4, k=2, activation=activation)

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
        "val/never_fired_frac",
        "dense_frac",
        "auxk_loss",
        "lr",
        "acts_per_s",
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
    with pytest.raises(DivergedError, match="diverged at step 0: the loss became NaN"):
        train_sae(x, SaeConfig(expansion_factor=2, k=2), TrainConfig(steps=5))


def test_an_exploding_fvu_is_divergence_not_a_result():
    """At lr 1e6 the loss stays finite while the FVU explodes (4e12 once came back as a
    result): the first evaluation past diverged_fvu raises, naming its step."""
    x = torch.randn(2000, 16)
    cfg = TrainConfig(steps=40, eval_every=10, lr=1e6, batch_size=100, lr_warmup_steps=0)
    with pytest.raises(
        DivergedError, match=r"diverged by step 10: training FVU \S+ \(above diverged_fvu=100\)"
    ):
        train_sae(x, SaeConfig(expansion_factor=2, k=4), cfg)
    ok = train_sae(x, SaeConfig(expansion_factor=2, k=4), dataclasses.replace(cfg, lr=1e-3))
    assert ok.metrics["fvu"] < 1


@pytest.mark.parametrize("rows", ["zero", "constant"])
def test_rows_that_are_all_the_same_are_refused_before_training(rows):
    """A layer of one constant vector once failed every retry with NaN and advice to lower
    the lr: it is bad input, refused before the first step."""
    x = torch.zeros(300, 8) if rows == "zero" else torch.randn(1, 8).repeat(300, 1)
    for normalize in (False, True):
        cfg = TrainConfig(steps=5, normalize_input=normalize)
        with pytest.raises(ValueError, match="every training row is the same vector"):
            train_sae(x, SaeConfig(expansion_factor=2, k=2), cfg)


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


def _trainer(x, **train_kw):
    kw = {"batch_size": 100, "steps": 20, "val_fraction": 0.1, **train_kw}
    return Trainer(x, SaeConfig(expansion_factor=4, k=2), TrainConfig(**kw))


def test_b_dec_starts_at_the_first_batch_mean_or_geometric_median():
    x = torch.randn(1000, 8) + 50.0
    x[::10] += 400.0  # outlier rows: they pull the mean, hardly the geometric median
    for init in ("mean", "geometric_median"):
        trainer = _trainer(x, lr=1e-7, b_dec_init=init)
        batch = trainer._batch(0)
        trainer.train_step(batch)
        expected = batch.mean(0) if init == "mean" else geometric_median(batch)
        torch.testing.assert_close(trainer.sae.b_dec.detach(), expected, atol=1e-3, rtol=0)
    assert (batch.mean(0) - geometric_median(batch)).norm() > 10


def test_geometric_median_minimises_the_summed_distance():
    # In one dimension the geometric median is the median.
    assert geometric_median(torch.tensor([[0.0], [1.0], [2.0], [10.0], [100.0]])).item() == (
        pytest.approx(2.0, abs=1e-4)
    )
    x = torch.randn(301, 5).double() * torch.tensor([1.0, 2, 3, 4, 50])
    m = geometric_median(x)
    cost = (x - m).norm(dim=1).sum()
    for step in 1e-3 * torch.eye(5, dtype=torch.float64):
        assert cost <= (x - m - step).norm(dim=1).sum() and cost <= (x - m + step).norm(dim=1).sum()


def test_default_lr_scales_with_width_as_in_sparsify():
    # sparsify: 2e-4 / sqrt(num_latents / 2**14), so 4e-4 at 4096 latents and 1e-4 at 65536.
    x = torch.randn(200, 8)
    for num_latents, lr in ((4096, 4e-4), (65536, 1e-4)):
        trainer = Trainer(x, SaeConfig(num_latents=num_latents, k=2), TrainConfig(steps=1))
        assert trainer.peak_lr == pytest.approx(lr)


def test_decoder_rows_stay_unit_norm_through_training():
    x, _ = sparse_dictionary_data(0, d=16, n_atoms=32, n=2000, active=2)
    trainer = _trainer(x * 5, lr=3e-2, steps=30)
    trainer.fit()
    norms = trainer.sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_every_epoch_visits_each_training_row_once_in_a_new_order():
    trainer = _trainer(torch.randn(1000, 8))
    per_epoch = trainer.batches_per_epoch
    epochs = [
        torch.cat([trainer.batch_rows(e * per_epoch + i) for i in range(per_epoch)])
        for e in range(3)
    ]
    for rows in epochs:
        assert torch.equal(rows.sort().values, trainer.train_idx)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])


def test_dead_frac_is_the_training_window_and_never_fired_is_reported_apart():
    x, _ = sparse_dictionary_data(0, d=16, n_atoms=32, n=3000, active=2)
    seen = []
    result = train_sae(
        x,
        SaeConfig(num_latents=256, k=2),
        TrainConfig(batch_size=100, steps=40, eval_every=20, dead_feature_threshold=1000),
        callback=lambda m, t: seen.append((m, t.dead_fraction())),
    )
    for metrics, window in seen:
        assert metrics["dead_frac"] == window
    # 150 validation rows at k=2 light at most 300 latents: many live ones never fire there.
    assert result.metrics["never_fired_frac"] > result.metrics["dead_frac"]


def test_normalized_input_makes_training_blind_to_the_input_scale(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is in the dev extra")
    x, _ = sparse_dictionary_data(2, d=16, n_atoms=32, n=3000, active=3)
    x = x + 0.5
    cfg = TrainConfig(batch_size=100, steps=60, lr=3e-3, normalize_input=True)
    runs = {s: train_sae(x * s, SaeConfig(expansion_factor=4, k=3), cfg) for s in (0.1, 100.0)}
    small, large = runs[0.1], runs[100.0]
    assert small.metrics["fvu"] == pytest.approx(large.metrics["fvu"], rel=1e-3)
    # Same latents; raw-unit weights differ by the input scale only in biases and activations.
    torch.testing.assert_close(small.sae.W_dec, large.sae.W_dec, atol=1e-3, rtol=0)
    torch.testing.assert_close(1000 * small.sae.b_dec, large.sae.b_dec, rtol=1e-3, atol=1e-3)
    # The checkpoint reads raw activations, in our loader and in sparsify's.
    large.sae.save(tmp_path / "ckpt")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "ckpt")
    raw = x[:64] * 100.0
    out = large.sae(raw)
    torch.testing.assert_close(theirs(raw).sae_out, out.sae_out, rtol=1e-4, atol=1e-3)
    assert out.fvu.item() == pytest.approx(large.metrics["fvu"], abs=0.1)


def test_input_scale_brings_the_mean_squared_norm_to_d_in():
    x = torch.randn(5000, 8) * 30 + 4
    trainer = _trainer(x, normalize_input=True)
    scaled = x[trainer.train_idx] * trainer.input_scale
    assert scaled.pow(2).sum(1).mean().item() == pytest.approx(8.0, rel=0.01)


def test_batchtopk_learns_a_threshold_and_keeps_l0_near_k():
    x, _ = sparse_dictionary_data(0, d=32, n_atoms=64, n=8000, active=3)
    result = train_sae(
        x,
        SaeConfig(expansion_factor=4, k=3, activation="batchtopk"),
        # 600 steps: the threshold's running average (weight 0.01 a step) must catch up with
        # activations that grow from the small initial encoder rows
        TrainConfig(batch_size=256, steps=600, lr=3e-3, dead_feature_threshold=5000),
    )
    assert result.sae.threshold > 0
    assert 2 <= result.metrics["l0"] <= 4.5  # at inference the threshold, not k, decides
    assert result.metrics["fvu"] < 0.3
    # The threshold stands in for the batch rule: on the same rows, batches of the training
    # size cut at the k*B-th value give about the same L0 and FVU.
    val = Trainer(x, result.sae.cfg, TrainConfig(batch_size=256)).val
    batch_rule = SaeStats(result.sae.num_latents)
    with torch.no_grad():
        for start in range(0, len(val), 256):
            rows = val[start : start + 256]
            acts, idx = result.sae.encode(rows, batch_topk=True)
            batch_rule.update(rows, result.sae.decode(acts, idx), acts, idx)
    assert result.metrics["l0"] == pytest.approx(batch_rule.result()["l0"], rel=0.1)
    assert result.metrics["fvu"] == pytest.approx(batch_rule.result()["fvu"], rel=0.1)


def test_decoder_lr_scale_multiplies_the_decoder_step_alone():
    x, _ = sparse_dictionary_data(0, d=16, n_atoms=32, n=2000, active=2)
    sae_cfg = SaeConfig(num_latents=32, k=4, normalize_decoder=False)
    steps = {}
    for scale in (1.0, 10.0):
        trainer = Trainer(x, sae_cfg, TrainConfig(batch_size=128, steps=10, decoder_lr_scale=scale))
        before = {n: p.detach().clone() for n, p in trainer.sae.named_parameters()}
        trainer.train_step(trainer._batch(0))
        steps[scale] = {n: p.detach() - before[n] for n, p in trainer.sae.named_parameters()}
    for name, step in steps[10.0].items():
        expected = 10 * steps[1.0][name] if name == "W_dec" else steps[1.0][name]
        torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-7)


def test_jumprelu_starts_each_threshold_at_a_third_and_brings_l0_to_k():
    x, _ = sparse_dictionary_data(0, d=32, n_atoms=64, n=8000, active=3)
    sae_cfg = SaeConfig(expansion_factor=4, k=3, activation="jumprelu")
    # decoder_lr_scale=1: the L0 loss's pace at plain Adam (at 10 this run ends at L0 4.6)
    cfg = TrainConfig(batch_size=256, steps=800, lr=1e-2, decoder_lr_scale=1.0)
    trainer = Trainer(x, sae_cfg, cfg)
    first = trainer._batch(0)
    trainer.train_step(first)
    # before the step, every latent fired on a third of the first batch; one step moved it little
    with torch.no_grad():
        pre = trainer.sae.pre_activations(first)
    share = (pre > trainer.sae.threshold).float().mean(0)
    assert share.median().item() == pytest.approx(1 / 3, abs=0.05)
    result = trainer.fit()
    assert (result.sae.threshold >= 0).all() and result.sae.threshold.std() > 0
    assert result.metrics["l0"] == pytest.approx(3, rel=0.5)  # from ~43 at the start
    assert result.metrics["fvu"] < 0.3
    # without the L0 loss the thresholds stay low and the L0 far above k
    loose = train_sae(
        x, sae_cfg, TrainConfig(batch_size=256, steps=800, lr=1e-2, l0_coefficient=0.0)
    )
    assert loose.metrics["l0"] > 3 * result.metrics["l0"]


@pytest.mark.parametrize("norm", [0.1, 1.0])
def test_encoder_starts_as_the_decoders_transpose_at_encoder_init_norm(norm):
    x, _ = sparse_dictionary_data(0, d=16, n_atoms=32, n=2000, active=2)
    trainer = Trainer(x, SaeConfig(expansion_factor=2, k=2), TrainConfig(encoder_init_norm=norm))
    W_enc, W_dec = trainer.sae.encoder.weight, trainer.sae.W_dec
    torch.testing.assert_close(W_enc.norm(dim=1), torch.full((32,), norm))
    torch.testing.assert_close(W_enc, norm * W_dec)
    with pytest.raises(ValueError, match=r"encoder_init_norm must be > 0 \(got 0\)"):
        TrainConfig(encoder_init_norm=0).validate()


def test_jumprelu_constant_initial_threshold():
    x, _ = sparse_dictionary_data(0, d=16, n_atoms=32, n=2000, active=2)
    cfg = TrainConfig(batch_size=128, steps=1, lr=1e-9, jumprelu_init_threshold=0.25)
    sae = train_sae(x, SaeConfig(expansion_factor=2, k=2, activation="jumprelu"), cfg).sae
    torch.testing.assert_close(sae.threshold, torch.full((32,), 0.25), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"steps": 0, "epochs": 0}, "epochs must be > 0 (got 0)"),
        ({"steps": 100, "epochs": -1}, "epochs must be > 0 (got -1)"),
        ({"diverged_fvu": float("nan")}, "diverged_fvu (got nan): use a finite number"),
        ({"diverged_fvu": 0.5}, "diverged_fvu must be > 1 (got 0.5)"),
        ({"lr": -1e-3}, "lr must be > 0 (got -0.001)"),
        ({"device": "tpu"}, "device: expected one of auto, cpu, cuda, got 'tpu'"),
    ],
)
def test_train_config_errors_show_the_values_they_name(kw, message):
    with pytest.raises(ValueError) as error:
        TrainConfig(**kw).validate()
    assert str(error.value) == message


@pytest.mark.parametrize(
    "schedule, after_warmup",
    [
        ("constant", [1, 1, 1, 1, 1, 1]),
        ("linear", [1, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
        # 0.5 * (1 + cos(pi * p)) at p = 0, 1/6, ..., 5/6
        ("cosine", [1, 0.9330127, 0.75, 0.5, 0.25, 0.0669873]),
    ],
)
def test_lr_rises_linearly_over_the_warmup_then_follows_the_schedule_to_zero(
    schedule, after_warmup
):
    """10 steps, 4 of warmup: (s + 1) / 5 for s < 4, then the decay over the 6 steps left;
    past the last step linear and cosine stay at 0."""
    from sae.trainer import lr_factor

    def factor(s, steps=10, warmup=4):
        cfg = TrainConfig(steps=steps, lr_warmup_steps=warmup, lr_schedule=schedule)
        return lr_factor(cfg, steps, torch.tensor(s)).item()

    got = [factor(s) for s in range(10)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, *after_warmup], abs=1e-7)
    assert factor(13) == pytest.approx(1.0 if schedule == "constant" else 0.0, abs=1e-12)
    # A warmup longer than the run ends one step before its end: the last step is at full lr.
    short = [factor(s, steps=3, warmup=100) for s in range(3)]
    assert short == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_each_step_gives_adam_the_scheduled_lr():
    """The step computes its lr on the device; Adam's update is the one at that lr."""
    x = torch.randn(400, 8, generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(lr=0.01, steps=6, lr_warmup_steps=2, batch_size=50, val_fraction=0)
    trainer = Trainer(x, SaeConfig(expansion_factor=2, k=2), cfg)
    seen = []
    for step in range(6):
        trainer.train_step(trainer._batch(step))
        assert trainer.optimizer.param_groups[0]["lr"] is trainer.lr_T
        seen.append(trainer.lr_T.item())
    assert seen == pytest.approx([0.01 / 3, 0.02 / 3, 0.01, 0.0075, 0.005, 0.0025])


@pytest.mark.parametrize("checkpoint_every, due", [(0, [4, 8, 10]), (3, [3, 6, 9, 10])])
def test_checkpoints_are_due_every_interval_and_at_the_last_step(checkpoint_every, due):
    trainer = _trainer(
        torch.randn(500, 8), steps=10, eval_every=4, checkpoint_every=checkpoint_every
    )
    got = []
    for step in range(1, 11):
        trainer.step = step
        if trainer.checkpoint_due():
            got.append(step)
    assert got == due


def test_input_scale_is_estimated_on_a_fixed_sample_of_training_rows():
    """Above max_rows the scale comes from a sample that the seed fixes: the same run gets
    the same sample (resume depends on it); below, the scale is the rows' own mean square."""
    x = torch.randn(2000, 8) * torch.linspace(0.1, 10, 2000)[:, None]  # rows of unlike norms
    trainer = _trainer(x, normalize_input=True)
    first = trainer._training_sample(max_rows=100)
    assert first.shape == (100, 8) and first.dtype == torch.float64
    assert torch.equal(trainer._training_sample(max_rows=100), first)
    assert torch.equal(_trainer(x, normalize_input=True)._training_sample(max_rows=100), first)
    assert not torch.equal(_trainer(x, seed=1)._training_sample(max_rows=100), first)
    rows = trainer.train_idx
    mean_sq = x[rows].double().pow(2).sum(1).mean().item()
    assert trainer.input_scale == pytest.approx((8 / mean_sq) ** 0.5, rel=1e-12)


def test_normalize_input_scales_rows_with_one_nonzero_coordinate():
    x = torch.zeros(200, 8)
    x[:, 0] = torch.tensor([1.0, -1.0]).repeat(100)
    assert _trainer(x, normalize_input=True).input_scale == pytest.approx(8**0.5)


@pytest.mark.parametrize(
    "change",
    [{"seed": 1}, {"batch_size": 50}, {"val_fraction": 0.2}],
    ids=["seed", "batch", "rows"],
)
def test_resume_with_other_data_or_settings_is_refused(tmp_path, change):
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0))
    trainer = _trainer(x, steps=2)
    trainer.fit()
    trainer.save_state(tmp_path)
    key = {"seed": "seed", "batch_size": "batch_size", "val_fraction": "n_train"}[
        next(iter(change))
    ]
    with pytest.raises(ValueError, match=f"trained with {key}=.*this run has {key}="):
        _trainer(x, steps=2, **change).load_state(tmp_path)


def test_the_result_is_its_exported_sae_scored_on_the_validation_rows():
    """metrics and the per-latent statistics equal an evaluation, by this SAE alone, of the
    raw validation rows: the training loop's validation folds input_scale the same way."""
    from sae.metrics import evaluate

    x, _ = sparse_dictionary_data(0, d=16, n_atoms=32, n=2000, active=2)
    trainer = _trainer(3 * x + 1, steps=20, normalize_input=True)
    result = trainer.fit()
    stats = evaluate(result.sae, trainer.val, batch_size=64)
    assert result.metrics["input_scale"] == trainer.input_scale != 1
    for key, value in stats.result().items():
        assert result.metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert result.metrics["step"] == 20
    torch.testing.assert_close(result.firing_frequency, stats.firing_frequency())
    torch.testing.assert_close(result.mean_activation, stats.mean_activation(), rtol=1e-4, atol=0)
    torch.testing.assert_close(result.max_activation, stats.max_act_M, rtol=1e-4, atol=0)


def test_export_folds_any_input_scale_even_an_exact_one():
    """Rows of +-0.5 in 8 dimensions have mean squared norm 2: the scale is exactly 2, and
    the exported SAE on raw x is the training SAE on 2x with activations halved (exact, since
    halving is)."""
    x = 0.5 * torch.randn(500, 8, generator=torch.Generator().manual_seed(0)).sign()
    trainer = _trainer(x, normalize_input=True, steps=3)
    assert trainer.input_scale == 2.0
    trainer.fit()
    raw = trainer.export_sae()
    acts_raw, idx_raw = raw.encode(x)
    acts, idx = trainer.sae.encode(2 * x)
    assert torch.equal(idx_raw, idx)
    torch.testing.assert_close(acts_raw, acts / 2)
    torch.testing.assert_close(raw.decode(acts_raw, idx_raw), trainer.sae.decode(acts, idx) / 2)


def test_float64_and_float16_rows_train_as_their_float32_values():
    x = torch.randn(600, 8, generator=torch.Generator().manual_seed(0)).half().float()
    cfg = TrainConfig(steps=5, batch_size=100, eval_every=5)
    runs = [
        train_sae(x.to(dtype), SaeConfig(expansion_factor=2, k=2), cfg)
        for dtype in (torch.float32, torch.float64, torch.float16)
    ]
    for other in runs[1:]:
        assert other.metrics["fvu"] == runs[0].metrics["fvu"]
        for p, q in zip(runs[0].sae.parameters(), other.sae.parameters()):
            assert p.dtype == q.dtype == torch.float32 and torch.equal(p, q)


def test_a_state_without_training_space_biases_resumes_from_the_saved_weights(tmp_path):
    """Checkpoints written before `train_space` and `input_scale` were saved (no input
    normalisation) still resume: the saved SAE is the training SAE."""
    x = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)) + 2
    trainer = _trainer(x, steps=4)
    trainer.fit()
    trainer.save_state(tmp_path)
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    del state["train_space"], state["input_scale"]
    torch.save(state, tmp_path / "trainer_state.pt")
    resumed = _trainer(x, steps=4)
    resumed.load_state(tmp_path)
    assert resumed.step == 4 and resumed.input_scale == 1.0
    for (name, p), q in zip(trainer.sae.state_dict().items(), resumed.sae.state_dict().values()):
        assert torch.equal(p, q), name
    torch.testing.assert_close(resumed.since_fired_M, trainer.since_fired_M)


def test_throughput_is_rows_trained_per_second_since_the_last_evaluation(monkeypatch):
    import sae.trainer as trainer_module

    class Clock:  # every reading 0.125 s after the last
        now = 0.0

        def perf_counter(self):
            self.now += 0.125
            return self.now

    monkeypatch.setattr(trainer_module, "time", Clock())
    seen = []
    trainer = _trainer(torch.randn(1000, 8), steps=10, eval_every=5)
    trainer.fit(callback=lambda m, t: seen.append(m["acts_per_s"]))
    assert seen == [5 * 100 / 0.125] * 2  # 5 steps of 100 rows between two readings
