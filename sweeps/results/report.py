"""The HTML feature browser of an analysis, and its JPEG thumbnails.

Pure rendering: everything shown is computed by results.scan and results.analyze, and the
figures it embeds are drawn by results.plots.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sweeps.vocabulary import format_value

THUMB_PX = 112
SHOWN_ROWS = 500
"""Table rows the browser draws at once; searching and sorting reach the others."""

MLFLOW_REPORT = "report_mlflow.html"
"""The copy of report.html made to open in MLflow's artifact view, its images inlined: MLflow
shows an HTML artifact from a blob: URL, so nothing beside it (thumbs/, the figures) loads."""

INLINE_BUDGET = 16 * 2**20
"""Thumbnail bytes (JPEG, before base64) the MLflow copy holds at most, about 21 MB of page:
the top images of 200 latents at 16 images of 5 KB, more where latents share images."""


@dataclass
class Inline:
    """Images a page carries in itself as data: URIs instead of loading them from files."""

    thumbs: Mapping[int, bytes]
    """JPEG bytes by row id."""
    latents: list[int]
    """The latents whose top images are all in `thumbs`."""


def inline_thumbnails(
    browser: dict, latents: list[int], directory: Path, budget: int = INLINE_BUDGET
) -> Inline:
    """The thumbnails of `directory` (thumbs/) that the MLflow copy inlines: the top images of
    `latents`, in their order (the --criterion's), while the whole stays within `budget`
    bytes. Images shared by several latents count once; rows without a file (images that no
    longer decode) are left out, as they are from thumbs/."""
    thumbs: dict[int, bytes] = {}
    kept, size = [], 0
    for m in latents:
        top = browser["details"][m]["top"] or []
        new = {row: directory / f"{row}.jpg" for row, _, _ in top if row not in thumbs}
        new = {row: path.read_bytes() for row, path in new.items() if path.is_file()}
        if size + sum(map(len, new.values())) > budget:
            break
        thumbs |= new
        size += sum(map(len, new.values()))
        kept.append(m)
    return Inline(thumbs, kept)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def thumbnail(pixels_CHW: np.ndarray, size: int = THUMB_PX) -> bytes:
    """JPEG bytes of a model-input crop, scaled to `size` pixels (what CLIP saw)."""
    image = Image.fromarray(np.ascontiguousarray(pixels_CHW.transpose(1, 2, 0)))
    buf = io.BytesIO()
    image.resize((size, size), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _cell(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return html.escape(format_value(v))


def _table(head: list[str], rows: list[list]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _accuracies(checks: dict, prefix: str, names: list[str], extra=None) -> str:
    rows = []
    for name in names:
        key = f"{prefix}/{name}"
        if key in checks:
            ci = f"{checks[key + '_ci_low']:.3f} - {checks[key + '_ci_high']:.3f}"
            rows.append([name.replace("_", " "), checks[key], ci, *(extra(name) if extra else [])])
    head = ["input", "accuracy", "95% interval"] + (["cosine to original"] if extra else [])
    return _table(head, rows)


def downstream_html(checks: dict) -> str:
    """The downstream checks with what they are measured against: n, chance, intervals."""
    parts = []
    if "probe/n" in checks:
        c = checks
        parts.append(
            f"<h3>Linear probe</h3><p>Ridge regression to one-hot labels (one regularisation, "
            f"&lambda; = {c['probe/ridge']:.3g}, for both), fit on {c['probe/n_train']} training "
            f"images and scored on {c['probe/n']} validation images of {c['probe/classes']} "
            f"classes. Predicting the training split's majority class scores "
            f"{c['probe/majority_rate']:.3f}.</p>"
            + _accuracies(c, "probe", ["original", "reconstructed"])
        )
    if "zero_shot/n" in checks:
        c = checks

        def cos(name):
            return ["1" if name == "original" else c.get(f"zero_shot/cosine_{name}", math.nan)]

        names = ["original", "spliced", "zero_ablation", "mean_ablation"]
        recovered = ", ".join(
            f"{c[k]:.3f} against {k.rsplit('_', 1)[1]} ablation"
            for k in ("zero_shot/recovered_vs_zero", "zero_shot/recovered_vs_mean")
            if k in c
        )
        parts.append(
            f"<h3>Zero-shot classification</h3><p>{c['zero_shot/n']} validation images, "
            f"stratified by class, covering {c['zero_shot/classes_covered']} of "
            f"{c['zero_shot/classes']} classes; {c['zero_shot/templates']} prompt template(s); "
            f"chance is 1/{c['zero_shot/classes']}. The SAE's reconstruction replaces the "
            "residual stream at the layer (spliced); ablations put zeros or the dataset mean "
            "there. Fraction of the ablation's loss the splice recovers, (spliced - ablated) / "
            f"(original - ablated): {recovered or '-'}.</p>"
            + _accuracies(c, "zero_shot", names, cos)
        )
    notes = [f"<p>{html.escape(k)}: {html.escape(v)}</p>" for k, v in checks.items()
             if isinstance(v, str)]  # fmt: skip
    return "".join(parts + notes) or "<p>none</p>"


# Wide: the latent's panel is fixed at the right and the page scrolls beside it. Narrow (MLflow's
# artifact view, a laptop's half screen): one column, the panel under the latents table, whose
# rows scroll in a box so that the panel stays near.
CSS = """
body{font-family:system-ui,sans-serif;margin:0}
main{padding:1em 2em;margin-right:36em;overflow-wrap:anywhere}
aside{position:fixed;top:0;right:0;bottom:0;width:36em;box-sizing:border-box;overflow-y:auto;
  border-left:1px solid #ccc;padding:.5em 1em;background:#fff}
@media (max-width:78em){
  main{margin-right:0;padding:.5em 1em}
  aside{position:static;width:auto;border:0;border-top:1px solid #ccc;padding:.5em 0;
    overflow:visible}
  #rows{max-height:60vh;overflow-y:auto}
  #search{width:100%;max-width:20em;box-sizing:border-box}
}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em}
#latents th{cursor:pointer;background:#f4f4f8;position:sticky;top:0}
#latents tbody tr{cursor:pointer}#latents tbody tr:hover{background:#eef}
#latents tr.on{background:#dde}#latents td{text-align:right}
#latents td:nth-child(6){text-align:left}
#latents.cls :is(td,th):nth-child(3){display:none}
.grid{display:flex;flex-wrap:wrap;gap:.4em}
figure{margin:0;text-align:center;font-size:.75em;width:112px}
figure img{display:block;width:112px;height:112px;background:#eee}
.fig{max-width:100%}#search{width:20em;font-size:1em}#missing{color:#a00}
"""

SCRIPT = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const COLS = ['latent', 'frequency', 'image_frequency', 'max_act', 'mean_act', 'top_label',
              'top_share'];
const tbody = document.querySelector('#latents tbody');
const search = document.getElementById('search');
const panel = document.getElementById('panel');
let sortCol = COLS.indexOf(D.sort), desc = true;
const label = i => i < 0 ? '' : (D.labels[i] ?? String(i));
const num = v => v === 0 ? '0' : (Math.abs(v) < 1e-3 ? v.toExponential(2) : v.toPrecision(4));
const pct = v => (100 * v).toPrecision(3) + '%';
function matches(row, q) {
  if (!q) return true;
  if (/^\d+$/.test(q)) return row[0] === Number(q);
  return label(row[5]).toLowerCase().includes(q);
}
function render() {
  const q = search.value.trim().toLowerCase();
  const rows = D.latents.filter(r => matches(r, q));
  const key = sortCol === 5 ? (r => label(r[5])) : (r => r[sortCol]);
  rows.sort((a, b) => {
    const x = key(a), y = key(b);
    return (x < y ? -1 : x > y ? 1 : 0) * (desc ? -1 : 1) || a[0] - b[0];
  });
  tbody.innerHTML = rows.slice(0, D.shown).map(r =>
    `<tr data-id="${r[0]}"><td>${r[0]}</td><td>${pct(r[1])}</td><td>${pct(r[2])}</td>` +
    `<td>${num(r[3])}</td><td>${num(r[4])}</td><td>${esc(label(r[5]))}</td>` +
    `<td>${r[5] < 0 ? '' : pct(r[6])}</td></tr>`).join('');
  document.getElementById('count').textContent = `${rows.length} of ${D.latents.length} latents` +
    (rows.length > D.shown ? `, the first ${D.shown} shown` : '');
  document.querySelectorAll('#latents th').forEach((th, i) =>
    th.dataset.sort = i === sortCol ? (desc ? 'desc' : 'asc') : '');
}
function esc(s) {
  return s.replace(/[&<>"]/g, c => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'})[c]);
}
function histogram(h) {
  if (!h) return '<p>never fired</p>';
  const first = h[0], counts = h.slice(1), top = Math.max(...counts);
  const w = Math.max(8, Math.floor(400 / counts.length));
  const bars = counts.map((c, i) => `<rect x="${i * w}" y="${100 - 100 * c / top}" ` +
    `width="${w - 1}" height="${100 * c / top}" fill="#4477aa"><title>` +
    `${num(D.edges[first + i])} - ${num(D.edges[first + i + 1])}: ${c}</title></rect>`).join('');
  return `<svg width="${counts.length * w}" height="100">${bars}</svg><br><small>` +
    `activation ${num(D.edges[first])} to ${num(D.edges[first + counts.length])}, ` +
    `log-spaced bins; the tallest holds ${top}</small>`;
}
// The MLflow copy carries its thumbnails (D.thumbs, for the latents D.inlined); report.html
// loads them from thumbs/ beside it.
const inlined = new Set(D.inlined || []);
const src = row => D.thumbs ? D.thumbs[row] : `thumbs/${row}.jpg`;
function show(id, scroll) {
  const r = D.latents[id], d = D.details[id];
  if (!r) return;
  const images = d.top === null
    ? '<p>Top images were not collected for this latent (not among the latents chosen ' +
      'with --latents / --top-latents).</p>'
    : D.thumbs && !inlined.has(id)
    ? `<p>This copy of the report, made to open inside MLflow, holds the top images of ` +
      `${inlined.size} latents (by ${esc(D.sort)}, within its size limit), not this one's. ` +
      `They are in report.html with thumbs/ beside it: download analysis/ from the run.</p>`
    : (D.thumbs ? '' : '<p id="missing" hidden>The images did not load: thumbs/ is not ' +
      'beside this page. Inside MLflow, open report_mlflow.html, which holds them; elsewhere, ' +
      'keep thumbs/ beside report.html.</p>') + '<div class="grid">' + d.top.map(([row, act, y]) =>
      `<figure><img loading="lazy" alt="row ${row}" src="${src(row)}">` +
      `${num(act)}<br>${esc(label(y))}</figure>`).join('') + '</div>';
  const classes = d.classes.map(([y, c]) =>
    `<tr><td>${esc(label(y))}</td><td>${c}</td><td>${pct(c / d.labelled)}</td></tr>`).join('');
  panel.innerHTML =
    `<h2>latent ${id}</h2><p>Fires on ${pct(r[1])} of inputs` +
    (D.mode === 'all' ? ` (tokens) and on ${pct(r[2])} of images (any token)` : '') +
    `; max ${num(r[3])}, mean when firing ${num(r[4])}.</p>` +
    `<h3>Activations when firing (${D.mode === 'all' ? 'tokens' : 'images'})</h3>` +
    histogram(d.hist) +
    `<h3>Labels of the images it fires on</h3>` +
    (classes ? `<table><tr><th>label</th><th>images</th><th>share</th></tr>${classes}</table>`
      : '<p>no labelled images</p>') +
    `<h3>Top images</h3><p>The images with its highest activation` +
    (D.mode === 'all' ? ' (its max over the image\'s tokens)' : '') +
    `, ties in row id order; each with its activation and label.</p>` + images;
  const missing = document.getElementById('missing');
  if (missing) panel.querySelectorAll('img').forEach(im => im.addEventListener('error', () => {
    missing.hidden = false;
  }, {once: true}));
  document.querySelectorAll('#latents tr.on').forEach(tr => tr.classList.remove('on'));
  document.querySelector(`#latents tr[data-id="${id}"]`)?.classList.add('on');
  // In one column the panel is under the table: bring it into view when a row is clicked.
  if (scroll && getComputedStyle(panel).position !== 'fixed') panel.scrollIntoView();
  try {
    history.replaceState(null, '', '#latent=' + id);
  } catch (e) {}  // a sandboxed page (MLflow's viewer) may not rewrite its address
}
search.addEventListener('input', render);
document.querySelector('#latents thead').addEventListener('click', e => {
  const i = [...e.target.closest('tr').children].indexOf(e.target.closest('th'));
  if (i < 0) return;
  desc = i === sortCol ? !desc : i !== 0 && i !== 5;
  sortCol = i;
  render();
});
tbody.addEventListener('click', e => {
  const tr = e.target.closest('tr');
  if (tr) show(Number(tr.dataset.id), true);
});
const hash = new URLSearchParams(location.hash.slice(1));
if (hash.has('q')) search.value = hash.get('q');
render();
show(hash.has('latent') ? Number(hash.get('latent')) : (D.latents.length ? Number(
  tbody.querySelector('tr')?.dataset.id ?? 0) : 0));
"""


def write_html(
    path: Path,
    title: str,
    summary: dict,
    downstream: dict,
    figures: dict[str, Path],
    browser: dict,
    inline: Inline | None = None,
) -> Path:
    """report.html beside its figures and thumbs/<row id>.jpg: summary tables, the downstream
    checks, the figures, and a browser of every latent. `browser` is the JSON the page reads
    (analyze.browser_data): a row per latent, details per latent, label names. With `inline`,
    the page holds its figures and those thumbnails as data: URIs and needs no file beside it
    (the MLflow copy)."""
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{_cell(v)}</td></tr>" for k, v in summary.items()
    )

    def figure_src(p: Path) -> str:
        return data_uri(p.read_bytes(), "image/png") if inline else html.escape(p.name)

    figs = "".join(
        f"<h3>{html.escape(name)}</h3>"
        f'<img class="fig" loading="lazy" alt="{html.escape(name)}" src="{figure_src(p)}">'
        for name, p in figures.items()
    )
    all_mode = browser["mode"] == "all"
    head = "".join(
        f'<th title="{html.escape(tip)}">{html.escape(name)}</th>'
        for name, tip in (
            ("latent", "latent id"),
            ("frequency", "fraction of inputs (tokens in all-token mode) it fires on"),
            ("images", "fraction of images it fires on (on any token)"),
            ("max", "highest activation"),
            ("mean when firing", "mean activation over the inputs where it fires"),
            ("top label", "the label most frequent among the images it fires on"),
            ("share", "that label's share of the labelled images it fires on"),
        )
    )
    note = ""
    if inline is not None:
        thumbs = {str(r): data_uri(b, "image/jpeg") for r, b in inline.thumbs.items()}
        browser = {**browser, "thumbs": thumbs, "inlined": list(inline.latents)}
        note = (
            "<p>This copy holds its images in itself, to open inside MLflow: the top images "
            f"of {len(inline.latents)} latents. report.html beside it loads every latent's "
            "from thumbs/.</p>"
        )
    # No <, > or & in the page's JSON at all: a label such as "<!--<script>" once put the
    # parser in a state where the closing tag did not close, blanking the report.
    data = json.dumps(browser, separators=(",", ":"))
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = (
        f"<!doctype html><html><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{CSS}</style></head><body><main>"
        f"<h1>{html.escape(title)}</h1><h2>Whole dataset</h2><table>{rows}</table>"
        f"<h2>Downstream checks</h2>{downstream_html(downstream)}"
        f"<h2>Latents</h2><p>Every latent of the SAE. Click a header to sort (first by "
        f"{html.escape(browser['sort'])}, the --criterion), a row to see the latent. Search by "
        f"latent id or label. Frequencies count "
        f"{'tokens; images counts images with any token firing' if all_mode else 'images'}.</p>"
        f"{note}"
        f'<input id=search type=search placeholder="latent id or label"> <span id=count></span>'
        f"<div id=rows><table id=latents class={browser['mode']}><thead><tr>{head}</tr></thead>"
        "<tbody></tbody></table></div><aside id=panel></aside>"
        f"<h2>Figures</h2>{figs}</main>"
        f'<script type="application/json" id="data">{data}</script>'
        f"<script>{SCRIPT}</script></body></html>"
    )
    path.write_text(page)
    return path
