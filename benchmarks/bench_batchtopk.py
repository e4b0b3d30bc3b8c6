"""TopK vs BatchTopK at equal L0: on ground-truth sparse data, and on a layer of an activation
cache (the demo's, for instance).

Synthetic: each row is a positive combination (coefficients 0.5..1.5) of 1 + Poisson(3) unit
atoms of a random dictionary of 256 atoms in d dimensions (1 to ~14 atoms, 4 on average). A
fixed k per row must split some rows' atoms and waste latents on others, while BatchTopK
spends k * B latents where the batch needs them (Bussmann et al. 2024). At d=64 the atoms
overlap (|cos| ~ 1/8), so every atom of a row adds noise to every latent's pre-activation; at
d=256 they barely do (`--dims`). Both activations train
for the same steps at each k; validation FVU and L0 are measured as deployed (BatchTopK by its
learnt threshold), with, on synthetic data, how well the atoms are recovered (mean over atoms
of the best cosine with a decoder row). `--diagnose` adds, for BatchTopK, the FVU of the batch
rule (top k*B) on the validation rows, the FVU of its dictionary under per-row TopK, and the
mean L0 given to rows of 1 and of 8+ atoms. `--saelens` trains SAELens's own TopK and
BatchTopK training SAEs (its defaults, with and without AuxK) on the synthetic rows with the
same steps, lr and schedule, as an independent implementation.

    python benchmarks/bench_batchtopk.py [--steps 1000] [--cache runs/demo/cache --layer 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from peers import saelens_acts, saelens_sae, train_saelens

from sae import SaeConfig, TopKSae, TrainConfig, train_sae
from sae.metrics import SaeStats


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


def _fvu(sae, x, **encode) -> float:
    acts, idx = sae.encode(x, **encode)
    return ((x - sae.decode(acts, idx)).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


@torch.no_grad()
def diagnose(sae: TopKSae, val: torch.Tensor, batch_size: int, counts=None) -> str:
    """Where a BatchTopK SAE loses: its batch rule vs its threshold, its dictionary under
    per-row TopK, and how it shares latents between sparse and dense rows."""
    batch_rule = SaeStats(sae.num_latents)
    for start in range(0, len(val), batch_size):
        x = val[start : start + batch_size]
        acts, idx = sae.encode(x, batch_topk=True)
        batch_rule.update(x, sae.decode(acts, idx), acts, idx)
    per_row = TopKSae(sae.d_in, SaeConfig(num_latents=sae.num_latents, k=sae.cfg.k))
    per_row.load_state_dict({n: t for n, t in sae.state_dict().items() if n != "threshold"})
    text = (
        f"batch rule FVU {batch_rule.result()['fvu']:.4f}, "
        f"threshold {float(sae.threshold):.3f}, its dictionary with per-row TopK FVU "
        f"{_fvu(per_row, val):.4f}"
    )
    if counts is not None:
        l0 = (sae.encode(val)[0] > 0).sum(1).float()
        text += (
            f", L0 of 1-atom rows {l0[counts == 1].mean():.2f} "
            f"({(l0[counts == 1] == 0).float().mean():.0%} none), "
            f"of 8+-atom rows {l0[counts >= 8].mean():.2f}"
        )
    return text


NOTES: list[str] = []
"""--diagnose's lines, printed after the table."""


def compare(
    name, x, val, ks, steps, num_latents, normalize_input, atoms=None, counts=None, diag=False
):
    rows = []
    for k in ks:
        for activation in ("topk", "batchtopk"):
            result = train_sae(
                x,
                SaeConfig(num_latents=num_latents, k=k, activation=activation),
                TrainConfig(
                    lr=2e-3,
                    batch_size=256,
                    steps=steps,
                    eval_every=steps,
                    dead_feature_threshold=50_000,
                    normalize_input=normalize_input,
                ),
                val_acts=val,
            )
            m = result.metrics
            found = "-"
            if atoms is not None:
                W = torch.nn.functional.normalize(result.sae.W_dec.detach(), dim=1)
                found = f"{(atoms @ W.T).max(dim=1).values.mean().item():.3f}"
            rows.append(
                f"| {name} | {k} | {activation} | {m['l0']:.2f} | {m['fvu']:.4f} | "
                f"{m['dead_frac']:.3f} | {found} |"
            )
            if diag and activation == "batchtopk":
                NOTES.append(f"{name}, k={k}: {diagnose(result.sae, val.float(), 256, counts)}")
    return rows


