"""SAELens's training SAEs, trained the way our benchmarks train ours: the same rows in the same
order, Adam with our lr schedule (warmup, linear decay), b_dec at the first batch's mean, our
AuxK window. Shared by bench_architectures.py and bench_batchtopk.py."""

from __future__ import annotations

import torch

from sae import TrainConfig
from sae.trainer import lr_factor


def saelens_sae(activation: str, d_in: int, width: int, k: int):
    """A fresh SAELens training SAE of our architecture `activation` (SAELens's defaults,
    Matryoshka's prefixes at 1/8, 1/4, 1/2 and all of the width, JumpReLU aiming at L0 = k
    with Gemma Scope 2's quadratic penalty)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.matryoshka_batchtopk_sae import (
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    kinds = {
        "topk": (TopKTrainingSAEConfig, TopKTrainingSAE, {"k": k}),
        "batchtopk": (BatchTopKTrainingSAEConfig, BatchTopKTrainingSAE, {"k": k}),
        "matryoshka": (
            MatryoshkaBatchTopKTrainingSAEConfig,
            MatryoshkaBatchTopKTrainingSAE,
            {"k": k, "matryoshka_widths": [width // 8, width // 4, width // 2, width]},
        ),
        "jumprelu": (
            JumpReLUTrainingSAEConfig,
            JumpReLUTrainingSAE,
            {"jumprelu_sparsity_loss_mode": "quadratic", "target_l0": float(k)},
        ),
    }
    config, cls, extra = kinds[activation]
    return cls(config(d_in=d_in, d_sae=width, **extra))


def train_saelens(sae, x, *, steps: int, lr: float, batch: int, seed: int, dead_window=None):
    """Train a SAELens training SAE on the rows of x. `dead_window`: latents silent for this
    many rows are dead for SAELens's AuxK (None: no dead mask, so no AuxK)."""
    from sae_lens.saes.sae import TrainStepInput

    with torch.no_grad():
        sae.b_dec.copy_(x[:batch].mean(0))
    opt = torch.optim.Adam(sae.parameters(), lr=lr)
    schedule = lambda s: lr_factor(TrainConfig(), steps, torch.tensor(s)).item()  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    coefficients = {
        name: c if isinstance(c, float) else c.value for name, c in sae.get_coefficients().items()
    }
    gen = torch.Generator().manual_seed(seed)
    since = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    per_epoch = len(x) // batch
    for step in range(steps):
        if step % per_epoch == 0:
            order = torch.randperm(len(x), generator=gen)
        rows = x[order[(step % per_epoch) * batch :][:batch]]
        dead = since >= dead_window if dead_window is not None else None
        out = sae.training_forward_pass(TrainStepInput(rows, coefficients, dead, step, False))
        since += len(rows)
        since[(out.feature_acts > 0).any(0)] = 0
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()
    return sae


@torch.no_grad()
def saelens_acts(sae, x):
    """Latent activations (N, M) as SAELens deploys the SAE: BatchTopK and Matryoshka as the
    JumpReLU at their learnt threshold that SAELens saves them as."""
    if hasattr(sae, "topk_threshold"):
        pre = sae.encode_with_hidden_pre(x)[1]
        return pre.relu() * (pre > sae.topk_threshold)
    return sae.encode(x)
