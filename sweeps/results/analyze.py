"""`analyze`: one SAE over its whole cached dataset plus the plots of its sweep, written as PNGs
and an HTML feature browser, and logged to the trial's (and the sweep's) MLflow run."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sae import TopKSae
from sae.metrics import dictionary_metrics
from sweeps.activations import cache
from sweeps.activations.clip import Preprocessing
from sweeps.activations.extract import absolute_paths, locate_cache
from sweeps.activations.sources import index_source
from sweeps.config import AnalyzeOptions, Config
from sweeps.results import plots, report, scan
from sweeps.results.best import sae_folder, trial_sae_dir, why_no_sae
from sweeps.results.export import download_sae, get_run
from sweeps.tracking.client import sweep_client
from sweeps.tracking.records import TrialRecord
from sweeps.tracking.runs import (
    as_metrics,
    check_quotable,
    child_runs,
    find_sweep_run,
    log_batch,
)
from sweeps.vocabulary import CONTROL_KEYS, NUMERIC_PARAMS, STABILITY_KEYS, check_name, final_name


@dataclass
class Target:
    """The SAE to analyse and where it came from."""

    sae_dir: Path
    layer: int
    name: str
    run_id: str | None
    """The trial's MLflow run; None for a checkpoint outside any sweep."""


@dataclass
class Analysis:
    """What `analyze` wrote, with the numbers its console line shows."""

    html: Path
    target: Target
    summary: dict[str, float]
    """LatentStats.summary: fvu, l0, never_fired_frac, dense_frac, images, ..."""
    checks: dict[str, float]
    """The downstream checks: probe/*, zero_shot/*."""
    num_latents: int

    def headline(self) -> str:
        s, t, checks = self.summary, self.target, self.checks
        dead = int(round(s["never_fired_frac"] * self.num_latents))
        headline = ("probe/original", "probe/reconstructed", "probe/majority_rate")
        headline += ("zero_shot/original", "zero_shot/spliced", "zero_shot/recovered_vs_mean")
        shown = ", ".join(f"{k} {checks[k]:.3g}" for k in headline if k in checks)
        return (
            f"analyze {t.name} (layer {t.layer}): {s['images']} images, fvu {s['fvu']:.4g}, "
            f"l0 {s['l0']:.3g}, {dead}/{self.num_latents} never fired, "
            f"dense {s['dense_frac']:.3g}{'; ' + shown if shown else ''}; report {self.html}"
            + (
                f" (logged to MLflow run {t.run_id}: open analysis/{report.MLFLOW_REPORT} there)"
                if t.run_id
                else ""
            )
        )


def resolve_target(cfg: Config, opts: AnalyzeOptions, client, parent, layers: list[int]):
    """The SAE of --checkpoint, of --run-id, or of the sweep's best trial."""
    if opts.checkpoint:
        sae_dir = Path(opts.checkpoint)
        # A trial's SAE sits in <trial id>/layers.<L> (sparsify's folder convention).
        name = sae_dir.parent.name if sae_dir.name.startswith("layers.") else sae_dir.name
        check_quotable(name)
        runs = child_runs(client, parent, f"tags.trial_id = '{name}'") if parent else []
        layer = opts.layer
        if layer is None and runs:
            layer = TrialRecord.from_mlflow(runs[0]).layer
        if layer is None:
            if len(layers) != 1:
                raise ValueError(
                    f"{sae_dir} is not a trial of sweep {cfg.sweep.name!r} and the cache holds "
                    f"layers {layers}: pass --layer"
                )
            layer = layers[0]
        if layer not in layers:
            raise ValueError(
                f"layer {layer} is not in the activation cache (layers {layers}): pass --layer "
                "with one of them"
            )
        return Target(sae_dir, layer, name, runs[0].info.run_id if runs else None)
    run = get_run(cfg, opts.run_id)  # by default the best trial that finished, as `export`'s
    record = TrialRecord.from_mlflow(run)
    trial_id, layer = record.trial_id or run.info.run_id, record.layer
    found = trial_sae_dir(cfg, trial_id, layer)
    if found is None and opts.run_id is None:  # never another trial in its place
        raise FileNotFoundError(
            f"the best trial {trial_id} of sweep {cfg.sweep.name!r} has no SAE to analyse: "
            f"{why_no_sae(record.status, sae_folder(cfg, trial_id, layer))}; restore it, or pass "
            f"--run-id {run.info.run_id} to analyse the copy its MLflow run keeps (`sae-sweep "
            "best` lists the other trials)"
        )
    if found and Path(found, "cfg.json").is_file():
        sae_dir = Path(found)
    else:  # on a URI (s3://), or a --run-id whose folder is gone: the copy in MLflow
        sae_dir = download_sae(cfg, run)
    return Target(sae_dir, layer, trial_id, run.info.run_id)


