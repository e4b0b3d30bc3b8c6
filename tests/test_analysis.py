"""Analysis: statistics and top images against a direct computation, the splice check, the
HTML report in headless Chromium, and `run_sweep.py analyze` end to end."""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from PIL import Image

from sae import SaeConfig, TopKSae
from sweeps.activations import cache
from sweeps.activations.clip import Preprocessing, capture_layers
from sweeps.activations.sources import index_source
from sweeps.cli import DEMO_CONFIG, main
from sweeps.config import AnalyzeOptions, load_config
from sweeps.demo import make_image_folder, make_tiny_clip
from sweeps.results import report
from sweeps.results.analyze import class_names, resolve_target, templates
from sweeps.results.best import best_trials
from sweeps.results.scan import (
    HIST_EDGES,
    PROMPT_ENSEMBLE,
    TIE_BITS,
    class_text_features,
    iter_images,
    scan,
    spliced_embeddings,
    wilson_interval,
    zero_shot,
    zero_shot_sample,
)
from sweeps.search.driver import run_sweep

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")


def save_tiny_tokenizer(directory) -> None:
    """A byte-level CLIP tokenizer without merges, with CLIP's special token ids."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 49406, "<|endoftext|>": 49407}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(directory)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, ray_session):
    """A finished tiny sweep on a full CLIPModel (with tokenizer): its --set overrides."""
    root = tmp_path_factory.mktemp("analysis")
    model = make_tiny_clip(root / "clip", num_layers=3, hidden_size=32, full_clip=True)
    save_tiny_tokenizer(model)
    images = make_image_folder(root / "images", n=240, classes=CLASSES)
    sets = [
        f"model.name_or_path={model}",
        f"data.path={images}",
        f"extract.cache_dir={root / 'cache'}",
        f"sweep.out_dir={root / 'out'}",
        "sweep.name=analysis",
        "extract.layers=[1, 2]",
        "search.layer=[1, 2]",
        "search.k=[4, 8]",
        "tune.num_samples=3",
        "train.epochs=2",
        "tune.verbose=0",
    ]
    cfg = load_config(DEMO_CONFIG, sets)
    run_sweep(cfg)
    (cache_dir,) = [p for p in (root / "cache").iterdir() if (p / "manifest.json").exists()]
    return {"sets": sets, "cfg": cfg, "root": root, "cache_dir": cache_dir}


def synthetic_cache(
    root: Path, token_mode: str, n: int = 300, t: int = 3, d: int = 16, distinct: int = 0
) -> Path:
    """A cache of random activations, written in parts of uneven size, rows out of order;
    with `distinct`, only that many different images, repeated (ties everywhere)."""
    rng = np.random.default_rng(0)
    run_dir = cache.start_run(root, f"{token_mode}{distinct}")
    shape = (n, d) if token_mode == "cls" else (n, t, d)
    acts = rng.standard_normal(shape).astype(np.float16)
    if distinct:
        acts = acts[rng.integers(0, distinct, n)]
    row_ids, labels = rng.permutation(n) + 1000, rng.integers(-1, 4, n)
    parts = []
    bounds = [b for b in (0, 70, 71, 200) if b < n] + [n]
    for lo, hi in zip(bounds, bounds[1:]):
        parts.append(cache.write_part(run_dir, row_ids[lo:hi], labels[lo:hi], {3: acts[lo:hi]}))
    manifest = {"key": token_mode, "layers": [3], "parts": sorted(parts), "rows": n}
    return cache.finish_run(run_dir, manifest)[0]


def direct(sae, cache_dir):
    """Every input's dense code (N*T, M), with the row ids, labels and inputs per image."""
    x_ND = torch.from_numpy(cache.load_layer(cache_dir, 3, "all")).float()
    rows, labels = cache.load_row_ids(cache_dir, "all"), cache.load_labels(cache_dir, "all")
    with torch.no_grad():
        acts_NK, idx_NK = sae.encode(x_ND)
        x_hat = sae.decode(acts_NK, idx_NK).double()
    z_NM = torch.zeros(len(x_ND), sae.num_latents).scatter_(1, idx_NK, acts_NK).double()
    return x_ND, x_hat, z_NM, rows, labels


def expected_top(img_NM: torch.Tensor, rows: np.ndarray, m: int, n: int) -> np.ndarray:
    """Row ids of latent m's n top images: activation descending (at TIE_BITS less than
    float32 precision), then row id ascending."""
    acts = img_NM[:, m].float().numpy()
    bits = acts.view(np.int32).astype(np.int64)
    order = np.lexsort((rows, -((bits + (1 << (TIE_BITS - 1))) >> TIE_BITS)))[:n]
    return np.where(acts[order] > 0, rows[order], -1)


