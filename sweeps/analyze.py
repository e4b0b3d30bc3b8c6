"""`analyze`: one SAE over its whole cached dataset plus the plots of its sweep, written as PNGs
and an HTML feature browser, and logged to the trial's (and the sweep's) MLflow run."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from sae import TopKSae
from sweeps import analysis, cache, report
from sweeps.best import best_trials, sweep_parent, trial_sae_dir
from sweeps.config import AnalyzeOptions, Config
from sweeps.extract import absolute_paths, locate_cache
from sweeps.tracking import final_name


@dataclass
class Target:
    """The SAE to analyse and where it came from."""

    sae_dir: Path
    layer: int
    name: str
    run_id: str | None
    """The trial's MLflow run; None for a checkpoint outside any sweep."""


def _children(client: MlflowClient, parent, extra: str = "") -> list:
    query = f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'" + extra
    return client.search_runs([parent.info.experiment_id], query, max_results=50000)


def resolve_target(cfg: Config, opts: AnalyzeOptions, client, parent, layers: list[int]):
    """The SAE of --checkpoint, of --run-id, or of the sweep's best trial."""
    uri = cfg.sweep.resolved_tracking_uri()
    if opts.checkpoint:
        sae_dir = Path(opts.checkpoint)
        # A trial's SAE sits in <trial id>/layers.<L> (sparsify's folder convention).
        name = sae_dir.parent.name if sae_dir.name.startswith("layers.") else sae_dir.name
        runs = _children(client, parent, f" and tags.trial_id = '{name}'") if parent else []
        layer = opts.layer
        if layer is None and runs:
            layer = int(runs[0].data.params["layer"])
        if layer is None:
            if len(layers) != 1:
                raise ValueError(
                    f"{sae_dir} is not a trial of sweep {cfg.sweep.name!r} and the cache holds "
                    f"layers {layers}: pass --layer"
                )
            layer = layers[0]
        return Target(sae_dir, layer, name, runs[0].info.run_id if runs else None)
    if opts.run_id:
        run = client.get_run(opts.run_id)
    else:
        saved = [r for r in best_trials(cfg, top=50) if r["sae_dir"]]
        if not saved:
            raise FileNotFoundError(
                f"no trial of sweep {cfg.sweep.name!r} saved a final SAE: pass --run-id or "
                "--checkpoint, or rerun the sweep"
            )
        run = client.get_run(saved[0]["mlflow_uri"].split("/")[1])  # runs:/<run id>/sae
    trial_id = run.data.tags.get("trial_id", run.info.run_id)
    layer = int(run.data.params["layer"])
    found = trial_sae_dir(cfg, trial_id, layer)
    if found and Path(found, "cfg.json").is_file():
        sae_dir = Path(found)
    else:  # not on a local path (s3://): download
        import mlflow.artifacts

        sae_dir = Path(
            mlflow.artifacts.download_artifacts(
                run_id=run.info.run_id, artifact_path="sae", tracking_uri=uri
            )
        )
    return Target(sae_dir, layer, trial_id, run.info.run_id)


def find_cache(cfg: Config):
    """(cache dir, source, preprocessing) of cfg's activation cache, found without Ray."""
    cfg = absolute_paths(cfg)
    pre, source, _, key, cache_dir = locate_cache(cfg)
    if cache_dir is None:
        raise FileNotFoundError(
            f"no activation cache for this config in {cfg.extract.cache_dir} (key {key}): run "
            "`run_sweep.py extract` (or the sweep) with the same config first"
        )
    return cache_dir, source, pre


def sweep_trials(client: MlflowClient, parent) -> list[dict]:
    """Finished trials with their hyperparameters and final validation fvu and l0."""
    trials = []
    for run in _children(client, parent, " and status = 'FINISHED'"):
        m, p = run.data.metrics, run.data.params
        fvu, l0 = m.get(final_name("val/fvu")), m.get(final_name("val/l0"))
        if fvu is None or l0 is None:
            continue
        trials.append(
            {
                "trial_id": run.data.tags.get("trial_id", ""),
                "fvu": fvu,
                "l0": l0,
                "stopped": "stopped_early" in run.data.tags,
                **{k: _number(p.get(k)) for k in report.PARAMS},
            }
        )
    return trials


def _number(text: str | None):
    if text is None or text == "None":
        return None
    value = float(text)
    return int(value) if value.is_integer() and "." not in text and "e" not in text else value


def param_importances(trials: list[dict], seed: int = 0) -> dict[str, float]:
    """Optuna's fANOVA importances of the varied hyperparameters for validation FVU."""
    import optuna

    names = [
        n
        for n in report.PARAMS
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
        "Pareto front: FVU vs L0 and k": report.pareto_plot(trials, out / "pareto.png"),
        "FVU vs hyperparameters": report.fvu_vs_params(trials, out / "fvu_vs_params.png"),
        "best trial per layer": report.best_per_layer(trials, out / "best_per_layer.png"),
    }
    if importances := param_importances(trials):
        figures["parameter importances"] = report.importance_plot(
            importances, out / "importances.png"
        )
    return figures