def open_cache(cfg: Config, parent=None):
    """(cache dir, source, manifest, preprocessing) of cfg's activation cache, found without
    Ray: the one the sweep's parent run names in its `cache_key` tag, else the one cfg's key
    inputs hash to. Images are decoded as the cache's were."""
    cfg = absolute_paths(cfg)
    key = parent.data.tags.get("cache_key") if parent is not None else None
    if key and cache.find_cache(cfg.extract.cache_dir, key):
        source, cache_dir = index_source(cfg.data), cache.find_cache(cfg.extract.cache_dir, key)
    else:
        source, _, key, cache_dir = locate_cache(cfg)
    if cache_dir is None:
        raise FileNotFoundError(
            f"no activation cache for this config in {cfg.extract.cache_dir} (key {key}): run "
            "`run_sweep.py extract` (or the sweep) with the same config first"
        )
    manifest = cache.read_manifest(cache_dir)
    return cache_dir, source, manifest, Preprocessing.from_json(manifest["preprocessing"])


def sweep_trials(client, parent) -> list[dict]:
    """Finished trials with a final validation fvu and l0, as the sweep's plots read them: one
    row of hyperparameters, fvu, l0 and whether ASHA stopped it."""
    trials = []
    for run in child_runs(client, parent, "status = 'FINISHED'"):
        r = TrialRecord.from_mlflow(run)
        fvu, l0 = r.metrics.get("val/fvu"), r.metrics.get("val/l0")
        if fvu is None or l0 is None:
            continue
        row = {"trial_id": r.trial_id, "fvu": fvu, "l0": l0, "stopped": r.status == "STOPPED"}
        trials.append(row | {k: getattr(r.params, k) for k in NUMERIC_PARAMS})
    return trials


def param_importances(trials: list[dict], seed: int = 0) -> dict[str, float]:
    """Optuna's fANOVA importances of the varied hyperparameters for validation FVU."""
    import optuna

    names = [
        n
        for n in NUMERIC_PARAMS
        if all(t[n] is not None for t in trials) and len({t[n] for t in trials}) > 1
    ]
    if len(trials) < 3 or not names:
        return {}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {
        n: optuna.distributions.FloatDistribution(
            min(t[n] for t in trials), max(t[n] for t in trials), log=n == "lr"
        )
        for n in names
    }
    study = optuna.create_study()
    for t in trials:
        params = {n: float(t[n]) for n in names}
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, value=t["fvu"])
        )
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return optuna.importance.get_param_importances(study, evaluator=evaluator)


def sweep_figures(trials: list[dict], out: Path) -> dict[str, Path]:
    if not trials:
        return {}
    figures = {
        "Pareto front: FVU vs L0 and k": plots.pareto_plot(trials, out / "pareto.png"),
        "FVU vs hyperparameters": plots.fvu_vs_params(trials, out / "fvu_vs_params.png"),
        "best trial per layer": plots.best_per_layer(trials, out / "best_per_layer.png"),
    }
    if importances := param_importances(trials):
        figures["parameter importances"] = plots.importance_plot(
            importances, out / "importances.png"
        )
    return figures


def class_names(label_names: list[str], mapping: str) -> list[str]:
    """The names zero-shot prompts use: the dataset's label names, or those of a --class-names
    file (JSON: {label name: readable name}; text: one name per label, in label order)."""
    if not mapping:
        return label_names
    path = Path(mapping)
    if path.suffix == ".json":
        table = json.loads(path.read_text())
        missing = [n for n in label_names if n not in table]
        if missing:
            raise ValueError(
                f"--class-names {path} has no name for {len(missing)} of the dataset's "
                f"{len(label_names)} labels, e.g. {missing[:5]}"
            )
        return [str(table[n]) for n in label_names]
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) != len(label_names):
        raise ValueError(
            f"--class-names {path} holds {len(names)} names but the dataset has "
            f"{len(label_names)} labels (one line per label, in label order)"
        )
    return names


def templates(prompts: str) -> tuple[str, ...]:
    """--prompts as templates: "ensemble", or templates separated by |."""
    if prompts.strip() == "ensemble":
        return scan.PROMPT_ENSEMBLE
    found = tuple(t.strip() for t in prompts.split("|") if t.strip())
    bad = [t for t in found if t.count("{}") != 1]
    if not found or bad:
        raise ValueError(
            f"--prompts {prompts!r}: give templates holding one {{}} each, separated by |, "
            "or 'ensemble'"
        )
    return found