@pytest.mark.parametrize("token_mode", ["cls", "all"])
def test_statistics_and_top_images_equal_a_direct_computation(tmp_path, token_mode):
    cache_dir = synthetic_cache(tmp_path, token_mode)
    torch.manual_seed(0)
    sae = TopKSae(16, SaeConfig(expansion_factor=4, k=3))
    stats, _ = scan(sae, cache_dir, 3, top_n=5, batch_size=37)

    x_ND, x_hat, z_NM, rows, labels = direct(sae, cache_dir)
    x = x_ND.double()
    fired = (z_NM > 0).sum(0)
    assert stats.summary["fvu"] == pytest.approx(
        float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()), rel=1e-6
    )
    assert stats.summary["l0"] == pytest.approx(float((z_NM > 0).sum(1).double().mean()))
    assert stats.summary["images"] == len(rows)
    np.testing.assert_allclose(stats.frequency_M, (fired / len(x_ND)).numpy())
    assert stats.summary["never_fired_frac"] == pytest.approx(float((fired == 0).double().mean()))
    np.testing.assert_allclose(stats.max_act_M, z_NM.max(0).values.numpy(), rtol=1e-6)
    mean = z_NM.sum(0) / fired.clamp(min=1)
    np.testing.assert_allclose(stats.mean_act_M, mean.numpy(), rtol=1e-5)
    # Each input's firing activations land in HIST_EDGES' bins (ends clamped).
    for m in range(sae.num_latents):
        firing = z_NM[:, m][z_NM[:, m] > 0].numpy()
        bins = np.clip(np.searchsorted(HIST_EDGES, firing, "right") - 1, 0, len(HIST_EDGES) - 2)
        np.testing.assert_array_equal(
            stats.act_hist_MH[m], np.bincount(bins, minlength=len(HIST_EDGES) - 1)
        )
    t = len(x_ND) // len(rows)
    np.testing.assert_allclose(stats.mean_TD, x.view(len(rows), t, -1).mean(0), rtol=1e-5)

    # An image's activation is its highest token's: image frequency, firing by class and the
    # top images all follow from that.
    img_NM = z_NM.view(len(rows), -1, sae.num_latents).amax(1)
    np.testing.assert_allclose(stats.image_frequency_M, (img_NM > 0).double().mean(0).numpy())
    for c in range(4):
        counts = (img_NM[torch.from_numpy(labels == c)] > 0).sum(0).numpy()
        np.testing.assert_array_equal(stats.class_count_CM[c], counts)
    for m in range(sae.num_latents):
        want = expected_top(img_NM, rows, m, 5)
        np.testing.assert_array_equal(stats.top_row_MN[m], want)
        live = want >= 0
        by_row = dict(zip(rows, labels))
        assert list(stats.top_label_MN[m][live]) == [by_row[r] for r in want[live]]
        by_row_act = dict(zip(rows, img_NM[:, m].numpy()))
        want_acts = [by_row_act[r] for r in want[live]]
        np.testing.assert_allclose(stats.top_act_MN[m][live], want_acts, rtol=1e-6)


@pytest.mark.parametrize("token_mode", ["cls", "all"])
def test_top_images_break_ties_by_row_id_at_every_batch_size(tmp_path, token_mode):
    """Four distinct images repeated over 150 rows: every top-N list is full of ties."""
    cache_dir = synthetic_cache(tmp_path, token_mode, n=150, distinct=4)
    torch.manual_seed(0)
    sae = TopKSae(16, SaeConfig(expansion_factor=4, k=3))
    _, _, z_NM, rows, _ = direct(sae, cache_dir)
    img_NM = z_NM.view(len(rows), -1, sae.num_latents).amax(1)
    want = np.stack([expected_top(img_NM, rows, m, 8) for m in range(sae.num_latents)])
    t = 1 if token_mode == "cls" else 3
    for batch_size in (t, 5 * t, 37 * t, 1024 * t):  # 1, 5, 37 and all 150 images
        stats, _ = scan(sae, cache_dir, 3, top_n=8, batch_size=batch_size)
        np.testing.assert_array_equal(stats.top_row_MN, want, err_msg=f"batch {batch_size}")


def test_all_token_batches_count_tokens_not_images(tmp_path):
    cache_dir = synthetic_cache(tmp_path, "all", t=3)
    sizes = [len(row) for row, _, _ in cache.iter_layer(cache_dir, 3, batch_size=10)]
    assert max(sizes) == 3 and sum(sizes) == 300  # 3 images of 3 tokens: 9 <= 10 inputs
    # Below one image's tokens, a batch still holds a whole image.
    assert {len(row) for row, _, _ in cache.iter_layer(cache_dir, 3, batch_size=2)} == {1}
    cls_dir = synthetic_cache(tmp_path / "cls", "cls")
    assert max(len(row) for row, _, _ in cache.iter_layer(cls_dir, 3, batch_size=10)) == 10


