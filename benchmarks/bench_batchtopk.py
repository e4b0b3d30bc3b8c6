"""TopK vs BatchTopK at equal L0 on ground-truth sparse data whose sparsity varies per input.

Each row is a positive combination of 1 + Poisson(3) unit atoms of a random dictionary (so
1 to ~12 atoms, 4 on average): a fixed k per row must split some rows' atoms and waste
latents on others, while BatchTopK spends k * B latents where the batch needs them (Bussmann
et al. 2024). Both train for the same steps at each k; validation FVU and L0 are measured as
deployed (BatchTopK by its learnt threshold), along with how well the atoms are recovered
(mean over atoms of the best cosine with a decoder row).

    python benchmarks/bench_batchtopk.py [--steps 1000]
"""

from __future__ import annotations

import argparse
import time

import torch

from sae import SaeConfig, TrainConfig, train_sae


def varying_sparsity_data(seed: int, n: int, d: int, n_atoms: int, mean_active: float):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    counts = 1 + torch.poisson(torch.full((n,), mean_active - 1.0), generator=g).long()
    order = torch.rand(n, n_atoms, generator=g).argsort(1)
    on = torch.arange(n_atoms)[None] < counts[:, None]  # the first `count` atoms of a shuffle
    coef = torch.zeros(n, n_atoms).scatter(
        1, order, (torch.rand(n, n_atoms, generator=g) + 0.5) * on
    )
    return coef @ atoms, atoms, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=16384)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x, atoms, counts = varying_sparsity_data(0, args.rows, d=64, n_atoms=256, mean_active=4)
    t0 = time.perf_counter()
    print(
        f"{args.rows} rows, d=64, 256 atoms, {counts.float().mean():.2f} active on average "
        f"(max {counts.max()}); 512 latents, {args.steps} steps of 256, lr 2e-3"
    )
    print(f"{'k':>3} {'activation':>10} {'val L0':>7} {'val FVU':>8} {'atoms found':>11}")
    for k in (2, 4, 8):
        for activation in ("topk", "batchtopk"):
            result = train_sae(
                x,
                SaeConfig(num_latents=512, k=k, activation=activation),
                TrainConfig(
                    lr=2e-3,
                    batch_size=256,
                    steps=args.steps,
                    eval_every=args.steps,
                    dead_feature_threshold=50_000,
                ),
            )
            W = torch.nn.functional.normalize(result.sae.W_dec.detach(), dim=1)
            found = (atoms @ W.T).max(dim=1).values.mean().item()
            m = result.metrics
            print(f"{k:>3} {activation:>10} {m['l0']:>7.2f} {m['fvu']:>8.4f} {found:>11.3f}")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
