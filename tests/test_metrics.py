"""Whole-dataset metrics against direct computations."""

import numpy as np
import pytest
import torch

from sae import SaeConfig, TopKSae, TrainConfig
from sae.metrics import SaeStats, evaluate


def _feed(stats, x, x_hat, batch):
    for s in range(0, len(x), batch):
        rows = len(x[s : s + batch])
        stats.update(
            x[s : s + batch],
            x_hat[s : s + batch],
            torch.ones(rows, 1),
            torch.zeros(rows, 1, dtype=torch.long),
        )


def test_fvu_of_mean_prediction_is_one_and_of_perfect_reconstruction_is_zero():
    x = torch.randn(1000, 8) * 3 + 5
    mean = SaeStats(4)
    _feed(mean, x, x.mean(0).expand_as(x), batch=128)
    perfect = SaeStats(4)
    _feed(perfect, x, x, batch=128)
    assert abs(mean.result()["fvu"] - 1.0) < 1e-12
    assert perfect.result()["fvu"] == 0.0


def test_float64_accumulation_matches_reference_where_float32_drifts():
    # Large offset, small spread, many rows: the regime where float32 running sums break.
    rng = np.random.default_rng(0)
    n, d = 400_000, 4
    x64 = 1000.0 + rng.standard_normal((n, d))
    x_hat64 = x64 + 0.1 * rng.standard_normal((n, d))
    x, x_hat = torch.from_numpy(x64).float(), torch.from_numpy(x_hat64).float()
    ref = ((x.double() - x_hat.double()) ** 2).sum() / (
        (x.double() - x.double().mean(0)) ** 2
    ).sum()

    stats = SaeStats(4)
    _feed(stats, x, x_hat, batch=1000)
    assert abs(stats.result()["fvu"] - ref.item()) < 1e-9

    # The naive float32 one-pass variance (sum x^2 - n mean^2) is far off on the same data.
    s1 = torch.zeros(d)
    s2 = torch.zeros(d)
    for s in range(0, n, 1000):
        s1 += x[s : s + 1000].sum(0)
        s2 += (x[s : s + 1000] ** 2).sum(0)
    naive_var = (s2 - s1**2 / n).sum()
    naive = ((x - x_hat) ** 2).sum() / naive_var
    assert abs(naive.item() - ref.item()) > 1e-3


def test_l0_dead_and_dense_fractions_match_direct_computation():
    torch.manual_seed(0)
    sae = TopKSae(8, SaeConfig(num_latents=32, k=3))
    x = torch.randn(500, 8)
    stats = evaluate(sae, x, batch_size=64)
    acts, idx = sae.encode(x)
    z = torch.zeros(500, 32).scatter(1, idx, acts)
    fired = (z > 0).float()
    freq = fired.mean(0)
    result = stats.result()
    assert result["l0"] == fired.sum(1).mean().item()
    assert result["never_fired_frac"] == (freq == 0).float().mean().item()
    assert result["dense_frac"] == (freq > 0.1).float().mean().item()
    torch.testing.assert_close(stats.firing_frequency(), freq.double())
    count = fired.sum(0)
    mean_when_fired = torch.where(count > 0, z.sum(0) / count.clamp(min=1), 0)
    torch.testing.assert_close(stats.mean_activation().float(), mean_when_fired)
    torch.testing.assert_close(stats.max_act_M, z.max(0).values)
    assert abs(result["mean_act"] - mean_when_fired[count > 0].mean().item()) < 1e-6
    assert result["max_act"] == z.max().item()
    x_hat = sae.decode(acts, idx)
    direct = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(result["fvu"] - direct.item()) < 1e-5


def test_explained_variance_forgives_an_offset_that_fvu_counts():
    x = torch.randn(1000, 8) * 2
    noise = 0.1 * torch.randn(1000, 8)
    stats = SaeStats(4)
    _feed(stats, x, x + noise + 0.5, batch=128)  # a constant offset on top of the noise
    result = stats.result()
    var_x = (x.double() - x.double().mean(0)).pow(2).sum()
    var_r = (noise.double() - noise.double().mean(0)).pow(2).sum()
    assert abs(result["explained_variance"] - (1 - var_r / var_x).item()) < 1e-9
    assert result["fvu"] > 1 - result["explained_variance"] + 0.05