def test_probe_reports_n_chance_and_an_interval_with_one_regularisation(tmp_path):
    """The probe's accuracies against ridge regression solved directly, with the lambda of
    the original features used for both inputs."""
    cache_dir = synthetic_cache(tmp_path, "cls", n=400)
    torch.manual_seed(0)
    sae = TopKSae(16, SaeConfig(expansion_factor=2, k=2))
    _, probe = scan(sae, cache_dir, 3, batch_size=50, val_fraction=0.3, seed=1)

    x_ND, x_hat, _, rows, labels = direct(sae, cache_dir)
    val = cache.is_val(rows, 0.3, 1)
    train, test = ~val & (labels >= 0), val & (labels >= 0)
    feats = {"original": x_ND.double().numpy(), "reconstructed": x_hat.numpy()}
    f = np.hstack([feats["original"][train], np.ones((train.sum(), 1))])
    lam = 1e-3 * np.diag(f.T @ f).mean()
    assert probe["probe/ridge"] == pytest.approx(lam)
    for name, x in feats.items():
        f = np.hstack([x[train], np.ones((train.sum(), 1))])
        w = np.linalg.solve(f.T @ f + lam * np.eye(len(f.T)), f.T @ np.eye(4)[labels[train]])
        pred = (np.hstack([x[test], np.ones((test.sum(), 1))]) @ w).argmax(1)
        correct = int((pred == labels[test]).sum())
        assert probe[f"probe/{name}"] == pytest.approx(correct / test.sum())
        low, high = wilson_interval(correct, int(test.sum()))
        assert probe[f"probe/{name}_ci_low"] == pytest.approx(low)
        assert low < correct / test.sum() < high
    majority = np.bincount(labels[train]).argmax()
    assert probe["probe/majority_rate"] == pytest.approx((labels[test] == majority).mean())
    assert probe["probe/n"] == test.sum() and probe["probe/n_train"] == train.sum()
    assert probe["probe/classes"] == 4


def test_wilson_interval_matches_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)


def test_zero_shot_sample_covers_every_class_of_an_imagenet_shaped_index():
    """1000 classes x 1281 images, row ids grouped by class as folder data gives them."""
    rows = np.arange(1000 * 1281)
    labels = rows // 1281
    val = cache.is_val(rows, 0.05, 0)
    first = labels[val][:1000]  # the old rule: the first validation rows in id order
    assert len(np.unique(first)) < 20
    picked = zero_shot_sample(rows[val], labels[val], 1000, seed=0)
    assert len(picked) == 1000 and len(np.unique(labels[picked])) == 1000
    few = zero_shot_sample(rows[val], labels[val], 50, seed=0)
    assert len(np.unique(labels[few])) == 50  # fewer images than classes: one per class
    assert np.ptp(labels[few]) > 500  # spread over the classes, not the first ones
    # Unlabelled rows are never picked, and a sample larger than the split is all of it.
    labels_u = np.where(rows % 7 == 0, -1, labels)
    everything = zero_shot_sample(rows[val], labels_u[val], 10**9, seed=0)
    assert set(everything) == set(rows[val][labels_u[val] >= 0])


def test_class_names_and_prompts_from_user_files(tmp_path):
    wnids = ["n01440764", "n01443537"]
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n01440764": "tench", "n01443537": "goldfish"}))
    assert class_names(wnids, str(mapping)) == ["tench", "goldfish"]
    assert class_names(wnids, "") == wnids
    lines = tmp_path / "names.txt"
    lines.write_text("tench\ngoldfish\n")
    assert class_names(wnids, str(lines)) == ["tench", "goldfish"]
    with pytest.raises(ValueError, match=r"no name for 1 .*n09999999"):
        class_names([*wnids, "n09999999"], str(mapping))
    with pytest.raises(ValueError, match="holds 2 names but the dataset has 3"):
        class_names([*wnids, "n09999999"], str(lines))
    assert templates("ensemble") == PROMPT_ENSEMBLE
    assert templates("a photo of a {}. | art of the {}.") == ("a photo of a {}.", "art of the {}.")
    with pytest.raises(ValueError, match="one {} each"):
        templates("a photo")