def downstream(cfg, target, sae, source, pre, manifest, cache_dir, opts, mean_TD) -> dict:
    """Zero-shot accuracies with the SAE spliced in, or why the check was skipped."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    model = cfg.model
    if opts.downstream_images == 0:
        return {"zero_shot": "skipped (downstream_images=0)"}
    if not manifest.get("label_names"):
        return {"zero_shot": "skipped: the dataset has no label names for text prompts"}
    names = class_names(manifest["label_names"], opts.class_names)
    prompts = templates(opts.prompts)
    if AutoConfig.from_pretrained(model.name_or_path, revision=model.revision).model_type != "clip":
        return {"zero_shot": "skipped: vision-only checkpoint (no text tower)"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, revision=model.revision)
    except (OSError, ValueError) as e:
        return {"zero_shot": f"skipped: no tokenizer with {model.name_or_path} ({e})"}
    clip = CLIPModel.from_pretrained(model.name_or_path, revision=model.revision).eval()
    clip.to(sae.device)
    split = ("val", cfg.train.val_fraction, cfg.train.seed)
    ids = scan.zero_shot_sample(
        cache.load_row_ids(cache_dir, *split),
        cache.load_labels(cache_dir, *split),
        opts.downstream_images,
        cfg.train.seed,
    )
    batches = scan.iter_images(source.index, ids, cfg.data, pre)
    return scan.zero_shot(
        clip,
        tokenizer,
        names,
        batches,
        target.layer,
        manifest["token_mode"],
        scan.reconstruct_with(sae),
        pre,
        mean_TD,
        prompts,
    )


def write_thumbnails(stats, latents, source, data, pre, directory: Path) -> int:
    """thumbs/<row id>.jpg for the top images of the given latents, each image once; returns
    how many were written (rows that no longer decode are left out)."""
    directory.mkdir(exist_ok=True)
    rows = {int(r) for r in stats.top_row_MN[latents].flat if r >= 0}
    written = 0
    for row_B, _, pixels_BCHW in scan.iter_images(source.index, sorted(rows), data, pre):
        for r, p in zip(row_B, pixels_BCHW):
            (directory / f"{int(r)}.jpg").write_bytes(report.thumbnail(p))
            written += 1
    return written


def _round(v: float) -> float:
    return float(f"{v:.4g}")


def top_labels(stats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per latent: labelled images it fires on, its most frequent label among them (-1: none)
    and that label's share."""
    counts_CM = stats.class_count_CM
    if len(counts_CM) == 0:
        m = len(stats.frequency_M)
        return np.zeros(m, np.int64), np.full(m, -1), np.zeros(m)
    labelled_M = counts_CM.sum(0)
    top_M = np.where(labelled_M > 0, counts_CM.argmax(0), -1)
    share_M = counts_CM.max(0) / np.maximum(labelled_M, 1)
    return labelled_M, top_M, share_M


def browser_data(stats, latents, label_names, token_mode: str, criterion: str) -> dict:
    """What report.html's browser reads: one row per latent (id, frequency over inputs and
    over images, max, mean when firing, top label and its share of the labelled images it
    fires on), and per latent its activation histogram, its top labels and, for the chosen
    latents, its top images."""
    labelled_M, top_M, share_M = top_labels(stats)
    numbers = (stats.frequency_M, stats.image_frequency_M, stats.max_act_M, stats.mean_act_M)
    chosen = set(latents)
    rows, details = [], []
    for m in range(len(stats.frequency_M)):
        rows.append([m, *(_round(float(a[m])) for a in numbers), int(top_M[m]), _round(share_M[m])])
        hist = stats.act_hist_MH[m]
        nz = np.flatnonzero(hist)
        counts = stats.class_count_CM[:, m]
        by_class = [y for y in np.argsort(-counts, kind="stable")[:8] if counts[y]]
        top = None
        if m in chosen:
            ranked = zip(stats.top_row_MN[m], stats.top_act_MN[m], stats.top_label_MN[m])
            top = [[int(r), _round(float(a)), int(y)] for r, a, y in ranked if r >= 0]
        details.append(
            {
                "hist": [int(nz[0]), *hist[nz[0] : nz[-1] + 1].tolist()] if len(nz) else None,
                "classes": [[int(y), int(counts[y])] for y in by_class],
                "labelled": int(labelled_M[m]),
                "top": top,
            }
        )
    return {
        "mode": token_mode,
        "sort": criterion,
        "shown": report.SHOWN_ROWS,
        "labels": list(label_names or []),
        "edges": [_round(e) for e in scan.HIST_EDGES],
        "latents": rows,
        "details": details,
    }