def saelens_rows(name, x, val, ks, steps, auxk: bool) -> list[str]:
    """SAELens's TopKTrainingSAE and BatchTopKTrainingSAE, 512 latents, Adam at 2e-3 with
    100 warmup steps and linear decay (ours), b_dec at the first batch's mean; BatchTopK
    deployed as SAELens saves it, a JumpReLU at its learnt threshold. `auxk`: SAELens's AuxK
    (its weight 1) on latents dead for 50,000 activations, as in our runs."""
    rows = []
    for k in ks:
        for activation in ("topk", "batchtopk"):
            torch.manual_seed(0)
            sae = train_saelens(
                saelens_sae(activation, x.shape[1], 512, k),
                x,
                steps=steps,
                lr=2e-3,
                batch=256,
                seed=0,
                dead_window=50_000 if auxk else None,  # our runs' dead window
            )
            acts = saelens_acts(sae, val)
            with torch.no_grad():
                err = (val - sae.decode(acts)).pow(2).sum() / (val - val.mean(0)).pow(2).sum()
            l0 = (acts > 0).sum(1).float().mean()
            tag = "SAELens" + (" + AuxK" if auxk else "")
            rows.append(f"| {name}, {tag} | {k} | {activation} | {l0:.2f} | {err:.4f} | - | - |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=16384, help="synthetic rows")
    ap.add_argument("--ks", default="2,4,8", help="k values, comma-separated")
    ap.add_argument("--dims", default="64,256", help="synthetic widths d, comma-separated")
    ap.add_argument("--cache", help="an activation cache directory (e.g. the demo's)")
    ap.add_argument("--layer", type=int, default=3, help="the cache's layer")
    ap.add_argument("--expansion", type=int, default=4, help="latents per cache dimension")
    ap.add_argument("--diagnose", action="store_true", help="where BatchTopK loses (see above)")
    ap.add_argument("--saelens", action="store_true", help="SAELens's own SAEs too (see above)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    t0 = time.perf_counter()
    n_val = args.rows // 20
    print(f"Every run: {args.steps} steps of 256, lr 2e-3.")
    rows = []
    for d in (int(d) for d in args.dims.split(",")):
        x, atoms, counts = varying_sparsity_data(0, args.rows, d=d, n_atoms=256, mean_active=4)
        print(
            f"synthetic d={d}: {args.rows - n_val} + {n_val} rows, 256 atoms, "
            f"{counts.float().mean():.2f} active on average (max {counts.max()}), 512 latents"
        )
        rows += compare(
            f"synthetic d={d}",
            x[n_val:],
            x[:n_val],
            ks,
            args.steps,
            512,
            False,
            atoms,
            counts[:n_val],
            args.diagnose,
        )
        if args.saelens:
            for auxk in (True, False):
                rows += saelens_rows(f"synthetic d={d}", x[n_val:], x[:n_val], ks, args.steps, auxk)
    if args.cache:
        from sweeps.activations import cache

        train, val = (
            torch.from_numpy(cache.load_layer(args.cache, args.layer, split, 0.1, 0)).float()
            for split in ("train", "val")
        )
        d = train.shape[1]
        print(
            f"cache {args.cache} layer {args.layer}: {len(train)} + {len(val)} rows, d={d}, "
            f"{args.expansion * d} latents, normalize_input"
        )
        rows += compare(
            "cache", train, val, ks, args.steps, args.expansion * d, True, diag=args.diagnose
        )
    print("| data | k | activation | val L0 | val FVU | dead_frac | atoms found |")
    print("|---|---:|---|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\n".join(NOTES))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