@pytest.mark.parametrize("token_mode", ["cls", "all"])
def test_splice_with_the_identity_keeps_the_original_accuracy(swept, token_mode):
    from transformers import AutoTokenizer, CLIPModel

    cfg = swept["cfg"]
    model_dir = cfg.model.name_or_path
    clip = CLIPModel.from_pretrained(model_dir).eval()
    pre = Preprocessing.from_pretrained(model_dir)
    source = index_source(cfg.data)
    batches = list(iter_images(source.index, range(60), cfg.data, pre, batch_size=25))
    pixels = pre.normalize(torch.from_numpy(batches[0][2]), torch.float32)
    embs = spliced_embeddings(clip, pixels, 1, token_mode, {"spliced": lambda x: x})
    # The spliced forward is the model's own forward: same embeddings as get_image_features.
    reference = clip.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(embs["original"], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embs["spliced"], embs["original"])

    # Mean ablation puts the mean over images, per token position, in the edited positions.
    h_BTD = capture_layers(clip, pixels, [1], "all")[1]
    mean_TD = h_BTD.mean(0)[: 1 if token_mode == "cls" else None].numpy()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    acc = zero_shot(
        clip, tokenizer, list(CLASSES), batches, 1, token_mode, lambda x: x, pre, mean_TD,
        templates=("a photo of a {}.", "art of the {}."),
    )  # fmt: skip
    assert acc["zero_shot/spliced"] == acc["zero_shot/original"]
    assert acc["zero_shot/cosine_spliced"] == pytest.approx(1.0, abs=1e-5)
    assert acc["zero_shot/cosine_mean_ablation"] < 1 - 1e-4
    labels = np.concatenate([b[1] for b in batches])
    assert acc["zero_shot/n"] == len(labels) == 60
    assert acc["zero_shot/classes_covered"] == len(set(labels)) and acc["zero_shot/templates"] == 2
    for ablation in ("zero", "mean"):
        lost = acc["zero_shot/original"] - acc[f"zero_shot/{ablation}_ablation"]
        recovered = acc[f"zero_shot/recovered_vs_{ablation}"]
        assert recovered == pytest.approx(1.0) if lost else np.isnan(recovered)
        assert acc[f"zero_shot/{ablation}_ablation_ci_low"] <= acc[f"zero_shot/{ablation}_ablation"]

    # The ensemble's class embedding: the normalised mean of each template's unit embedding.
    ensemble = class_text_features(clip, tokenizer, list(CLASSES), PROMPT_ENSEMBLE[:3])
    units = []
    for template in PROMPT_ENSEMBLE[:3]:
        text = tokenizer([template.format(c) for c in CLASSES], padding=True, return_tensors="pt")
        with torch.no_grad():
            units.append(F.normalize(clip.get_text_features(**text).pooler_output, dim=-1))
    torch.testing.assert_close(ensemble, F.normalize(torch.stack(units).mean(0), dim=-1))


@pytest.fixture(scope="module")
def analyzed(swept):
    """`run_sweep.py analyze` on the finished sweep, as a user runs it."""
    out = swept["root"] / "report"
    args = [sys.executable, str(ROOT / "run_sweep.py"), "analyze", "--config", DEMO_CONFIG]
    args += [a for s in swept["sets"] for a in ("--set", s)]
    args += ["--top-images", "4", "--prompts", "a photo of a {}.|a {}.", "--out", str(out)]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc.stdout


def read_latents_csv(out: Path) -> list[dict]:
    with open(out / "latents.csv") as f:
        return list(csv.DictReader(f))


def test_analyze_through_the_cli_writes_files_and_mlflow_artifacts(swept, analyzed):
    out, stdout = analyzed
    for name in ("report.html", "summary.json", "latents.csv", "frequency.png"):
        assert (out / name).is_file(), name
    for name in ("pareto.png", "fvu_vs_params.png", "best_per_layer.png", "importances.png"):
        assert (out / name).is_file(), name
    assert not (out / "top_images.png").exists()  # the browser shows the top images once
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 240
    # SAEBench's metrics on the whole dataset, and the sweep's control margin of this trial
    # (analyze takes the pick, which got the sweep's one control)
    assert 0 < summary["shrinkage"] < 1.5 and -1 <= summary["decoder/max_cos"] <= 1
    assert summary["control/fvu"] > 0 and "control/margin_fvu" in summary
    assert "control/margin_fvu" in (out / "report.html").read_text()
    table = read_latents_csv(out)
    # the density histogram counts every latent once
    assert sum(v for k, v in summary.items() if k.startswith("density/")) == len(table)
    live = [int(r["latent"]) for r in table if float(r["frequency"]) > 0]
    assert sorted(summary["latents"]) == live  # every live latent gets its top images
    # Each top image once, as a JPEG file beside the report, not inlined.
    thumbs = sorted((out / "thumbs").glob("*.jpg"))
    assert len(thumbs) == summary["thumbnails"] > 0
    assert Image.open(thumbs[0]).format == "JPEG"
    assert "data:image" not in (out / "report.html").read_text()
    # ... and a copy for MLflow's artifact view holding them, and the figures, in itself
    copy = (out / report.MLFLOW_REPORT).read_text()
    assert 'src="thumbs/' not in copy and '.png"' not in copy
    assert copy.count("data:image/jpeg;base64,") == len(thumbs)
    for row in table:
        share = row["top_label_share"]
        assert row["top_label"] in CLASSES and 0 < float(share) <= 1 if share else True

    checks = summary["downstream"]
    for key in (
        "probe/original",
        "probe/reconstructed",
        "zero_shot/spliced",
        "probe/majority_rate",
    ):
        assert 0 <= checks[key] <= 1, key
    val = int(cache.is_val(np.arange(240), swept["cfg"].train.val_fraction, 0).sum())
    assert checks["zero_shot/n"] == checks["probe/n"] == val
    assert checks["zero_shot/classes"] == 3 and checks["zero_shot/templates"] == 2
    assert re.search(r"analyze \w+ \(layer \d\): 240 images, fvu ", stdout)

    run_id = re.search(r"logged to MLflow run (\w+)", stdout).group(1)
    client = MlflowClient(swept["cfg"].sweep.resolved_tracking_uri())
    logged = {a.path for a in client.list_artifacts(run_id, "analysis")}
    assert {"analysis/report.html", "analysis/thumbs", "analysis/latents.csv"} <= logged
    assert f"analysis/{report.MLFLOW_REPORT}" in logged
    run = client.get_run(run_id)
    assert run.data.metrics["analysis/fvu"] == pytest.approx(summary["fvu"])
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    parent_logged = {a.path for a in client.list_artifacts(parent.info.run_id, "analysis")}
    assert "analysis/pareto.png" in parent_logged


