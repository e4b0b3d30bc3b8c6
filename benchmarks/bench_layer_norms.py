"""One lr range across layers whose activation norms differ 10x, with and without
TrainConfig.normalize_input.

Synthetic "layers": the same sparse-dictionary data (a fixed offset plus positive
combinations of a few unit atoms, with dictionary noise) multiplied by 0.1, 1, 10 and 100, as
CLIP's residual norms grow with depth. Each layer trains at every lr of one log grid; the
table shows validation FVU and marks each row's best lr. Adam's steps are absolute, so
without normalisation the biases (b_enc, b_dec) of a large-norm layer barely move and those
of a small-norm layer overshoot: the good lr region shifts with the norm. With it, each layer
finds the same region.

    python benchmarks/bench_layer_norms.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch

from sae import SaeConfig, TrainConfig, train_sae

LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
SCALES = (0.1, 1.0, 10.0, 100.0)


def layer_data(seed: int, n: int, d: int, n_atoms: int, active: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d, generator=g), dim=1)
    idx = torch.rand(n, n_atoms, generator=g).argsort(1)[:, :active]
    coef = torch.rand(n, active, generator=g) * 2
    offset = 2 * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    noise = 0.05 * torch.randn(n, d, generator=g)
    return offset + (coef.unsqueeze(2) * atoms[idx]).sum(1) + noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rows", type=int, default=8192)
    args = ap.parse_args()
    torch.set_num_threads(1)
    x = layer_data(0, args.rows, d=32, n_atoms=96, active=4)
    sae_cfg = SaeConfig(num_latents=128, k=4)
    t0 = time.perf_counter()
    print(f"val FVU after {args.steps} steps (batch 256, k=4, 128 latents); * = best lr of the row")
    print(f"{'normalize_input':>15} {'layer norm':>10} " + " ".join(f"{lr:>8.0e}" for lr in LRS))
    for normalize in (False, True):
        for scale in SCALES:
            fvus = []
            for lr in LRS:
                cfg = TrainConfig(
                    lr=lr,
                    batch_size=256,
                    steps=args.steps,
                    lr_warmup_steps=20,
                    eval_every=args.steps,
                    dead_feature_threshold=20_000,
                    normalize_input=normalize,
                )
                fvus.append(train_sae(x * scale, sae_cfg, cfg).metrics["fvu"])
            best = min(range(len(LRS)), key=fvus.__getitem__)
            norm = (x * scale).norm(dim=1).mean().item()
            cells = [f"{f:>7.3f}{'*' if i == best else ' '}" for i, f in enumerate(fvus)]
            print(f"{str(normalize):>15} {norm:>10.1f} " + " ".join(cells))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