def _labelled_cache(root, tokens: int, labelled: bool = True, n: int = 300, d: int = 16):
    """A cache whose images belong to 3 classes, each a direction plus noise (labels -1 when
    not `labelled`)."""
    from sweeps.activations import cache

    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, n)
    centres = rng.standard_normal((3, d))
    # Token noise grows with sqrt(tokens), so the token mean is as noisy as one CLS token.
    acts = centres[label][:, None] + tokens**0.5 * rng.standard_normal((n, tokens, d))
    run_dir = cache.start_run(root, "k")
    ids = np.arange(n)
    values = (acts if tokens > 1 else acts[:, 0]).astype(np.float16)
    part = cache.write_part(run_dir, ids, label if labelled else -np.ones(n, int), {2: values})
    # The key names the node copies of its layers: one per cache.
    manifest = {"key": f"probe-{tokens}-{labelled}", "layers": [2], "parts": [part], "d_model": d}
    return cache.finish_run(run_dir, manifest | {"tokens_per_image": tokens, "dtype": "float16"})[0]


@pytest.mark.parametrize("tokens", [1, 4])
def test_probe_metric_scores_the_reconstruction_against_the_activations(
    tmp_path, monkeypatch, tokens
):
    """The trial's probe metrics equal the probe's accuracy computed directly on the
    validation images (their token mean in all-token mode) and on the SAE's reconstruction."""
    from sae.trainer import Trainer
    from sweeps.activations import cache
    from sweeps.search.data import CachedLayer, layer_arrays
    from sweeps.search.probe import fit_probe, probe_metrics

    monkeypatch.setenv(cache.ARRAY_DIR_ENV, str(tmp_path / "node"))
    source = CachedLayer(str(_labelled_cache(tmp_path / "c", tokens)), 2, 0.3, 0)
    probe = fit_probe(source, tokens)
    val_labels = source.labels()[1]
    train, val = layer_arrays(source)
    cfg = TrainConfig(steps=60, batch_size=64, lr=1e-2, normalize_input=True)
    trainer = Trainer(train, SaeConfig(num_latents=32, k=1), cfg, val_acts=val)
    trainer.fit()
    got = probe_metrics(trainer, probe, val_labels, tokens)

    x = torch.as_tensor(val[torch.arange(len(val))]).float()
    sae = trainer.export_sae()
    x_hat = sae.decode(*sae.encode(x))
    y = torch.from_numpy(np.array(val_labels))  # a writable copy
    for key, inputs in (("val/probe_acc_orig", x), ("val/probe_acc", x_hat)):
        pred = probe.predict(inputs.view(len(y), tokens, -1).mean(1))
        assert got[key] == pytest.approx((pred == y).double().mean().item())
    assert got["val/probe_acc_orig"] > 0.8  # the classes are separable...
    assert got["val/probe_acc"] <= got["val/probe_acc_orig"]  # ...no better through one latent


def test_probe_needs_two_labels_in_the_training_images(tmp_path, monkeypatch):
    from sweeps.activations import cache
    from sweeps.search.data import CachedLayer
    from sweeps.search.probe import fit_probe

    monkeypatch.setenv(cache.ARRAY_DIR_ENV, str(tmp_path / "node"))
    source = CachedLayer(str(_labelled_cache(tmp_path / "c", 1, labelled=False)), 2, 0.3, 0)
    assert fit_probe(source, 1) is None