# Appended to a copy of the page: once loaded, search, sort and open a latent through the
# page's own controls, and record what the DOM shows.
BROWSER_PROBE = """<script>
addEventListener('load', async () => {
  const out = document.body.dataset, ids = () =>
    [...document.querySelectorAll('#latents tbody tr')].map(tr => tr.dataset.id).join(',');
  const search = document.getElementById('search');
  out.all = ids();
  search.value = 'blue';
  search.dispatchEvent(new Event('input'));
  out.blue = ids();
  search.value = '';
  search.dispatchEvent(new Event('input'));
  document.querySelectorAll('#latents th')[1].click();
  out.sorted = ids();
  const first = document.querySelector('#latents tbody tr');
  first.click();
  out.panel = document.querySelector('#panel h2').textContent;
  const images = [...document.querySelectorAll('#panel img')];
  images.forEach(im => im.scrollIntoView());
  await Promise.all(images.map(im => im.complete ? 0 :
    new Promise(done => { im.onload = im.onerror = done; })));
  out.lazy = images.filter(im => im.loading === 'lazy').length;
  out.images = images.length;
  out.loaded = images.filter(im => im.complete && im.naturalWidth > 0).length;
  out.figures = [...document.querySelectorAll('img.fig')].length;
  out.done = 'yes';
});
</script>"""

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--virtual-time-budget=10000",
]  # fmt: skip


def test_report_opens_searches_and_sorts_in_headless_chromium(browser, analyzed, tmp_path):
    chromium = browser
    out, _ = analyzed
    site = tmp_path / "site"
    shutil.copytree(out, site)
    html = (site / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # nothing fetched from outside
    page = site / "probe.html"
    page.write_text(html.replace("</body>", BROWSER_PROBE + "</body>"))
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    got = dict(re.findall(r'data-(\w+)="([^"]*)"', dom.split("<body", 1)[1].split(">", 1)[0]))
    assert got.get("done") == "yes", dom[:2000]

    table = read_latents_csv(out)
    assert len(got["all"].split(",")) == len(table)  # every latent, first sorted by max_act
    # The page holds 4 significant digits; equal there, rows go by latent id.
    maxes = [float(f"{float(table[int(i)]['max_act']):.4g}") for i in got["all"].split(",")]
    assert maxes == sorted(maxes, reverse=True)
    blue = {int(r["latent"]) for r in table if r["top_label"] == "blue"}
    assert {int(i) for i in got["blue"].split(",") if i} == blue
    freqs = [float(table[int(i)]["frequency"]) for i in got["sorted"].split(",")]
    assert freqs[0] == max(freqs) and all(a >= b * 0.999 for a, b in zip(freqs, freqs[1:]))
    top = got["sorted"].split(",")[0]
    assert got["panel"] == f"latent {top}"
    # Its top images, lazy-loaded from thumbs/, all decoded; the figures are files too.
    assert 0 < int(got["images"]) == int(got["loaded"]) == int(got["lazy"]) <= 4
    assert int(got["figures"]) >= 4

    # The page as it opens (the probe scrolls the window, and --screenshot draws a scrolled
    # page blank).
    shot = tmp_path / "shot.png"
    opened = (site / "report.html").as_uri()
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1200,900", opened],
        capture_output=True, timeout=120,
    )  # fmt: skip
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is None or len(colors) > 50  # a rendered page, not a blank one