def downstream(cfg, target, sae, source, pre, manifest, n_images: int) -> dict:
    """Zero-shot accuracies with the SAE spliced in, or why the check was skipped."""
    from transformers import AutoConfig, AutoTokenizer, CLIPModel

    model = cfg.model
    if n_images == 0:
        return {"zero_shot": "skipped (downstream_images=0)"}
    if not manifest.get("label_names"):
        return {"zero_shot": "skipped: the dataset has no label names for text prompts"}
    if AutoConfig.from_pretrained(model.name_or_path, revision=model.revision).model_type != "clip":
        return {"zero_shot": "skipped: vision-only checkpoint (no text tower)"}
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path, revision=model.revision)
    except (OSError, ValueError) as e:
        return {"zero_shot": f"skipped: no tokenizer with {model.name_or_path} ({e})"}
    clip = CLIPModel.from_pretrained(model.name_or_path, revision=model.revision).eval()
    clip.to(sae.device)
    ids = source.index["row_id"].to_numpy()
    ids = ids[analysis.is_val(ids, cfg.train.val_fraction, cfg.train.seed)][:n_images]
    batches = analysis.iter_images(source.index, ids, cfg.data, pre)
    return analysis.zero_shot(
        clip,
        tokenizer,
        manifest["label_names"],
        batches,
        target.layer,
        manifest["token_mode"],
        analysis.reconstruct_with(sae),
        pre,
    )


def latent_cards(stats, latents, source, cfg, pre, label_names) -> list[dict]:
    """Per shown latent: its statistics and top images (thumbnail, activation, label)."""
    rows = {
        int(r)
        for lat in latents
        for r, a in zip(stats.top_row_MN[lat], stats.top_act_MN[lat])
        if a > 0
    }
    thumbs = {}
    for row_B, _, pixels_BCHW in analysis.iter_images(source.index, sorted(rows), cfg.data, pre):
        thumbs |= {int(r): report.thumbnail(p) for r, p in zip(row_B, pixels_BCHW)}

    def name(label: int) -> str:
        if label < 0:
            return "-"
        return label_names[label] if label_names and label < len(label_names) else str(label)

    cards = []
    for lat in latents:
        top = zip(stats.top_row_MN[lat], stats.top_act_MN[lat], stats.top_label_MN[lat])
        images = [
            {"row_id": int(r), "act": float(a), "label": name(int(y)), "png": thumbs[int(r)]}
            for r, a, y in top
            if a > 0 and int(r) in thumbs
        ]
        cards.append(
            {
                "id": lat,
                "frequency": float(stats.frequency_M[lat]),
                "max_act": float(stats.max_act_M[lat]),
                "mean_act": float(stats.mean_act_M[lat]),
                "images": images,
            }
        )
    return cards


def write_latent_table(stats, path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["latent", "frequency", "max_act", "mean_act"])
        for m, row in enumerate(zip(stats.frequency_M, stats.max_act_M, stats.mean_act_M)):
            writer.writerow([m, *(f"{v:.6g}" for v in row)])
    return path


def analyze(cfg: Config, opts: AnalyzeOptions) -> Path:
    """Run the analysis; returns the HTML report's path."""
    client = MlflowClient(cfg.sweep.resolved_tracking_uri())
    parent = sweep_parent(client, cfg)
    cache_dir, source, pre = find_cache(cfg)
    manifest = cache.read_manifest(cache_dir)
    target = resolve_target(cfg, opts, client, parent, manifest["layers"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sae = TopKSae.load(target.sae_dir, device=device).eval()
    if sae.d_in != manifest["d_model"]:
        raise ValueError(
            f"SAE {target.sae_dir} reads d_in={sae.d_in} but the cache holds "
            f"d_model={manifest['d_model']}: analyse it with the config it was trained with"
        )
    out = Path(opts.out or Path(cfg.sweep.out_dir) / "analysis" / target.name)
    out.mkdir(parents=True, exist_ok=True)

    stats, probe = analysis.scan(
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
        **downstream(cfg, target, sae, source, pre, manifest, opts.downstream_images),
    }
    latents = opts.latents or analysis.select_latents(stats, opts.criterion, opts.top_latents)
    bad = [m for m in latents if not 0 <= m < sae.num_latents]
    if bad:
        raise ValueError(f"latents {bad} do not exist: this SAE has 0..{sae.num_latents - 1}")
    cards = latent_cards(stats, latents, source, cfg, pre, manifest.get("label_names"))

    trials = sweep_trials(client, parent) if parent else []
    sweep_figs = sweep_figures(trials, out)
    figures = {
        "firing frequency": report.frequency_histogram(stats.frequency_M, out / "frequency.png"),
        "top images": report.latent_grid(cards, out / "top_images.png"),
        **sweep_figs,
    }
    summary = {"sae": str(target.sae_dir), "layer": target.layer, **stats.summary}
    (out / "summary.json").write_text(
        json.dumps({**summary, "downstream": checks, "latents": latents}, indent=2)
    )
    write_latent_table(stats, out / "latents.csv")
    html = report.write_html(
        out / "report.html",
        f"SAE {target.name}, layer {target.layer}",
        summary,
        checks,
        figures,
        cards,
    )

    if target.run_id:
        numbers = {**stats.summary, **checks}
        metrics = {f"analysis/{k}": v for k, v in numbers.items() if isinstance(v, (int, float))}
        client.log_artifacts(target.run_id, str(out), "analysis")
        client.log_batch(target.run_id, metrics=_metrics(metrics))
    if parent and sweep_figs:
        for path in sweep_figs.values():
            client.log_artifact(parent.info.run_id, str(path), "analysis")
    s = stats.summary
    dead = int(round(s["never_fired_frac"] * sae.num_latents))
    shown = ", ".join(f"{k} {v:.3g}" for k, v in checks.items() if isinstance(v, float))
    print(
        f"analyze {target.name} (layer {target.layer}): {s['images']} images, fvu {s['fvu']:.4g}, "
        f"l0 {s['l0']:.3g}, {dead}/{sae.num_latents} never fired, dense {s['dense_frac']:.3g}"
        f"{'; ' + shown if shown else ''}; report {html}"
        + (f" (logged to MLflow run {target.run_id})" if target.run_id else "")
    )
    return html


def _metrics(values: dict[str, float]) -> list[Metric]:
    ts = int(time.time() * 1000)
    return [Metric(k, float(v), ts, 0) for k, v in values.items()]