def test_streaming_stats_over_unlike_batches_equal_one_float64_pass():
    """Batches of different sizes, means and scales: a wrong merge of per-batch moments (a
    size weight left out, means pooled unweighted) shows here, where like batches hide it."""
    g = torch.Generator().manual_seed(7)
    sizes, offsets, scales = [1, 7, 130, 2, 50, 3], [0, 40, -15, 100, 3, -60], [1, 3, 0.5, 8, 1, 2]
    xs = [s * torch.randn(n, 6, generator=g) + o for n, o, s in zip(sizes, offsets, scales)]
    x_hats = [x + torch.randn(x.shape, generator=g) * (1 + i) + i for i, x in enumerate(xs)]
    m, k = 12, 3
    accs = [
        torch.rand(len(x), k, generator=g) * (torch.rand(len(x), k, generator=g) > 0.3) for x in xs
    ]
    idxs = [torch.rand(len(x), m, generator=g).argsort(1)[:, :k] for x in xs]
    stats = SaeStats(m)
    for x, x_hat, a, i in zip(xs, x_hats, accs, idxs):
        stats.update(x, x_hat, a, i)
    got = stats.result()

    x, x_hat = torch.cat(xs).double(), torch.cat(x_hats).double()
    a, i = torch.cat(accs).double(), torch.cat(idxs)
    var = (x - x.mean(0)).pow(2).sum()
    r = x - x_hat
    dense = torch.zeros(len(x), m, dtype=torch.float64).scatter(1, i, a)
    fired = (dense > 0).sum(0)
    assert got["fvu"] == pytest.approx((r.pow(2).sum() / var).item(), rel=1e-12)
    assert got["explained_variance"] == pytest.approx(
        (1 - (r - r.mean(0)).pow(2).sum() / var).item(), rel=1e-12
    )
    assert got["l0"] == pytest.approx((dense > 0).sum(1).double().mean().item(), rel=1e-12)
    torch.testing.assert_close(stats.fired_M, fired)
    torch.testing.assert_close(stats.mean_activation(), dense.sum(0) / fired.clamp(min=1))
    assert got["max_act"] == pytest.approx(dense.max().item(), rel=1e-6)
    assert got["never_fired_frac"] == pytest.approx((fired == 0).double().mean().item())


def test_shrinkage_is_saebench_relative_reconstruction_bias():
    """SAELens's evals.py formula on one batch: mean ||x_hat||^2 / mean <x, x_hat>; a
    reconstruction scaled by 0.8 reads 0.8."""
    from sae.metrics import SaeStats

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 16, generator=gen)
    for x_hat in (0.8 * x, x + 0.3 * torch.randn(500, 16, generator=gen)):
        stats = SaeStats(4)
        idx = torch.zeros(500, 1, dtype=torch.long)
        for rows in (slice(0, 123), slice(123, 500)):  # accumulated over batches
            stats.update(x[rows], x_hat[rows], torch.ones(len(x[rows]), 1), idx[rows])
        xd, x_hatd = x.double(), x_hat.double()
        reference = (x_hatd.norm(dim=-1) ** 2).mean() / (xd * x_hatd).sum(-1).mean()
        assert stats.result()["shrinkage"] == pytest.approx(reference.item(), rel=1e-9)
    assert stats.result()["shrinkage"] != pytest.approx(0.8)  # the second is not scaled


def test_decoder_similarity_against_the_whole_cosine_matrix():
    from sae.metrics import decoder_similarity

    gen = torch.Generator().manual_seed(1)
    W = torch.randn(300, 64, generator=gen)
    W[250] = W[3] * 5 + 0.05 * torch.randn(64, generator=gen)  # a near-duplicate, other block
    W[17] = -W[40]  # opposite directions are not duplicates
    cos = torch.nn.functional.normalize(W, dim=1) @ torch.nn.functional.normalize(W, dim=1).T
    cos.fill_diagonal_(-2)
    for threshold in (0.9, 0.3):
        best, pairs = decoder_similarity(W, threshold=threshold, block=64)
        assert best == pytest.approx(cos.max().item(), abs=1e-6)
        assert pairs == int((cos > threshold).sum()) // 2
    assert decoder_similarity(W, block=64)[1] == 1


def test_density_histogram_bins_by_decade_and_names_the_swept_keys():
    from sae.metrics import density_histogram, dictionary_metrics
    from sweeps.vocabulary import DICTIONARY_KEYS

    freq = torch.tensor(
        [0.0, 0, 3e-7, 1e-6, 2e-5, 9.9e-5, 1e-3, 0.05, 0.1, 0.7], dtype=torch.float64
    )
    counts = density_histogram(freq)
    numpy_bins = np.histogram(
        np.log10(freq[freq > 0].numpy()), bins=[-99, -6, -5, -4, -3, -2, -1, 0.01]
    )[0]
    assert counts["never"] == 2
    assert list(counts.values())[1:] == numpy_bins.tolist()
    assert sum(counts.values()) == len(freq)
    assert tuple(dictionary_metrics(torch.randn(10, 4), freq)) == DICTIONARY_KEYS
