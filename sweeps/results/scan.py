"""What an SAE does on a whole cached dataset: latent statistics, top images per latent, and
downstream checks (a linear probe; zero-shot accuracy with the SAE spliced into CLIP).

The scan streams one layer of the cache in batches of a fixed number of inputs (tokens in
`all` mode): its memory depends on that batch size and the SAE's width, never on the number
of images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor

from sae import TopKSae
from sae.metrics import SaeStats
from sweeps.activations import cache
from sweeps.activations.clip import Preprocessing, capture_layers, vision_tower
from sweeps.activations.sources import decode_batch
from sweeps.config import DataConfig
from sweeps.progress import progress_bar
from sweeps.ridge import RidgeProbe, image_features

CRITERIA = ("max_act", "mean_act", "frequency")
PROBE_INPUTS = ("original", "reconstructed")
PROMPT = "a photo of a {}."
PROMPT_ENSEMBLE = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)
"""The 7 templates the CLIP authors selected for ImageNet (their prompt-engineering notebook)."""
HIST_EDGES = 10.0 ** np.arange(-3, 4.01, 0.125)
"""Activation histogram bin edges: 8 per decade from 1e-3 to 1e4; values outside fall in the
first or last bin."""
ROW_LIMIT = 2**31
"""Top images pack (activation, row id) in one int64 sort key: row ids must be below this."""
TIE_BITS = 10
"""Top images rank activations at float32 precision less this many bits: 13 significant bits,
about 4 digits (the float16 cache itself holds 11)."""


@dataclass
class LatentStats:
    """Whole-dataset results of one SAE on one layer."""

    summary: dict[str, float]
    """fvu, l0, never_fired_frac, dense_frac, ... (SaeStats.result) over every input, plus
    images and inputs counted."""
    frequency_M: np.ndarray
    """Fraction of inputs (tokens in `all` mode) on which each latent fired."""
    image_frequency_M: np.ndarray
    """Fraction of images on which each latent fired on at least one input (token)."""
    max_act_M: np.ndarray
    mean_act_M: np.ndarray
    """Mean activation over the inputs where the latent fired (0 for dead latents)."""
    top_act_MN: np.ndarray
    """Per latent, the N highest image activations (max over an image's tokens), descending;
    ties in row id order. 0: an empty slot."""
    top_row_MN: np.ndarray
    """Row ids of those images (-1: empty)."""
    top_label_MN: np.ndarray
    class_count_CM: np.ndarray
    """Images of each label (0..C-1) on which each latent fired."""
    act_hist_MH: np.ndarray
    """Per latent, counts of its firing activations (over inputs) in the bins of HIST_EDGES."""
    mean_TD: np.ndarray
    """Mean input per token position over every image (T = 1 in `cls` mode), float32."""


def _sort_keys(act: Tensor, row: Tensor) -> Tensor:
    """int64 keys ordering (activation desc, row id asc) as one descending sort; -1 where the
    activation is not positive. A non-negative float32's bits order as integers; rounding
    off TIE_BITS of them makes activations that differ only in float noise (the same image
    encoded in batches of other shapes) tie, so row ids decide."""
    bits = act.float().contiguous().view(torch.int32).long()
    quantum = (bits + (1 << (TIE_BITS - 1))) >> TIE_BITS
    key = (quantum << 31) | (ROW_LIMIT - 1 - row)
    return torch.where(act > 0, key, torch.full_like(key, -1))


def _lowest_tying(key: Tensor) -> Tensor:
    """The smallest activation whose sort key can tie or beat `key`'s activation (0: empty)."""
    quantum = key >> 31
    bits = ((quantum << TIE_BITS) - (1 << (TIE_BITS - 1))).clamp(min=0)
    return torch.where(key >= 0, bits.int().view(torch.float32), torch.zeros_like(bits).float())


class Scan:
    """Streaming accumulator of LatentStats: feed it batches, read `result()`."""

    def __init__(self, num_latents: int, top_n: int, device: torch.device | str = "cpu"):
        self.stats = SaeStats(num_latents, device)
        self.images = 0
        self.max_M = torch.zeros(num_latents, device=device)
        self.sum_M = torch.zeros(num_latents, dtype=torch.float64, device=device)
        self.image_fired_M = torch.zeros(num_latents, dtype=torch.int64, device=device)
        self.class_count_CM = torch.zeros(0, num_latents, dtype=torch.int64, device=device)
        self.hist_MH = torch.zeros(
            num_latents, len(HIST_EDGES) - 1, dtype=torch.int64, device=device
        )
        self.edges = torch.tensor(HIST_EDGES[1:-1], dtype=torch.float32, device=device)
        self.sum_TD: Tensor | None = None
        # Sort keys of (activation, row id), descending; -1 is an empty slot (never shown).
        self.top_key_NM = torch.full((top_n, num_latents), -1, device=device)
        self.top_act_NM = torch.zeros(top_n, num_latents, device=device)
        self.top_label_NM = torch.full((top_n, num_latents), -1, device=device)

    @torch.no_grad()
    def update(self, row_B: Tensor, label_B: Tensor, x_BTD, x_hat_BTD, acts_BK, idx_BK) -> None:
        """One batch: row ids and labels (B,), inputs and reconstructions (B, T, D), codes of
        the B * T inputs."""
        b, t, _ = x_BTD.shape
        m, h = self.max_M.numel(), self.hist_MH.shape[1]
        if len(row_B) and int(row_B.max()) >= ROW_LIMIT:
            raise ValueError(f"row ids must be below {ROW_LIMIT} (got {int(row_B.max())})")
        self.stats.update(x_BTD.flatten(0, 1), x_hat_BTD.flatten(0, 1), acts_BK, idx_BK)
        self.images += b
        x_sum = x_BTD.double().sum(0)
        self.sum_TD = x_sum if self.sum_TD is None else self.sum_TD + x_sum
        fired = acts_BK > 0
        self.sum_M.index_add_(0, idx_BK[fired], acts_BK[fired].double())
        bins = torch.bucketize(acts_BK[fired].float(), self.edges)
        self.hist_MH += torch.bincount(idx_BK[fired] * h + bins, minlength=m * h).view(m, h)
        # Per image, the max over its tokens, reduced straight into (B, M): never (B*T, M).
        image_BK = torch.arange(b, device=idx_BK.device).repeat_interleave(t)[:, None]
        img_BM = (
            acts_BK.new_zeros(b * m)
            .scatter_reduce_(0, (image_BK * m + idx_BK).flatten(), acts_BK.flatten(), "amax")
            .view(b, m)
        )
        self.max_M = torch.maximum(self.max_M, img_BM.amax(0))
        self._count_classes(label_B, img_BM)
        self._merge_top(row_B, label_B, img_BM)

    def _count_classes(self, label_B: Tensor, img_BM: Tensor) -> None:
        m = img_BM.shape[1]
        b_idx, m_idx = (img_BM > 0).nonzero(as_tuple=True)
        self.image_fired_M += torch.bincount(m_idx, minlength=m)
        labelled = label_B[b_idx] >= 0
        b_idx, m_idx = b_idx[labelled], m_idx[labelled]
        if len(b_idx) == 0:
            return
        classes = max(int(label_B.max()) + 1, self.class_count_CM.shape[0])
        if classes > self.class_count_CM.shape[0]:
            grow = classes - self.class_count_CM.shape[0]
            self.class_count_CM = torch.nn.functional.pad(self.class_count_CM, (0, 0, 0, grow))
        flat = torch.bincount(label_B[b_idx] * m + m_idx, minlength=classes * m)
        self.class_count_CM += flat.view(classes, m)

    def _merge_top(self, row_B: Tensor, label_B: Tensor, img_BM: Tensor) -> None:
        # Candidates: the (image, latent) pairs that fire at least as high as the latent's
        # current N-th best, at most B * T * k of them (few once the lists fill up). Each
        # touched latent's N entries and its candidates are sorted together by (latent, key
        # descending); the first N of each latent stay.
        low_M = _lowest_tying(self.top_key_NM[-1])
        b_idx, m_idx = ((img_BM > 0) & (img_BM >= low_M)).nonzero(as_tuple=True)
        if len(b_idx) == 0:
            return
        n, m = self.top_key_NM.shape
        touched = torch.zeros(m, dtype=torch.bool, device=m_idx.device)
        touched[m_idx] = True
        filled_NC = self.top_key_NM[:, touched] >= 0  # empty slots need no sorting
        n_idx, c_idx = filled_NC.nonzero(as_tuple=True)
        cols = touched.nonzero().squeeze(1)[c_idx]
        act = img_BM[b_idx, m_idx]
        latent = torch.cat([cols, m_idx])
        key = torch.cat([self.top_key_NM[n_idx, cols], _sort_keys(act, row_B[b_idx])])
        label = torch.cat([self.top_label_NM[n_idx, cols], label_B[b_idx]])
        act = torch.cat([self.top_act_NM[n_idx, cols], act])
        # Keys are unique (one per row id), so the order is total: by key, then by latent
        # keeping that order (one sort of latent * len + position).
        by_key = key.argsort(descending=True)
        position = torch.empty_like(by_key)
        position[by_key] = torch.arange(len(key), device=key.device)
        order = (latent * len(key) + position).argsort()
        latent = latent[order]
        rank = torch.arange(len(order), device=order.device)
        rank -= torch.searchsorted(latent, latent)
        keep = rank < n
        # A latent keeps at least as many entries as it had filled, so no stale slot is left.
        at = (rank[keep], latent[keep])
        self.top_key_NM[at] = key[order][keep]
        self.top_label_NM[at] = label[order][keep]
        self.top_act_NM[at] = act[order][keep]

    def result(self) -> LatentStats:
        fired_M = self.stats.fired_M.double()
        row_NM = torch.where(
            self.top_key_NM >= 0, ROW_LIMIT - 1 - (self.top_key_NM & (ROW_LIMIT - 1)), -1
        )
        return LatentStats(
            summary={**self.stats.result(), "images": self.images, "inputs": self.stats.n},
            frequency_M=self.stats.firing_frequency().cpu().numpy(),
            image_frequency_M=(self.image_fired_M.double() / max(self.images, 1)).cpu().numpy(),
            max_act_M=self.max_M.cpu().numpy(),
            mean_act_M=(self.sum_M / fired_M.clamp(min=1)).float().cpu().numpy(),
            top_act_MN=self.top_act_NM.T.cpu().numpy(),
            top_row_MN=row_NM.T.cpu().numpy(),
            top_label_MN=self.top_label_NM.T.cpu().numpy(),
            class_count_CM=self.class_count_CM.cpu().numpy(),
            act_hist_MH=self.hist_MH.cpu().numpy(),
            mean_TD=(self.sum_TD / max(self.images, 1)).float().cpu().numpy(),
        )


def wilson_interval(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion correct/n (NaN, NaN for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(prefix: str, correct: int, n: int) -> dict[str, float]:
    """{prefix: correct/n, prefix_ci_low, prefix_ci_high}: accuracy and its 95% interval."""
    low, high = wilson_interval(correct, n)
    return {prefix: correct / n, f"{prefix}_ci_low": low, f"{prefix}_ci_high": high}


@torch.no_grad()
def scan(
    sae: TopKSae,
    cache_dir: str | Path,
    layer: int,
    top_n: int = 16,
    batch_size: int = 1024,
    val_fraction: float = 0.05,
    seed: int = 0,
    ridge: float = 1e-3,
) -> tuple[LatentStats, dict[str, float]]:
    """Encode every cached image of `layer` in batches of batch_size inputs: LatentStats, and
    the linear probe's validation accuracy on original and reconstructed activations (fit on
    the training split, scored on the validation split in a second pass)."""
    stats = Scan(sae.num_latents, top_n, sae.device)
    probes = {name: RidgeProbe(sae.d_in, device=sae.device) for name in PROBE_INPUTS}
    rows = cache.read_manifest(cache_dir)["rows"]
    batches = _encoded(sae, cache_dir, layer, batch_size)
    with progress_bar(f"analyse layer {layer}", "img", total=rows) as bar:
        for row_B, label_B, x_BTD, x_hat_BTD, acts_BK, idx_BK in batches:
            stats.update(row_B, label_B, x_BTD, x_hat_BTD, acts_BK, idx_BK)
            val_B = cache.is_val(row_B.cpu().numpy(), val_fraction, seed)
            train_B = ~torch.from_numpy(val_B).to(row_B.device) & (label_B >= 0)
            for probe, inputs in zip(probes.values(), (x_BTD, x_hat_BTD)):
                probe.update(image_features(inputs)[train_B], label_B[train_B])
            bar.update(len(row_B))
    return stats.result(), _probe_accuracy(
        sae, cache_dir, layer, batch_size, probes, val_fraction, seed, ridge
    )


def _encoded(sae: TopKSae, cache_dir, layer: int, batch_size: int, val_split=None):
    """Cached batches on the SAE's device with their codes and reconstructions; with
    `val_split=(val_fraction, seed)`, only the validation rows."""
    for row_B, label_B, x_BTD in cache.iter_layer(cache_dir, layer, batch_size):
        if val_split is not None:
            keep = cache.is_val(row_B, *val_split)
            row_B, label_B, x_BTD = row_B[keep], label_B[keep], x_BTD[torch.from_numpy(keep)]
        if len(row_B) == 0:
            continue
        x_BTD = x_BTD.to(sae.device)
        acts_BK, idx_BK = sae.encode(x_BTD.flatten(0, 1))
        x_hat_BTD = sae.decode(acts_BK, idx_BK).view_as(x_BTD)
        row_B, label_B = (torch.tensor(a, device=sae.device) for a in (row_B, label_B))
        yield row_B, label_B, x_BTD, x_hat_BTD, acts_BK, idx_BK


def _probe_accuracy(sae, cache_dir, layer, batch_size, probes, val_fraction, seed, ridge):
    """Validation accuracy of both probes with its 95% interval, beside what chance gives:
    the rate of the training split's majority class, n, and the classes seen."""
    counts = probes["original"].class_counts()
    if int((counts > 0).sum()) < 2:
        return {}  # fewer than two classes in the training split: nothing to probe
    # One regularisation for both, from the original features: the two probes differ only
    # in their inputs.
    lam = probes["original"].default_ridge(ridge)
    for probe in probes.values():
        probe.fit(lam)
    majority = int(counts.argmax())
    correct, total, hits = dict.fromkeys(probes, 0), 0, 0
    batches = _encoded(sae, cache_dir, layer, batch_size, (val_fraction, seed))
    for _, label_B, x_BTD, x_hat_BTD, _, _ in batches:
        ok = label_B >= 0
        for name, inputs in zip(probes, (x_BTD, x_hat_BTD)):
            pred = probes[name].predict(image_features(inputs)[ok])
            correct[name] += int((pred == label_B[ok]).sum())
        total += int(ok.sum())
        hits += int((label_B[ok] == majority).sum())
    if total == 0:
        return {}
    result = {
        "probe/n_train": int(counts.sum()),
        "probe/n": total,
        "probe/classes": int((counts > 0).sum()),
        "probe/majority_rate": hits / total,
        "probe/ridge": lam,
    }
    for name, c in correct.items():
        result |= accuracy(f"probe/{name}", c, total)
    return result


def select_latents(stats: LatentStats, criterion: str, n: int) -> list[int]:
    """The n live latents ranked highest by criterion (max_act, mean_act or frequency); every
    live latent, in that order, for n = 0."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    score = {
        "max_act": stats.max_act_M,
        "mean_act": stats.mean_act_M,
        "frequency": stats.frequency_M,
    }[criterion]
    live = np.flatnonzero(stats.frequency_M > 0)
    return live[np.argsort(-score[live], kind="stable")][: n or None].tolist()


def iter_images(
    index: pa.Table, row_ids, data: DataConfig, pre: Preprocessing, batch_size: int = 64
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(row_id_B, label_B, pixels_BCHW uint8) of the given rows of a source index, fetched and
    preprocessed as extraction did; images that no longer decode are left out."""
    wanted = index.filter(pc.is_in(index["row_id"], pa.array(np.asarray(row_ids), pa.int64())))
    for start in range(0, len(wanted), batch_size):
        chunk = wanted.slice(start, batch_size)
        block = {c: chunk[c].to_numpy(zero_copy_only=False) for c in chunk.column_names}
        out = decode_batch(block, data, pre, max_pixels=2**62)
        ok = out["reason"] == ""
        yield out["row_id"][ok], out["label"][ok], out["pixels"][ok]


def zero_shot_sample(row_ids: np.ndarray, labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Up to n labelled row ids, stratified by class: classes take turns, each giving its
    rows in hash order, so n >= C covers every class present and n < C takes n classes at
    random. Never the first rows in id order (for folder data, the first classes)."""
    keep = labels >= 0
    row_ids, labels = row_ids[keep], labels[keep]
    h = cache.unit_hash(row_ids, seed + 1)  # an order independent of the val split's hash
    order = np.lexsort((h, labels))
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - starts  # position within its class, hash order
    return np.sort(row_ids[np.lexsort((h, rank))[:n]])


@torch.inference_mode()
def spliced_embeddings(
    model: torch.nn.Module,
    pixels_BCHW: Tensor,
    layer: int,
    token_mode: str,
    edits: dict[str, Callable[[Tensor], Tensor]],
) -> dict[str, Tensor]:
    """Image embeddings (B, P) of a CLIPModel with the residual stream after block `layer`
    replaced by `edit(h)` for each edit. h is (B, 1, D), the CLS position, in `cls` mode (the
    position the SAE was trained on), and (B, T, D), every token, in `all` mode. "original"
    is the unedited model."""
    vision = vision_tower(model)
    h_BTD = capture_layers(model, pixels_BCHW, [layer], "all")[layer]
    out = {}
    for name, edit in {"original": None, **edits}.items():
        h = h_BTD.clone()
        if edit is not None and token_mode == "cls":
            h[:, :1] = edit(h_BTD[:, :1])
        elif edit is not None:
            h = edit(h_BTD)
        for block in vision.encoder.layers[layer + 1 :]:
            h = block(h, None)
        out[name] = model.visual_projection(vision.post_layernorm(h[:, 0]))
    return out


@torch.inference_mode()
def class_text_features(model, tokenizer, class_names: list[str], templates) -> Tensor:
    """(C, P) unit text embeddings, one per class: with several templates, the normalised
    mean of each template's unit embedding (the CLIP paper's prompt ensemble)."""
    total = 0
    for template in templates:
        text = tokenizer(
            [template.format(c) for c in class_names], padding=True, return_tensors="pt"
        )
        feats = model.get_text_features(**text.to(model.device)).pooler_output
        total = total + torch.nn.functional.normalize(feats, dim=-1)
    return torch.nn.functional.normalize(total, dim=-1)


@torch.inference_mode()
def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    class_names: list[str],
    batches,
    layer: int,
    token_mode: str,
    reconstruct: Callable[[Tensor], Tensor],
    pre: Preprocessing,
    mean_TD: np.ndarray | None = None,
    templates=(PROMPT,),
) -> dict[str, float]:
    """Zero-shot accuracy (with its 95% interval) of the original model, of the SAE
    reconstruction spliced in at `layer`, and of zero and mean ablation there; the fraction
    of the accuracy lost to ablation that the splice recovers, (spliced - ablated) /
    (original - ablated); and the mean cosine of each edited image embedding to the original.
    `batches` yields (row_id_B, label_B, pixels_BCHW uint8) as iter_images does; mean_TD is
    the scan's mean input per token position (no mean ablation without it)."""
    text_CP = class_text_features(model, tokenizer, class_names, templates)
    edits = {"spliced": reconstruct, "zero_ablation": torch.zeros_like}
    if mean_TD is not None:
        mean = torch.from_numpy(np.asarray(mean_TD, np.float32))
        edits["mean_ablation"] = lambda h: mean[: h.shape[1]].to(h).expand_as(h)
    names = ["original", *edits]
    correct, cosine, total = dict.fromkeys(names, 0), dict.fromkeys(names, 0.0), 0
    seen = set()
    dtype = next(model.parameters()).dtype
    for _, label_B, pixels_BCHW in batches:
        ok = label_B >= 0
        if not ok.any():
            continue
        pixels = pre.normalize(torch.from_numpy(pixels_BCHW[ok]), dtype).to(model.device)
        label = torch.from_numpy(label_B[ok]).to(model.device)
        embs = spliced_embeddings(model, pixels, layer, token_mode, edits)
        for name, emb_BP in embs.items():
            unit_BP = torch.nn.functional.normalize(emb_BP.float(), dim=-1)
            correct[name] += int(((unit_BP @ text_CP.T.float()).argmax(1) == label).sum())
            ref_BP = torch.nn.functional.normalize(embs["original"].float(), dim=-1)
            cosine[name] += float((unit_BP * ref_BP).sum())
        total += int(ok.sum())
        seen |= set(label_B[ok].tolist())
    if total == 0:
        return {}
    result = {
        "zero_shot/n": total,
        "zero_shot/classes": len(class_names),
        "zero_shot/classes_covered": len(seen),
        "zero_shot/templates": len(templates),
    }
    for name in names:
        result |= accuracy(f"zero_shot/{name}", correct[name], total)
    for name in edits:
        result[f"zero_shot/cosine_{name}"] = cosine[name] / total
    for ablation in [n for n in edits if n.endswith("_ablation")]:
        lost = correct["original"] - correct[ablation]
        recovered = (correct["spliced"] - correct[ablation]) / lost if lost else math.nan
        result[f"zero_shot/recovered_vs_{ablation.removesuffix('_ablation')}"] = recovered
    return result


def reconstruct_with(sae: TopKSae) -> Callable[[Tensor], Tensor]:
    def reconstruct(h_BTD: Tensor) -> Tensor:
        x_hat = sae.decode(*sae.encode(h_BTD.flatten(0, 1).to(sae.W_dec.dtype)))
        return x_hat.view_as(h_BTD).to(h_BTD.dtype)

    return reconstruct
