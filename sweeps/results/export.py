"""Hand-off of a trial's SAE to other tools: one folder that this project, sparsify and SAELens
all load, with a model card, written to a directory (`export`) or registered as a version in
MLflow's model registry (`best --register`, `sweep.register_as`).

The registered artifact is that folder, not an MLflow flavour: `mlflow.pytorch` would pickle
the module (checkpoints here are never pickled) and a pyfunc's predict has no natural output
for an SAE (latents? reconstruction?). A plain folder downloads with one call and opens in
all three libraries.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from sae import TopKSae, architectures
from sae.saelens import save_saelens
from sweeps.config import Config
from sweeps.redact import redact
from sweeps.results.best import best_trials
from sweeps.tracking.client import sweep_client
from sweeps.tracking.records import TrialRecord
from sweeps.tracking.registry import download_artifacts, register_folder, trial_run
from sweeps.vocabulary import check_model_name, format_value

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

#: The run artifact that a registered model version points to: `export/layers.<L>`.
EXPORT_ARTIFACT = "export"

#: The registered model's description (set when `register_run` creates it).
DESCRIPTION = (
    "SAEs on CLIP vision activations. Each version is a folder that loads with "
    "TopKSae.load and sae_lens.SAE.load_from_disk (TopK ones also with sparsify's "
    "SparseCoder.load_from_disk); its README.md is the model card."
)


def saelens_metadata(cfg: Config, layer: int) -> dict:
    """SAELens's metadata fields for an SAE on layer `layer` of cfg's CLIP vision model."""
    return {
        "model_name": redact(cfg.model.name_or_path),
        "model_class_name": "CLIPVisionModel",
        # TransformerLens's name for the residual stream after block L, as SAELens uses it,
        # and the transformers module whose output that is (hidden_states[L + 1]).
        "hook_name": f"blocks.{layer}.hook_resid_post",
        "hf_hook_name": f"encoder.layers.{layer}",
        "hook_head_index": None,
        # cls mode trains on token 0 of each image only; all mode on every token.
        "seqpos_slice": [0, 1] if cfg.extract.token_mode == "cls" else [None],
        "prepend_bos": False,
        "dataset_path": redact(cfg.data.path),
    }


def best_run(cfg: Config) -> Run:
    """The MLflow run of the sweep's best trial that finished with a final SAE."""
    done = [r for r in best_trials(cfg, top=50) if r.status == "DONE"]
    if not done:
        raise FileNotFoundError(
            f"no trial of sweep {cfg.sweep.name!r} finished with a final SAE: rerun the sweep "
            "with more trials or steps"
        )
    return sweep_client(cfg.sweep).get_run(done[0].run_id)


def get_run(cfg: Config, run_id: str | None) -> Run:
    """The trial run `run_id`, or the sweep's best one when it is None."""
    if run_id is None:
        return best_run(cfg)
    return trial_run(cfg.sweep.resolved_tracking_uri(), run_id)


def download_sae(cfg: Config, run: Run, dst: str | None = None) -> Path:
    """The trial run's SAE artifact, downloaded into `dst` (default: a new temporary
    directory)."""
    return download_artifacts(cfg.sweep.resolved_tracking_uri(), run.info.run_id, "sae", dst)


def export_run(cfg: Config, run: Run, out: str | Path) -> Path:
    """Write the trial's SAE to `<out>/layers.<L>` in sparsify's and SAELens's layouts, with
    a model card README.md; returns that folder. An existing folder is never overwritten."""
    layer = record_of(run).layer
    folder = Path(out) / f"layers.{layer}"
    if folder.exists():
        raise ValueError(
            f"{folder} already exists (an earlier export?): choose another --out, or delete "
            "that folder first"
        )
    with tempfile.TemporaryDirectory() as tmp:
        sae = TopKSae.load(download_sae(cfg, run, tmp))
    save_saelens(sae, folder, saelens_metadata(cfg, layer))
    (folder / "README.md").write_text(model_card(cfg, run, sae))
    return folder


