"""What an SAE does on a whole cached dataset: latent statistics, top images per latent, and
downstream checks (a linear probe; zero-shot accuracy with the SAE spliced into CLIP).

The scan streams one layer of the cache in record batches: its memory depends on the batch
size and the SAE's width, never on the number of images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor
from tqdm import tqdm

from sae import TopKSae
from sae.clip import Preprocessing, capture_layers, vision_tower
from sae.metrics import SaeStats
from sweeps import cache
from sweeps.config import DataConfig
from sweeps.extract import decode_batch

CRITERIA = ("max_act", "mean_act", "frequency")
PROBE_INPUTS = ("original", "reconstructed")
PROMPT = "a photo of a {}."


def iter_layer(
    cache_dir: str | Path, layer: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, Tensor]]:
    """(row_id_B, label_B, x_BTD float32) batches of one cached layer, T = 1 in `cls` mode.

    Parts are read one at a time and regrouped into batches of batch_size images (a part
    holds one extraction batch, often far fewer)."""
    manifest = cache.read_manifest(cache_dir)
    if layer not in manifest["layers"]:
        raise KeyError(f"layer {layer} is not in cache {cache_dir} (layers: {manifest['layers']})")
    column = f"layer_{layer}"
    pending, size = [], 0
    for part in manifest["parts"]:
        reader = pq.ParquetFile(Path(cache_dir) / part)
        for batch in reader.iter_batches(batch_size, columns=["row_id", "label", column]):
            col = batch.column(column)
            x = col.storage.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
            pending.append(
                (
                    batch.column("row_id").to_numpy(),
                    batch.column("label").to_numpy(),
                    x.reshape(len(col), -1, col.type.shape[-1]),
                )
            )
            size += batch.num_rows
            while size >= batch_size:
                row, label, x = (np.concatenate(a) for a in zip(*pending))
                yield row[:batch_size], label[:batch_size], torch.from_numpy(x[:batch_size])
                pending = [(row[batch_size:], label[batch_size:], x[batch_size:])]
                size -= batch_size
    if size:
        row, label, x = (np.concatenate(a) for a in zip(*pending))
        yield row, label, torch.from_numpy(x)


def is_val(row_ids: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """The training run's validation split (cache.load_layer's rule)."""
    return cache.unit_hash(row_ids, seed) < val_fraction


@dataclass
class LatentStats:
    """Whole-dataset results of one SAE on one layer."""

    summary: dict[str, float]
    """fvu, l0, never_fired_frac, dense_frac, ... (SaeStats.result) over every input, plus
    images and inputs counted."""
    frequency_M: np.ndarray
    """Fraction of inputs (tokens in `all` mode) on which each latent fired."""
    max_act_M: np.ndarray
    mean_act_M: np.ndarray
    """Mean activation over the inputs where the latent fired (0 for dead latents)."""
    top_act_MN: np.ndarray
    """Per latent, the N highest image activations (max over an image's tokens), descending."""
    top_row_MN: np.ndarray
    top_label_MN: np.ndarray


class Scan:
    """Streaming accumulator of LatentStats: feed it batches, read `result()`."""

    def __init__(self, num_latents: int, top_n: int, device: torch.device | str = "cpu"):
        self.stats = SaeStats(num_latents, device)
        self.images = 0
        self.max_M = torch.zeros(num_latents, device=device)
        self.sum_M = torch.zeros(num_latents, dtype=torch.float64, device=device)
        # Sorted descending; an activation of 0 is an empty slot (never shown).
        self.top_act_NM = torch.zeros(top_n, num_latents, device=device)
        self.top_row_NM = torch.full((top_n, num_latents), -1, device=device)
        self.top_label_NM = torch.full((top_n, num_latents), -1, device=device)

    @torch.no_grad()
    def update(self, row_B: Tensor, label_B: Tensor, x_BTD, x_hat_BTD, acts_BK, idx_BK) -> None:
        """One batch: row ids and labels (B,), inputs and reconstructions (B, T, D), codes."""
        b, t, _ = x_BTD.shape
        m = self.max_M.numel()
        self.stats.update(x_BTD.flatten(0, 1), x_hat_BTD.flatten(0, 1), acts_BK, idx_BK)
        self.images += b
        self.sum_M.index_add_(0, idx_BK.flatten(), acts_BK.flatten().double())
        # Dense (B*T, M) is the size of the encoder's own pre-activations: no extra order.
        z_BTM = acts_BK.new_zeros(b * t, m).scatter_(1, idx_BK, acts_BK).view(b, t, m)
        img_BM = z_BTM.amax(1)
        self.max_M = torch.maximum(self.max_M, img_BM.amax(0))
        # Only latents where this batch beats the current N-th best need a merge; after the
        # first batches that is a small fraction of them.
        cols = (img_BM > self.top_act_NM[-1]).any(0).nonzero().squeeze(1)
        if len(cols) == 0:
            return
        n = len(self.top_act_NM)
        cand = torch.cat([self.top_act_NM[:, cols], img_BM[:, cols]])
        vals_NC, pos_NC = cand.topk(n, dim=0)
        new = pos_NC >= n
        at_new, at_old = (pos_NC - n).clamp(min=0), pos_NC.clamp(max=n - 1)
        for top, batch in ((self.top_row_NM, row_B), (self.top_label_NM, label_B)):
            top[:, cols] = torch.where(new, batch[at_new], top[:, cols].gather(0, at_old))
        self.top_act_NM[:, cols] = vals_NC

    def result(self) -> LatentStats:
        fired_M = self.stats.fired_M.double()
        return LatentStats(
            summary={**self.stats.result(), "images": self.images, "inputs": self.stats.n},
            frequency_M=self.stats.firing_frequency().cpu().numpy(),
            max_act_M=self.max_M.cpu().numpy(),
            mean_act_M=(self.sum_M / fired_M.clamp(min=1)).float().cpu().numpy(),
            top_act_MN=self.top_act_NM.T.cpu().numpy(),
            top_row_MN=self.top_row_NM.T.cpu().numpy(),
            top_label_MN=self.top_label_NM.T.cpu().numpy(),
        )


class RidgeProbe:
    """Linear probe on labels by ridge regression to one-hot targets, fit from streamed sums
    (X^T X, X^T Y, float64): one pass and O(d^2) memory at any dataset size."""

    def __init__(self, d: int, ridge: float = 1e-3, device: torch.device | str = "cpu"):
        self.ridge = ridge
        self.xtx = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=device)
        self.xty = torch.zeros(d + 1, 0, dtype=torch.float64, device=device)
        self.w: Tensor | None = None

    @staticmethod
    def _features(x_BD: Tensor) -> Tensor:
        return torch.cat([x_BD.double(), x_BD.new_ones(len(x_BD), 1, dtype=torch.float64)], 1)

    def update(self, x_BD: Tensor, label_B: Tensor) -> None:
        if len(label_B) == 0:
            return
        classes = int(label_B.max()) + 1
        if classes > self.xty.shape[1]:
            self.xty = torch.nn.functional.pad(self.xty, (0, classes - self.xty.shape[1]))
        f = self._features(x_BD)
        self.xtx += f.T @ f
        self.xty.index_add_(1, label_B, f.T)

    def fit(self) -> None:
        # Ridge scaled to the features' own size, so one setting suits any layer's norm.
        eye = torch.eye(len(self.xtx), dtype=torch.float64, device=self.xtx.device)
        lam = self.ridge * self.xtx.diagonal().mean()
        self.w = torch.linalg.solve(self.xtx + lam * eye, self.xty)

    def predict(self, x_BD: Tensor) -> Tensor:
        return (self._features(x_BD) @ self.w).argmax(1)