def spreadsheet_safe(text: str) -> str:
    """A CSV cell that a spreadsheet shows as text: one that begins with =, +, -, @, a tab or
    a carriage return would be a formula, so it gets a leading quote (OWASP's advice)."""
    return f"'{text}" if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def write_latent_table(stats, label_names, path: Path) -> Path:
    """latents.csv: the browser's table, one row per latent."""
    columns = {
        "frequency": stats.frequency_M,
        "image_frequency": stats.image_frequency_M,
        "max_act": stats.max_act_M,
        "mean_act_when_firing": stats.mean_act_M,
    }
    _, top_M, share_M = top_labels(stats)
    names = list(label_names or [])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["latent", *columns, "top_label", "top_label_share"])
        for m, top in enumerate(top_M):
            label = "" if top < 0 else names[top] if top < len(names) else str(top)
            label = spreadsheet_safe(label)
            share = "" if top < 0 else f"{share_M[m]:.6g}"
            writer.writerow([m, *(f"{c[m]:.6g}" for c in columns.values()), label, share])
    return path


def analyze(cfg: Config, opts: AnalyzeOptions) -> Analysis:
    """Run the analysis; returns the HTML report's path."""
    opts.validate()
    client = sweep_client(cfg.sweep)
    sweep = cfg.sweep
    parent = find_sweep_run(
        sweep.resolved_tracking_uri(), sweep.experiment_name(), sweep.experiment_path()
    )
    cache_dir, source, manifest, pre = open_cache(cfg, parent)
    target = resolve_target(cfg, opts, client, parent, manifest["layers"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sae = TopKSae.load(target.sae_dir, device=device).eval()
    if sae.d_in != manifest["d_model"]:
        raise ValueError(
            f"SAE {target.sae_dir} reads d_in={sae.d_in} but the cache holds "
            f"d_model={manifest['d_model']}: analyse it with the config it was trained with"
        )
    broken = [k for k, v in sae.state_dict().items() if not torch.isfinite(v).all()]
    if broken:
        raise ValueError(
            f"SAE {target.sae_dir} holds non-finite weights (NaN or inf in {', '.join(broken)}): "
            "its training diverged; analyse another trial (--run-id, as `sae-sweep best` lists "
            "them)"
        )
    bad = [m for m in opts.latents if not 0 <= m < sae.num_latents]
    if bad:
        raise ValueError(f"latents {bad} do not exist: this SAE has 0..{sae.num_latents - 1}")
    name = target.name if opts.out else check_name(target.name, "trial_id (or pass --out)")
    out = Path(opts.out or Path(cfg.sweep.out_dir) / "analysis" / name)
    out.mkdir(parents=True, exist_ok=True)

    stats, probe = scan.scan(
        sae,
        cache_dir,
        target.layer,
        top_n=opts.top_images,
        batch_size=opts.batch_size,
        val_fraction=cfg.train.val_fraction,
        seed=cfg.train.seed,
    )
    checks = {
        **probe,
        **downstream(cfg, target, sae, source, pre, manifest, cache_dir, opts, stats.mean_TD),
    }
    latents = opts.latents or scan.select_latents(stats, opts.criterion, opts.top_latents)
    label_names = manifest.get("label_names")
    thumbs = write_thumbnails(stats, latents, source, cfg.data, pre, out / "thumbs")

    trials = sweep_trials(client, parent) if parent else []
    sweep_figs = sweep_figures(trials, out)
    figures = {
        "firing frequency": plots.frequency_histogram(stats.frequency_M, out / "frequency.png"),
        **sweep_figs,
    }
    summary = {"sae": str(target.sae_dir), "layer": target.layer, **stats.summary}
    summary |= {"token_mode": manifest["token_mode"], "thumbnails": thumbs}
    summary |= dictionary_metrics(sae.W_dec, torch.from_numpy(stats.frequency_M))
    if target.run_id:  # what the sweep measured after its trials: control margin, stability
        logged = client.get_run(target.run_id).data.metrics
        after = (*CONTROL_KEYS, *STABILITY_KEYS)
        summary |= {k: logged[final_name(k)] for k in after if final_name(k) in logged}
    (out / "summary.json").write_text(
        json.dumps({**summary, "downstream": checks, "latents": latents}, indent=2)
    )
    write_latent_table(stats, label_names, out / "latents.csv")
    browser = browser_data(stats, latents, label_names, manifest["token_mode"], opts.criterion)
    page = (f"SAE {target.name}, layer {target.layer}", summary, checks, figures, browser)
    html = report.write_html(out / "report.html", *page)
    # The same page for MLflow's artifact view, which serves nothing beside an HTML artifact.
    inline = report.inline_thumbnails(browser, latents, out / "thumbs")
    report.write_html(out / report.MLFLOW_REPORT, *page, inline=inline)

    if target.run_id:
        numbers = {**stats.summary, **checks}
        metrics = {f"analysis/{k}": v for k, v in numbers.items() if isinstance(v, (int, float))}
        client.log_artifacts(target.run_id, str(out), "analysis")
        log_batch(client, target.run_id, metrics=as_metrics(metrics))
    if parent and sweep_figs:
        for path in sweep_figs.values():
            client.log_artifact(parent.info.run_id, str(path), "analysis")
    return Analysis(html, target, stats.summary, checks, sae.num_latents)