# Run inside the report's frame in MLflow: open the first latent as a user does, then wait
# for each of its images and each figure to load or fail, and measure the layout.
OPEN_A_LATENT = """(async () => {
  const settled = im => im.complete ? 0 : new Promise(done => {
    im.addEventListener('load', done); im.addEventListener('error', done);
  });
  document.querySelector('#latents tbody tr').click();
  const images = [...document.querySelectorAll('#panel img')];
  for (const im of images) { im.scrollIntoView(); await settled(im); }
  const figures = [...document.querySelectorAll('img.fig')];
  for (const im of figures) { im.scrollIntoView(); await settled(im); }
  document.getElementById('panel').scrollIntoView();  // for the screenshot
  const box = id => document.getElementById(id).getBoundingClientRect();
  const rows = box('rows'), panel = box('panel');
  return {
    panel: document.querySelector('#panel h2').textContent,
    first: document.querySelector('#latents tbody tr').dataset.id,
    images: images.length,
    loaded: images.filter(im => im.complete && im.naturalWidth > 0).length,
    figures: figures.length,
    figures_loaded: figures.filter(im => im.complete && im.naturalWidth > 0).length,
    missing: document.getElementById('missing') ? !document.getElementById('missing').hidden
      : null,
    overlap: rows.left < panel.right && panel.left < rows.right &&
      rows.top < panel.bottom && panel.top < rows.bottom,
    overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
    width: innerWidth,
    position: getComputedStyle(document.getElementById('panel')).position,
  };
})()"""