def image_features(x_BTD: Tensor) -> Tensor:
    """One probe input per image: the token itself in `cls` mode, the token mean in `all`."""
    return x_BTD.mean(1)


@torch.no_grad()
def scan(
    sae: TopKSae,
    cache_dir: str | Path,
    layer: int,
    top_n: int = 16,
    batch_size: int = 1024,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[LatentStats, dict[str, float]]:
    """Encode every cached image of `layer`: LatentStats, and the linear probe's validation
    accuracy on original and reconstructed activations (fit on the training split, scored on
    the validation split in a second pass)."""
    stats = Scan(sae.num_latents, top_n, sae.device)
    probes = {name: RidgeProbe(sae.d_in, device=sae.device) for name in PROBE_INPUTS}
    rows = cache.read_manifest(cache_dir)["rows"]
    batches = _encoded(sae, cache_dir, layer, batch_size)
    with tqdm(total=rows, desc=f"analyse layer {layer}", unit="img") as bar:
        for row_B, label_B, x_BTD, x_hat_BTD, acts_BK, idx_BK in batches:
            stats.update(row_B, label_B, x_BTD, x_hat_BTD, acts_BK, idx_BK)
            train_B = ~_val_mask(row_B, val_fraction, seed) & (label_B >= 0)
            for probe, inputs in zip(probes.values(), (x_BTD, x_hat_BTD)):
                probe.update(image_features(inputs)[train_B], label_B[train_B])
            bar.update(len(row_B))
    return stats.result(), _probe_accuracy(
        sae, cache_dir, layer, batch_size, probes, val_fraction, seed
    )


def _val_mask(row_B: Tensor, val_fraction: float, seed: int) -> Tensor:
    return torch.from_numpy(is_val(row_B.cpu().numpy(), val_fraction, seed)).to(row_B.device)


def _encoded(sae: TopKSae, cache_dir, layer: int, batch_size: int, val_split=None):
    """Cached batches on the SAE's device with their codes and reconstructions; with
    `val_split=(val_fraction, seed)`, only the validation rows."""
    for row_B, label_B, x_BTD in iter_layer(cache_dir, layer, batch_size):
        if val_split is not None:
            keep = is_val(row_B, *val_split)
            row_B, label_B, x_BTD = row_B[keep], label_B[keep], x_BTD[torch.from_numpy(keep)]
        if len(row_B) == 0:
            continue
        x_BTD = x_BTD.to(sae.device)
        acts_BK, idx_BK = sae.encode(x_BTD.flatten(0, 1))
        x_hat_BTD = sae.decode(acts_BK, idx_BK).view_as(x_BTD)
        row_B, label_B = (torch.tensor(a, device=sae.device) for a in (row_B, label_B))
        yield row_B, label_B, x_BTD, x_hat_BTD, acts_BK, idx_BK


def _probe_accuracy(sae, cache_dir, layer, batch_size, probes, val_fraction, seed):
    if probes["original"].xty.shape[1] < 2:
        return {}  # fewer than two classes in the training split: nothing to probe
    for probe in probes.values():
        probe.fit()
    correct, total = dict.fromkeys(probes, 0), 0
    batches = _encoded(sae, cache_dir, layer, batch_size, (val_fraction, seed))
    for _, label_B, x_BTD, x_hat_BTD, _, _ in batches:
        ok = label_B >= 0
        for name, inputs in zip(probes, (x_BTD, x_hat_BTD)):
            pred = probes[name].predict(image_features(inputs)[ok])
            correct[name] += int((pred == label_B[ok]).sum())
        total += int(ok.sum())
    if total == 0:
        return {}
    return {f"probe/{name}": c / total for name, c in correct.items()}


def select_latents(stats: LatentStats, criterion: str, n: int) -> list[int]:
    """The n live latents ranked highest by criterion (max_act, mean_act or frequency)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {criterion!r}: use one of {', '.join(CRITERIA)}")
    score = {
        "max_act": stats.max_act_M,
        "mean_act": stats.mean_act_M,
        "frequency": stats.frequency_M,
    }[criterion]
    live = np.flatnonzero(stats.frequency_M > 0)
    return live[np.argsort(-score[live], kind="stable")][:n].tolist()


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


@torch.inference_mode()
def spliced_embeddings(
    model: torch.nn.Module,
    pixels_BCHW: Tensor,
    layer: int,
    token_mode: str,
    edits: dict[str, Callable[[Tensor], Tensor]],
) -> dict[str, Tensor]:
    """Image embeddings (B, P) of a CLIPModel with the residual stream after block `layer`
    replaced by `edit(x)` for each edit: at the CLS position in `cls` mode (the position the
    SAE was trained on), at every token in `all` mode. "original" is the unedited model."""
    vision = vision_tower(model)
    h_BTD = capture_layers(model, pixels_BCHW, [layer], "all")[layer]
    out = {}
    for name, edit in {"original": None, **edits}.items():
        h = h_BTD.clone()
        if edit is not None and token_mode == "cls":
            h[:, 0] = edit(h_BTD[:, 0])
        elif edit is not None:
            h = edit(h_BTD.flatten(0, 1)).view_as(h_BTD)
        for block in vision.encoder.layers[layer + 1 :]:
            h = block(h, None)
        out[name] = model.visual_projection(vision.post_layernorm(h[:, 0]))
    return out


@torch.inference_mode()
def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    label_names: list[str],
    batches,
    layer: int,
    token_mode: str,
    reconstruct: Callable[[Tensor], Tensor],
    pre: Preprocessing,
) -> dict[str, float]:
    """Zero-shot accuracy ("a photo of a {label}.") three ways: original activations, the
    reconstruction spliced in at `layer`, and zero ablation there. `batches` yields
    (row_id_B, label_B, pixels_BCHW uint8) as iter_images does."""
    text = tokenizer([PROMPT.format(n) for n in label_names], padding=True, return_tensors="pt")
    text_CP = torch.nn.functional.normalize(model.get_text_features(**text).pooler_output, dim=-1)
    edits = {"spliced": reconstruct, "zero_ablation": torch.zeros_like}
    correct, total = dict.fromkeys(["original", *edits], 0), 0
    dtype = next(model.parameters()).dtype
    for _, label_B, pixels_BCHW in batches:
        ok = label_B >= 0
        if not ok.any():
            continue
        pixels = pre.normalize(torch.from_numpy(pixels_BCHW[ok]), dtype)
        label = torch.from_numpy(label_B[ok])
        for name, emb_BP in spliced_embeddings(model, pixels, layer, token_mode, edits).items():
            pred = (torch.nn.functional.normalize(emb_BP, dim=-1) @ text_CP.T).argmax(1)
            correct[name] += int((pred == label).sum())
        total += int(ok.sum())
    if total == 0:
        return {}
    return {f"zero_shot/{name}": c / total for name, c in correct.items()}


def reconstruct_with(sae: TopKSae) -> Callable[[Tensor], Tensor]:
    def reconstruct(x_ND: Tensor) -> Tensor:
        return sae.decode(*sae.encode(x_ND.to(sae.W_dec.dtype))).to(x_ND.dtype)

    return reconstruct
