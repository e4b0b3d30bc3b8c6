"""The probe metric of a trial (`train.probe`): a ridge probe fit once per worker and layer on
the training images' activations, scored on the validation images with the SAE's
reconstruction spliced in (val/probe_acc) and without (val/probe_acc_orig)."""

from __future__ import annotations

import functools

import numpy as np
import torch

from sae.trainer import Trainer, as_acts_tensor
from sweeps.ridge import RidgeProbe, image_features
from sweeps.search.data import layer_arrays, layer_labels

PROBE_RIDGE = 1e-3
"""The probe's ridge, relative to its features' mean square (analyze's default)."""


@functools.lru_cache(maxsize=2)
def fit_probe(source, tokens_per_image: int):
    """A RidgeProbe of labels on the training images' activations (one input per image, as in
    `analyze`), or None when they hold fewer than two labels. Fit once per worker and layer."""
    train, _ = layer_arrays(source)
    labels, _ = layer_labels(source)
    probe = RidgeProbe(train.shape[1])
    for x_BTD, y_B in _image_batches(train, labels, tokens_per_image):
        ok = y_B >= 0
        probe.update(image_features(x_BTD)[ok], y_B[ok])
    if int((probe.class_counts() > 0).sum()) < 2:
        return None
    probe.fit(probe.default_ridge(PROBE_RIDGE))
    return probe


def _image_batches(rows, labels: np.ndarray, tokens_per_image: int, images: int = 1024):
    """(x_BTD float32, label_B) batches of whole images from (images * T, d) rows."""
    rows = as_acts_tensor(rows)  # read-only object-store arrays without a warning
    for start in range(0, len(labels), images):
        y_B = torch.from_numpy(np.array(labels[start : start + images]))  # a writable copy
        x = rows[start * tokens_per_image : (start + len(y_B)) * tokens_per_image]
        yield x.float().view(len(y_B), tokens_per_image, -1), y_B


@torch.no_grad()
def probe_metrics(trainer: Trainer, probe, val_labels: np.ndarray, tokens_per_image: int):
    """val/probe_acc: the probe's accuracy on the labelled validation images with the SAE's
    reconstruction spliced in; val/probe_acc_orig: on their activations themselves."""
    sae = trainer.export_sae()
    correct, total = {"val/probe_acc": 0, "val/probe_acc_orig": 0}, 0
    for x_BTD, y_B in _image_batches(trainer.val, val_labels, tokens_per_image):
        ok = y_B >= 0
        x_BD = x_BTD.flatten(0, 1).to(sae.device)
        acts, idx = sae.encode(x_BD, exact=trainer.cfg.exact_topk)
        x_hat_BTD = sae.decode(acts, idx).view_as(x_BTD).cpu()
        for key, inputs in (("val/probe_acc", x_hat_BTD), ("val/probe_acc_orig", x_BTD)):
            correct[key] += int((probe.predict(image_features(inputs)[ok]) == y_B[ok]).sum())
        total += int(ok.sum())
    return {key: c / total for key, c in correct.items()} if total else {}
