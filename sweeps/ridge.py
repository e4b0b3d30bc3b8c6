"""The linear probe that both the sweep's probe metric and `analyze` use: ridge regression to
one-hot labels, on one input per image."""

from __future__ import annotations

import torch
from torch import Tensor


class RidgeProbe:
    """Linear probe on labels by ridge regression to one-hot targets, fit from streamed sums
    (X^T X, X^T Y, float64): one pass and O(d^2) memory at any dataset size."""

    def __init__(self, d: int, device: torch.device | str = "cpu"):
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

    def class_counts(self) -> Tensor:
        """Training images per label (the bias feature's row of X^T Y)."""
        return self.xty[-1]

    def default_ridge(self, ridge: float) -> float:
        """ridge scaled to these features' own size, so one setting suits any layer's norm."""
        return ridge * float(self.xtx.diagonal().mean())

    def fit(self, lam: float) -> None:
        eye = torch.eye(len(self.xtx), dtype=torch.float64, device=self.xtx.device)
        self.w = torch.linalg.solve(self.xtx + lam * eye, self.xty)

    def predict(self, x_BD: Tensor) -> Tensor:
        return (self._features(x_BD) @ self.w).argmax(1)


def image_features(x_BTD: Tensor) -> Tensor:
    """One probe input per image: the token itself in `cls` mode, the token mean in `all`."""
    return x_BTD.mean(1)
