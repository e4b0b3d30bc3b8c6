"""Rendering of an analysis: PNG figures and one self-contained HTML feature browser.

Pure drawing: everything shown is computed by sweeps.analysis and sweeps.analyze.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from sweeps.tracking import pareto_front  # noqa: E402

PARAMS = ("layer", "k", "expansion_factor", "lr", "auxk_alpha")
THUMB_PX = 112


def thumbnail(pixels_CHW: np.ndarray, size: int = THUMB_PX) -> bytes:
    """PNG bytes of a model-input crop, scaled to `size` pixels (what CLIP saw)."""
    image = Image.fromarray(np.ascontiguousarray(pixels_CHW.transpose(1, 2, 0)))
    buf = io.BytesIO()
    image.resize((size, size), Image.Resampling.BICUBIC).save(buf, format="PNG")
    return buf.getvalue()


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def frequency_histogram(frequency_M: np.ndarray, path: Path) -> Path:
    """Histogram of log10 firing frequency; dead latents (never fired) counted in the title."""
    live = frequency_M[frequency_M > 0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if len(live):
        ax.hist(np.log10(live), bins=50, color="#4477aa")
    ax.set_xlabel("log10 firing frequency")
    ax.set_ylabel("latents")
    ax.set_title(f"{len(frequency_M) - len(live)} dead of {len(frequency_M)} latents")
    return _save(fig, path)


def latent_grid(latents: list[dict], path: Path, max_rows: int = 12) -> Path:
    """One row per latent: its top images with activation and label."""
    rows = latents[:max_rows]
    cols = max((len(lat["images"]) for lat in rows), default=1) or 1
    fig, axes = plt.subplots(
        len(rows) or 1, cols, figsize=(1.3 * cols, 1.5 * max(len(rows), 1)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    for r, lat in enumerate(rows):
        axes[r, 0].set_title(f"latent {lat['id']}", loc="left", fontsize=8)
        for c, img in enumerate(lat["images"]):
            axes[r, c].imshow(Image.open(io.BytesIO(img["png"])))
            axes[r, c].text(
                0.5, -0.08, f"{img['act']:.3g} {img['label']}", transform=axes[r, c].transAxes,
                ha="center", va="top", fontsize=6,
            )  # fmt: skip
    return _save(fig, path)


def pareto_plot(trials: list[dict], path: Path) -> Path:
    """Validation FVU against L0 (left) and k (right); the FVU/L0 Pareto front joined."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    layers = sorted({t["layer"] for t in trials})
    for layer in layers:
        mine = [t for t in trials if t["layer"] == layer]
        for ax, x in ((left, "l0"), (right, "k")):
            ax.scatter(
                [t[x] for t in mine], [t["fvu"] for t in mine], label=f"layer {layer}", alpha=0.8
            )
    front = [trials[i] for i in pareto_front(trials, {"fvu": "min", "l0": "min"})]
    front.sort(key=lambda t: t["l0"])
    left.plot([t["l0"] for t in front], [t["fvu"] for t in front], "k--", lw=1, label="Pareto")
    left.set_xlabel("validation L0")
    right.set_xlabel("k")
    right.set_xscale("log", base=2)
    for ax in (left, right):
        ax.set_ylabel("validation FVU")
        ax.legend(fontsize=7)
    return _save(fig, path)


def fvu_vs_params(trials: list[dict], path: Path) -> Path:
    """Validation FVU against each hyperparameter; trials stopped early drawn hollow."""
    fig, axes = plt.subplots(1, len(PARAMS), figsize=(3 * len(PARAMS), 3), sharey=True)
    for ax, name in zip(axes, PARAMS):
        for stopped, style in ((False, {}), (True, {"facecolors": "none", "edgecolors": "C0"})):
            mine = [t for t in trials if t["stopped"] == stopped and t[name] is not None]
            ax.scatter([t[name] for t in mine], [t["fvu"] for t in mine], **style)
        if name == "lr":
            ax.set_xscale("log")
        ax.set_xlabel(name)
    axes[0].set_ylabel("validation FVU")
    return _save(fig, path)


def importance_plot(importances: dict[str, float], path: Path) -> Path:
    """Optuna's parameter importances for validation FVU."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(5, 0.5 + 0.4 * max(len(names), 1)))
    ax.barh(names, [importances[n] for n in names], color="#228833")
    ax.set_xlabel("importance for validation FVU (fANOVA)")
    return _save(fig, path)


def best_per_layer(trials: list[dict], path: Path) -> Path:
    """The best trial's validation FVU at each layer, labelled with its k and width."""
    best = {}
    for t in trials:
        if t["layer"] not in best or t["fvu"] < best[t["layer"]]["fvu"]:
            best[t["layer"]] = t
    layers = sorted(best)
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(layers)), 3.5))
    bars = ax.bar([str(la) for la in layers], [best[la]["fvu"] for la in layers], color="#aa3377")
    labels = [f"k={best[la]['k']} x{best[la]['expansion_factor']}" for la in layers]
    ax.bar_label(bars, labels, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("best validation FVU")
    return _save(fig, path)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _fmt(v) -> str:
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4g}"
    return html.escape(str(v))


CSS = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;height:100vh}
nav{width:15em;overflow-y:auto;border-right:1px solid #ccc;padding:.5em;flex:none}
nav a{display:block;text-decoration:none;color:#225;padding:.1em .3em;font-size:.85em}
nav a:hover{background:#eef}
main{overflow-y:auto;padding:1em 2em;flex:1}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em}
.grid{display:flex;flex-wrap:wrap;gap:.5em}
figure{margin:0;text-align:center;font-size:.75em}
figure img{display:block;width:112px;height:112px;image-rendering:pixelated}
section{border-top:1px solid #ddd;padding-top:.5em}
.fig{max-width:100%}
"""


def write_html(
    path: Path,
    title: str,
    summary: dict,
    downstream: dict,
    figures: dict[str, Path],
    latents: list[dict],
) -> Path:
    """One file, images inlined: summary tables, figures, and a browser of latents.

    Each latent dict holds id, frequency, max_act, mean_act and images (png, act, label)."""
    nav = "".join(
        f'<a href="#latent-{lat["id"]}">latent {lat["id"]} '
        f"<small>({lat['frequency']:.2%})</small></a>"
        for lat in latents
    )
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary.items()
    )
    checks = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in downstream.items()
    )
    figs = "".join(
        f"<h3>{html.escape(name)}</h3>"
        f'<img class="fig" alt="{html.escape(name)}" src="{_data_uri(p.read_bytes())}">'
        for name, p in figures.items()
    )
    sections = []
    for lat in latents:
        cells = "".join(
            f'<figure><img alt="row {img["row_id"]}" src="{_data_uri(img["png"])}">'
            f"{img['act']:.3g}<br>{html.escape(str(img['label']))}</figure>"
            for img in lat["images"]
        )
        sections.append(
            f'<section id="latent-{lat["id"]}"><h3>latent {lat["id"]}</h3>'
            f"<p>fires on {lat['frequency']:.3%} of inputs; max {lat['max_act']:.4g}, "
            f"mean when firing {lat['mean_act']:.4g}</p><div class=grid>{cells}</div></section>"
        )
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><nav><b>latents</b>{nav}</nav><main>"
        f"<h1>{html.escape(title)}</h1><h2>Whole dataset</h2><table>{rows}</table>"
        f"<h2>Downstream checks</h2><table>{checks or '<tr><td>none</td></tr>'}</table>"
        f"<h2>Figures</h2>{figs}<h2>Top images per latent</h2>{''.join(sections)}"
        "</main></body></html>"
    )
    path.write_text(page)
    return path