def register_run(cfg: Config, run: Run, name: str) -> ModelVersion:
    """Log the exported SAE folder to the trial's run and register it as a version of the
    registered model `name` (created when new), tagged with its sweep, trial and metrics."""
    check_model_name(name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export_run(cfg, run, tmp)
        return register_folder(
            cfg.sweep.resolved_tracking_uri(),
            run.info.run_id,
            folder,
            f"{EXPORT_ARTIFACT}/{folder.name}",
            name,
            DESCRIPTION,
            f"Sweep {cfg.sweep.name}, trial {run.data.tags.get('trial_id')}",
            version_tags(cfg, run),
        )


def version_tags(cfg: Config, run: Run) -> dict[str, str]:
    p, m = run.data.params, run.data.metrics
    tags = {
        "sweep": cfg.sweep.name,
        "trial_id": run.data.tags.get("trial_id", ""),
        "model": cfg.model.name_or_path,
        "token_mode": cfg.extract.token_mode,
        **{k: p[k] for k in ("layer", "k", "expansion_factor") if k in p},
        **{k: f"{m[k]:.6g}" for k in ("fvu", "l0", "dead_frac") if k in m},
    }
    return {k: str(v) for k, v in tags.items()}


def record_of(run: Run) -> TrialRecord:
    """The trial record of an MLflow trial run."""
    return TrialRecord.from_mlflow(run)


def model_card(cfg: Config, run: Run, sae: TopKSae) -> str:
    """A short README.md saying what the SAE was trained on, how well, and how to load it."""
    m, params = run.data.metrics, record_of(run).params
    layer = params.layer
    data = cfg.data
    dataset = f"{data.source} `{data.path}`" + (f" (config `{data.config}`)" if data.config else "")
    if data.source == "hf":
        dataset += f", split `{data.split}`"
    subset = []
    if data.fraction < 1:
        subset.append(f"a {data.fraction:g} fraction by row-id hash (seed {data.seed})")
    if data.limit:
        subset.append(f"the first {data.limit} rows")
    tokens = "the CLS token of each image" if cfg.extract.token_mode == "cls" else "every token"
    revision = f" at revision `{cfg.model.revision}`" if cfg.model.revision else ""
    train = cfg.train
    length = f"{train.steps} steps" if train.steps else f"{train.epochs:g} epochs"
    hyper = {
        "k": sae.cfg.k,
        "num_latents": sae.num_latents,
        "expansion_factor": params.expansion_factor,
        "lr": params.lr,
        "auxk_alpha": params.auxk_alpha,
        **{name: getattr(params, name) for name in sae.architecture.searched},
        "batch_size (images)": train.batch_size,
        "length": length,
        "lr_schedule": f"{train.lr_schedule}, {train.lr_warmup_steps} warmup steps",
        "dead_feature_threshold": train.dead_feature_threshold,
        "normalize_decoder": sae.cfg.normalize_decoder,
    }
    metrics = {
        "FVU (fraction of variance unexplained)": m.get("fvu"),
        "L0 (active latents per input)": m.get("l0"),
        "dead fraction (never fired on validation)": m.get("dead_frac"),
    }
    folder = f"layers.{layer}"
    arch = sae.architecture.title
    lines = [
        f"# {arch} SAE: {cfg.model.name_or_path}, layer {layer}",
        "",
        f"A {arch} sparse autoencoder on CLIP vision activations, trained by clip-sae-sweeps.",
        "",
        f"- **CLIP checkpoint:** `{cfg.model.name_or_path}`{revision} (vision tower)",
        f"- **Layer:** {layer}, the residual stream after encoder block {layer} (0-based), "
        f"i.e. `hidden_states[{layer + 1}]` before any final layer norm; the output of "
        f"transformers' `encoder.layers.{layer}` (TransformerLens: "
        f"`blocks.{layer}.hook_resid_post`)",
        f"- **Token mode:** `{cfg.extract.token_mode}` ({tokens})",
        f"- **Dataset:** {dataset}" + (f", {' and '.join(subset)}" if subset else ""),
        f"- **Validation:** {train.val_fraction:g} of the images, held out by a hash of the "
        f"row id (seed {train.seed}); the metrics below are measured on it",
        f"- **Shape:** d_in {sae.d_in}, {sae.num_latents} latents, k {sae.cfg.k}",
        f"- **Sweep:** `{cfg.sweep.name}`, trial `{run.data.tags.get('trial_id', '')}`, "
        f"MLflow run `{run.info.run_id}`",
        "",
        "## Metrics (validation)",
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {format_value(v)} |" for k, v in metrics.items()),
        "",
        "## Hyperparameters",
        "",
        "| name | value |",
        "|---|---|",
        *(f"| {k} | {format_value(v)} |" for k, v in hyper.items()),
        "",
        "## Loading it",
        "",
        *_loading(sae, folder),
    ]
    return redact("\n".join(lines))  # a dataset or model given as a URI with a password


def sparsify_loads(activation: str) -> bool:
    """Whether sparsify's SparseCoder loads an SAE of this activation (TopK alone)."""
    return architectures.get(activation).sparsify


def _loading(sae: TopKSae, folder: str) -> list[str]:
    """The model card's encoder formula and loader snippets: sparsify only where it loads."""
    topk = sparsify_loads(sae.cfg.activation)
    rule = (
        "relu(topk((x - b_dec) @ W_enc + b_enc))"
        if topk
        else "pre * (pre > threshold), pre = (x - b_dec) @ W_enc + b_enc"
    )
    active = "the k active rows" if topk else "the rows of the latents that fire"
    sparsify = [
        "# EleutherAI sparsify (cfg.json and sae.safetensors)",
        "from sparsify import SparseCoder",
        f'sae = SparseCoder.load_from_disk("{folder}")',
        f'saes = SparseCoder.load_many("<the folder holding {folder}>", local=True)',
        "",
    ]
    return [
        f"The encoder is `{rule}` (`W_enc` is SAELens's name;",
        f"sparsify's `encoder.weight` is its transpose), the decoder the sum of {active}",
        "of `W_dec` plus `b_dec`. Feed it the layer's activations as described above.",
        "",
        "```python",
        "# clip-sae-sweeps",
        "from sae import TopKSae",
        f'sae = TopKSae.load("{folder}")',
        "out = sae(x)  # out.latent_acts, out.latent_indices, out.sae_out",
        "",
        *(sparsify if topk else []),
        f"# SAELens (cfg.json and sae_weights.safetensors, architecture "
        f"{'topk' if topk else 'jumprelu'})",
        "from sae_lens import SAE",
        f'sae = SAE.load_from_disk("{folder}")',
        "latents = sae.encode(x)  # dense (..., num_latents)",
        "```",
        "",
    ]