def test_report_opens_with_its_images_in_mlflows_artifact_view(swept, analyzed, tmp_path):
    """MLflow shows an HTML artifact from a blob: URL in a sandboxed frame, where thumbs/ and
    the figures beside report.html do not load: its MLflow copy holds them, and fits the
    viewer's width (one column, the panel under the table)."""
    from tests.helpers import Chromium, chromium, mlflow_server

    chromium()
    out, stdout = analyzed
    run_id = re.search(r"logged to MLflow run (\w+)", stdout).group(1)
    store = swept["cfg"].sweep.resolved_tracking_uri()
    experiment = MlflowClient(store).get_run(run_id).info.experiment_id
    shots = Path(os.environ.get("TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    with mlflow_server(tmp_path, store) as server, Chromium(tmp_path / "profile") as browser:
        page = f"{server}/#/experiments/{experiment}/runs/{run_id}/artifacts/analysis/"
        got, seen = {}, []
        for name in (report.MLFLOW_REPORT, "report.html"):
            browser.navigate("about:blank")  # a page load: a route change keeps the old frame
            browser.navigate(page + name)
            frame = browser.frame("blob:", skip=seen)  # MLflow's viewer, a frame of its own
            seen.append(frame)
            opened = "document.querySelector('#panel h2')?.textContent"
            browser.wait_for(opened, frame, f"{name} opened")
            got[name] = browser.evaluate(OPEN_A_LATENT, frame)
            if name == report.MLFLOW_REPORT:
                browser.screenshot(shots / "mlflow_report.png")

    copy, plain = got[report.MLFLOW_REPORT], got["report.html"]
    assert copy["panel"] == f"latent {copy['first']}"
    assert 0 < copy["images"] == copy["loaded"] <= 4  # every top image, from the page itself
    assert copy["figures"] == copy["figures_loaded"] >= 4
    assert copy["missing"] is None
    # The viewer is narrower than the two-column layout: one column, nothing covered.
    assert copy["position"] == "static" and not copy["overlap"] and copy["overflow"] <= 0
    assert copy["width"] < 1000
    # report.html itself loads nothing there, and says which file to open instead.
    assert plain["panel"] == copy["panel"] and plain["loaded"] == 0 and plain["missing"]


HOSTILE = ["<!--<script>", "</script><b>x", "a & b", "=1+2", "+cmd", "-2", "@SUM(A1)", "plain"]


def test_hostile_label_names_neither_break_the_report_nor_become_formulas(tmp_path):
    """A class named `<!--<script>` once blanked the HTML report; `=1+2` was a formula in
    latents.csv. The page's JSON holds no markup characters and reads back whole; CSV cells
    that a spreadsheet would evaluate are quoted."""
    import csv
    import html.parser
    import json
    from types import SimpleNamespace

    from sweeps.results import analyze, report
    from sweeps.results.scan import HIST_EDGES

    m, c = 4, len(HOSTILE)
    counts = np.zeros((c, m), np.int64)
    counts[np.arange(m), np.arange(m)] = 5  # latent m's top label is HOSTILE[m]
    counts[4:, :] = 0
    stats = SimpleNamespace(
        class_count_CM=counts,
        frequency_M=np.full(m, 0.1),
        image_frequency_M=np.full(m, 0.1),
        max_act_M=np.ones(m),
        mean_act_M=np.ones(m),
        act_hist_MH=np.zeros((m, len(HIST_EDGES)), np.int64),
        top_row_MN=np.full((m, 2), -1),
        top_act_MN=np.zeros((m, 2)),
        top_label_MN=np.full((m, 2), -1),
    )
    browser = analyze.browser_data(stats, [0], HOSTILE, "cls", "max_act")
    page = report.write_html(tmp_path / "report.html", "<t>", {}, {}, {}, browser)

    class Scripts(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.found, self._in = {}, None

        def handle_starttag(self, tag, attrs):
            self._in = dict(attrs).get("id", "?") if tag == "script" else None

        def handle_data(self, data):
            if self._in:
                self.found[self._in] = self.found.get(self._in, "") + data

        def handle_endtag(self, tag):
            self._in = None

    parser = Scripts()
    text = page.read_text()
    parser.feed(text)
    assert json.loads(parser.found["data"])["labels"] == HOSTILE
    data = text[text.index('id="data">') : text.index("</script>", text.index('id="data">'))]
    assert not set("<>&") & set(data.removeprefix('id="data">'))
    assert text.count("<script") == 2 and text.rstrip().endswith("</html>")

    rows = list(
        csv.DictReader(open(analyze.write_latent_table(stats, HOSTILE, tmp_path / "l.csv")))
    )
    assert [r["top_label"] for r in rows] == ["<!--<script>", "</script><b>x", "a & b", "'=1+2"]
    assert analyze.spreadsheet_safe("+cmd") == "'+cmd" and analyze.spreadsheet_safe("-2") == "'-2"
    assert analyze.spreadsheet_safe("@SUM(A1)") == "'@SUM(A1)"
    assert analyze.spreadsheet_safe("plain") == "plain"


def test_load_sweep_reads_every_trial_into_a_dataframe_without_ray(swept, tmp_path):
    """The notebook API: `from sweeps import load_sweep` gives the finished sweep's trials, best
    first, as MLflow holds them; `load_sae` a row's SAE. Neither starts or imports Ray."""
    code = (
        "import json, sys\n"
        "import sweeps\n"
        "light = sorted(m for m in ('pandas', 'ray', 'mlflow', 'torch') if m in sys.modules)\n"
        "from sweeps import load_sweep, load_sae\n"
        f"df = load_sweep({DEMO_CONFIG!r}, {swept['sets']!r})\n"
        "sae = load_sae(df.iloc[0])\n"
        "print(json.dumps({'light': light, 'ray': 'ray' in sys.modules, 'columns': list(df),\n"
        "    'rows': json.loads(df.to_json(orient='records')), 'k': sae.cfg.k,\n"
        "    'd_in': sae.d_in, 'latents': sae.num_latents}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["light"] == [] and got["ray"] is False

    cfg = swept["cfg"]
    client = MlflowClient(cfg.sweep.resolved_tracking_uri())
    parent = client.get_run(
        client.get_run(got["rows"][0]["run_id"]).data.tags["mlflow.parentRunId"]
    )
    kids = {
        r.info.run_id: r
        for r in client.search_runs(
            [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
    }
    rows = got["rows"]
    assert sorted(r["run_id"] for r in rows) == sorted(kids) and len(rows) == 3
    for col in ("trial_id", "status", "layer", "k", "expansion_factor", "lr", "auxk_alpha"):
        assert col in got["columns"]
    assert {"val/fvu", "val/l0", "dead_frac", "sae_dir", "run_id"} <= set(got["columns"])
    assert len(set(got["columns"])) == len(got["columns"])
    for row in rows:
        run = kids[row["run_id"]]
        assert row["trial_id"] == run.data.tags["trial_id"]
        assert row["status"] == ("STOPPED" if "stopped_early" in run.data.tags else "DONE")
        assert (
            str(row["layer"]) == run.data.params["layer"] and str(row["k"]) == run.data.params["k"]
        )
        assert row["lr"] == pytest.approx(float(run.data.params["lr"]))
        assert row["val/fvu"] == pytest.approx(run.data.metrics["fvu"])
        assert row["dead_frac"] == pytest.approx(run.data.metrics["dead_frac"])
        if row["status"] == "DONE":
            assert Path(row["sae_dir"], "cfg.json").is_file()
    from sweeps.config import load_config
    from sweeps.ranking import PickRule, pick

    rule = PickRule.from_tune(load_config(DEMO_CONFIG, swept["sets"]).tune)
    assert pick(rows, rule)[0] == 0  # the pick first
    best = rows[0]
    assert (got["k"], got["latents"]) == (best["k"], best["expansion_factor"] * got["d_in"])

    from sweeps import load_sae, load_sweep

    with pytest.raises(ValueError, match="trial t1 \\(STOPPED\\) has no final SAE"):
        load_sae({"trial_id": "t1", "status": "STOPPED", "sae_dir": None})
    with pytest.raises(FileNotFoundError, match="no sweep 'analysis'.*run `sae-sweep sweep`"):
        load_sweep(DEMO_CONFIG, [*swept["sets"], f"sweep.out_dir={tmp_path / 'none'}"])


def test_the_mlflow_copy_inlines_latents_in_order_within_its_budget(analyzed, tmp_path):
    """Past report.INLINE_BUDGET the MLflow copy keeps the first latents' images whole and
    leaves the rest to report.html; images shared by latents count once."""
    out, _ = analyzed
    page = (out / report.MLFLOW_REPORT).read_text()
    start = page.index('id="data">') + len('id="data">')
    browser = json.loads(page[start : page.index("</script>", start)])
    latents = browser["inlined"]
    assert len(latents) == len(json.loads((out / "summary.json").read_text())["latents"])

    def rows(m):
        return {row for row, _, _ in browser["details"][m]["top"]}

    first = rows(latents[0])
    size = sum((out / "thumbs" / f"{r}.jpg").stat().st_size for r in first)
    inline = report.inline_thumbnails(browser, latents, out / "thumbs", budget=size)
    # the first latent, then the next ones as long as they add no image
    shared = list(itertools.takewhile(lambda m: rows(m) <= first, latents[1:]))
    assert inline.latents == [latents[0], *shared] and len(inline.latents) < len(latents)
    assert set(inline.thumbs) == first
    assert report.inline_thumbnails(browser, latents, out / "thumbs", budget=0).latents == []
    # The page it renders holds those images and names the others' place.
    small = report.write_html(tmp_path / "r.html", "t", {}, {}, {}, browser, inline=inline)
    text = small.read_text()
    assert text.count("data:image/jpeg;base64,") == len(first)
    assert "download analysis/ from the run" in text


@pytest.fixture
def best_folder_gone(swept):
    """The sweep with its best trial's SAE folder moved away, as if deleted; put back after."""
    (best,) = best_trials(swept["cfg"], top=1)
    assert best.status == "DONE" and best.sae_dir
    hidden = swept["root"] / "moved-away"
    shutil.move(best.sae_dir, hidden)
    yield best
    shutil.move(hidden, best.sae_dir)


def test_a_best_trial_whose_sae_folder_is_gone_is_named_and_never_replaced(
    swept, best_folder_gone, tmp_path, capsys
):
    """`analyze` once analysed the next trial without a word, and `best` said ASHA had
    stopped this one early."""
    best, sets = best_folder_gone, [f"--set={s}" for s in swept["sets"]]
    assert main(["best", "--config", DEMO_CONFIG, *sets]) == 0
    out = capsys.readouterr().out
    assert f"best SAE: none: its SAE folder {best.sae_dir} is missing (deleted or moved)" in out
    assert "stopped early" not in out

    report_dir = tmp_path / "report"
    assert main(["analyze", "--config", DEMO_CONFIG, *sets, "--out", str(report_dir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"best trial {best.trial_id} " in err and best.sae_dir in err, err
    assert f"pass --run-id {best.run_id} to analyse the copy its MLflow run keeps" in err, err
    assert not report_dir.exists()
    # That advice finds the same trial's SAE, downloaded from its MLflow run.
    cfg = swept["cfg"]
    opts = AnalyzeOptions(run_id=best.run_id)
    target = resolve_target(cfg, opts, MlflowClient(cfg.sweep.resolved_tracking_uri()), None, [])
    assert (target.name, target.run_id, target.layer) == (best.trial_id, best.run_id, best.layer)
    saved = TopKSae.load(swept["root"] / "moved-away").state_dict()
    for name, value in TopKSae.load(target.sae_dir).state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=0)


BEST_CASES = [
    (["--top", "0"], "config error: --top (got 0): list 1 or more trials"),
    (["--top", "-3"], "config error: --top (got -3): list 1 or more trials"),
    (["--register", ""], "error: cannot register model '': give a name that is not empty"),
    (["--register", " x"], "error: cannot register model ' x'"),
    (["--register", "a:b"], "error: cannot register model 'a:b'"),
]


@pytest.mark.parametrize("flags, want", BEST_CASES, ids=[repr(c[0]) for c in BEST_CASES])
def test_best_refuses_a_top_below_one_and_a_bad_model_name(swept, flags, want, capsys):
    """`--top 0` once printed an empty table, `--top -3` every trial (SQLite's LIMIT -3) and
    `--register ''` registered nothing without a word, each with exit code 0."""
    sets = [f"--set={s}" for s in swept["sets"]]
    assert main(["best", "--config", DEMO_CONFIG, *sets, *flags]) == 2
    got = capsys.readouterr()
    assert got.err.startswith(want) and got.err.count("\n") == 1, got.err
    assert got.out == ""  # refused before anything is read
    client = MlflowClient(swept["cfg"].sweep.resolved_tracking_uri())
    assert client.search_registered_models() == []
