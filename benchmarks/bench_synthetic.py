"""Feature recovery on SAELens's own synthetic benchmark: ours beside SAELens's training SAEs.

The data come from SAELens's synthetic generator (`sae_lens.synthetic.SyntheticModel`, the
generator behind SynthSAEBench), scaled down from SynthSAEBench-16k's 16,384 features in 768
dimensions to 512 features in 128: a forest of 16 hierarchy trees (branching factor 4, depth
2: 16 + 64 + 256 = 336 of the 512 features; every parent's children mutually exclusive,
children's firing compensated for their parents'), Zipf firing probabilities (exponent 0.5,
0.4 down to 5e-4), a rank-8 low-rank firing correlation (scale 0.1), an orthogonalised
feature dictionary with a bias of norm 1, firing magnitude 1. About 7.5 features fire per row.

Every SAE has 256 latents (--width) and L0 target k (--k), trains one epoch of the training
rows in batches of --batch, both libraries on the same rows in the same order, with the same
lr schedule (our default: 100 warmup steps, then linear decay to 0), Adam (0.9, 0.999), b_dec
at the first batch's mean and our AuxK window (20,000 rows) for SAELens's AuxK too
(benchmarks/peers.py), at each lr of --lrs and each seed of --seeds. SAELens's SAEs run as
they are (decoder init norm 0.1, activations rescaled by the decoder norms, AuxK weight 1);
Matryoshka-BatchTopK has prefixes at 1/8, 1/4, 1/2 and all of the width; JumpReLU aims at
L0 = k. Ours runs with its defaults (`sae.TrainConfig()`).

Each trained SAE is scored by SAELens's own evaluator, `sae_lens.synthetic.
eval_sae_on_synthetic_data`, on the same held-out rows for every SAE (the --eval-rows rows are
drawn once and replayed to it): MCC (mean |cosine| of the Hungarian matching of decoder rows
to true features), L0 and dead latents as deployed (BatchTopK, Matryoshka and JumpReLU by
their thresholds), explained variance, F1 of each latent as a detector of its best-matching
feature. The table has one row per library, architecture and lr (mean over seeds), and the
difference ours - SAELens in MCC at that lr.

--pick asks whether the sweep service's pick finds true features: our SAEs only (TopK unless
--archs says otherwise), over the grid a sweep would search, k in --pick-ks (4, 8, 16, 32) x
width in --pick-widths (256, 512) at each lr of --lrs (1e-2 here) and one sweep per seed of
--seeds. Each SAE gets the sweep's validation metrics on the held-out rows
(`sae.metrics.evaluate`: val/fvu, val/l0, val/never_fired_frac) and SAELens's evaluator's
scores. The pick is `sweeps.ranking.pick` with objectives val/fvu and val/l0 (min, min) and
val/never_fired_frac <= --max-dead-frac (0.2): the lowest FVU among feasible SAEs. The
table has one row per grid point, marking the pick and the lowest val/fvu, with MCC, the
evaluator's uniqueness as a count (true features that some latent matches best: uniqueness x
width) and the true features recovered (some decoder row at |cosine| >= 0.9 with it; not one
of the evaluator's numbers). MCC matches min(width, 512) pairs, so a width-256 SAE's MCC is
over its 256 best matches and not comparable with a width-512 one's; the counts are. A last
line per sweep compares the pick with the lowest FVU.

    python benchmarks/bench_synthetic.py                      # 60k + 10k rows, a few minutes
    python benchmarks/bench_synthetic.py --rows 300000 --eval-rows 20000 \\
        --lrs 3e-3,1e-2,3e-2 --archs topk,batchtopk,matryoshka   # the issue's setting
    python benchmarks/bench_synthetic.py --pick --rows 300000 --eval-rows 20000 --seeds 0,1,2

On a shared machine: OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_synthetic.py.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import torch
from peers import saelens_acts, saelens_sae, train_saelens

from sae import SaeConfig, TrainConfig, train_sae

ARCHS = ("topk", "batchtopk", "matryoshka", "jumprelu")
RECOVERED_COS = 0.9
"""A true feature counts as recovered when some decoder row has |cosine| >= this with it."""


def synthetic_model(seed: int = 42, num_features: int = 512, hidden_dim: int = 128):
    """The scaled-down SynthSAEBench-style generator (see the module docstring)."""
    from sae_lens.synthetic import (
        FeatureDictionary,
        HierarchyConfig,
        LowRankCorrelationConfig,
        OrthogonalizationConfig,
        SyntheticModel,
        SyntheticModelConfig,
        ZipfianFiringProbabilityConfig,
        orthogonal_initializer,
    )
    from sae_lens.util import temporary_seed

    ortho = OrthogonalizationConfig(num_steps=100, lr=0.01)
    cfg = SyntheticModelConfig(
        num_features=num_features,
        hidden_dim=hidden_dim,
        firing_probability=ZipfianFiringProbabilityConfig(
            exponent=0.5, max_prob=0.4, min_prob=5e-4
        ),
        hierarchy=HierarchyConfig(
            total_root_nodes=16,
            branching_factor=4,
            max_depth=2,
            mutually_exclusive_portion=1.0,
            compensate_probabilities=True,
        ),
        orthogonalization=ortho,
        correlation=LowRankCorrelationConfig(rank=8, correlation_scale=0.1),
        mean_firing_magnitudes=1.0,
        std_firing_magnitudes=0.0,
        bias=1.0,
        seed=seed,
    )
    # The dictionary SyntheticModel would build, without its progress bar.
    with temporary_seed(seed):
        feature_dict = FeatureDictionary(
            num_features,
            hidden_dim,
            bias=cfg.bias,
            initializer=orthogonal_initializer(ortho.num_steps, ortho.lr, show_progress=False),
            seed=seed,
        )
    return SyntheticModel(cfg, feature_dict=feature_dict)


def sample(model, rows: int, seed: int, chunk: int = 50_000):
    """(hidden activations (rows, d), true feature activations (rows, F)) from the generator,
    reproducibly: the generator draws from torch's global RNG, seeded here."""
    torch.manual_seed(seed)
    xs, fs = [], []
    for start in range(0, rows, chunk):
        x, f = model.sample_with_features(min(chunk, rows - start))
        xs.append(x)
        fs.append(f)
    return torch.cat(xs), torch.cat(fs)


class Replay:
    """Stands in for SAELens's ActivationGenerator in eval_sae_on_synthetic_data: hands out the
    same stored feature activations, in order, to every SAE scored."""

    def __init__(self, features_NF):
        self.features_NF, self.pos = features_NF, 0

    def sample(self, n: int):
        out = self.features_NF[self.pos : self.pos + n]
        self.pos += n
        return out


class Scored(torch.nn.Module):
    """What eval_sae_on_synthetic_data reads of an SAE: W_dec (M, d), encode (dense latents as
    deployed) and decode."""

    def __init__(self, W_dec, encode, decode):
        super().__init__()
        self.W_dec, self._encode, self._decode = W_dec.detach(), encode, decode

    def encode(self, x):
        return self._encode(x)

    def decode(self, acts):
        return self._decode(acts)


def fit_ours(arch, x, val, *, width, k, lr, batch, seed, **overrides):
    """Our SAE, trained with train_sae on x (one epoch). `overrides`: TrainConfig fields other
    than the defaults."""
    cfg = TrainConfig(lr=lr, batch_size=batch, epochs=1.0, eval_every=10**9, seed=seed, **overrides)
    return train_sae(x, SaeConfig(num_latents=width, k=k, activation=arch), cfg, val_acts=val).sae


def train_ours(arch, x, val, **kwargs):
    """Our SAE (fit_ours), wrapped for SAELens's evaluator."""
    return wrap_ours(fit_ours(arch, x, val, **kwargs))


def wrap_ours(sae):
    """Our trained SAE as SAELens's evaluator reads it."""

    @torch.no_grad()
    def encode(v):
        acts, idx = sae.encode(v)  # BatchTopK, JumpReLU: by their thresholds, as deployed
        return torch.zeros(len(v), sae.num_latents).scatter_(1, idx, acts)

    @torch.no_grad()
    def decode(acts):
        return acts @ sae.W_dec + sae.b_dec

    return Scored(sae.W_dec, encode, decode)


def train_peer(arch, x, val, *, width, k, lr, batch, seed):
    """SAELens's training SAE of `arch`, trained by peers.train_saelens on the same rows."""
    torch.manual_seed(seed)
    sae = train_saelens(
        saelens_sae(arch, x.shape[1], width, k),
        x,
        steps=len(x) // batch,
        lr=lr,
        batch=batch,
        seed=seed,
        dead_window=TrainConfig().dead_feature_threshold,
    )
    sae.eval()
    return Scored(sae.W_dec, lambda v: saelens_acts(sae, v), sae.decode)


TRAINERS = {"ours": train_ours, "SAELens": train_peer}


def score(scored, model, features_NF) -> dict[str, float]:
    """SAELens's evaluator on the stored held-out rows."""
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    r = eval_sae_on_synthetic_data(
        scored,
        model.feature_dict,
        Replay(features_NF),
        num_samples=len(features_NF),
        batch_size=5000,
    )
    return {
        "mcc": r.mcc,
        "l0": r.sae_l0,
        "ev": r.explained_variance,
        "dead": r.dead_latents,
        "f1": r.classification.f1_score,
        "uniqueness": r.uniqueness,
        # the evaluator's uniqueness as a count: true features some latent matches best
        "unique": round(r.uniqueness * scored.W_dec.shape[0]),
        "recovered": recovered(scored.W_dec, model.feature_dict.feature_vectors),
    }


def recovered(W_dec, features_FD, threshold: float = RECOVERED_COS) -> int:
    """True features that some decoder row matches with |cosine| >= threshold."""
    from sae_lens.util import cosine_similarities

    cos = cosine_similarities(W_dec.detach().float(), features_FD.float()).abs()
    return int((cos.max(0).values >= threshold).sum())


def run_pick(args, model, x, val, val_features, archs, lrs, seeds) -> None:
    """--pick: our SAEs over the sweep grid (--pick-ks x --pick-widths x lrs), one sweep per
    architecture and seed; the sweep's pick (sweeps.ranking.pick) beside its lowest val/fvu."""
    from sae.metrics import evaluate
    from sweeps.ranking import DEAD_METRIC, PickRule, pick

    rule = PickRule({"val/fvu": "min", "val/l0": "min"}, max_dead_frac=args.max_dead_frac)
    ks = [int(v) for v in args.pick_ks.split(",")]
    widths = [int(v) for v in args.pick_widths.split(",")]
    outcomes = []
    for arch in archs:
        for seed in seeds:
            rows = []
            for lr in lrs:
                for width in widths:
                    for k in ks:
                        t1 = time.perf_counter()
                        with contextlib.redirect_stderr(io.StringIO()):
                            sae = fit_ours(
                                arch, x, val, width=width, k=k, lr=lr, batch=args.batch, seed=seed
                            )
                        with torch.no_grad():
                            stats = evaluate(sae, val).result()
                        m = score(wrap_ours(sae), model, val_features)
                        point = {
                            "val/fvu": stats["fvu"],
                            "val/l0": stats["l0"],
                            DEAD_METRIC: stats["never_fired_frac"],
                        }
                        rows.append({"lr": lr, "width": width, "k": k, "point": point, **m})
                        print(
                            f"  {arch} seed {seed} lr {lr:g} width {width} k {k}: fvu "
                            f"{stats['fvu']:.4f}, MCC {m['mcc']:.3f}, recovered "
                            f"{m['recovered']} ({time.perf_counter() - t1:.0f} s)",
                            flush=True,
                        )
            points = [r["point"] for r in rows]
            chosen, why = pick(points, rule)
            lowest = min(range(len(rows)), key=lambda i: points[i]["val/fvu"])
            print(f"\n{arch}, seed {seed}: pick = {why}; lowest FVU = min val/fvu, unconstrained\n")
            print(
                f"| lr | width | k | val/fvu | val/l0 | never fired | MCC | unique true "
                f"features (evaluator) | recovered (cos >= {RECOVERED_COS:g}) | choice |"
            )
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
            for i, r in enumerate(rows):
                p = r["point"]
                marks = [name for name, j in (("pick", chosen), ("lowest FVU", lowest)) if i == j]
                print(
                    f"| {r['lr']:g} | {r['width']} | {r['k']} | {p['val/fvu']:.4f} | "
                    f"{p['val/l0']:.2f} | {p[DEAD_METRIC]:.3f} | {r['mcc']:.3f} | {r['unique']} "
                    f"({r['unique'] / model.cfg.num_features:.3f}) | {r['recovered']} "
                    f"({r['recovered'] / model.cfg.num_features:.3f}) | {', '.join(marks)} |"
                )
            if chosen is None:
                print("no pick: " + why)
                continue
            a, b = rows[chosen], rows[lowest]
            verdict = "at least as many" if a["recovered"] >= b["recovered"] else "fewer"
            print(
                f"\n{arch}, seed {seed}: pick (width {a['width']}, k {a['k']}) MCC {a['mcc']:.3f}, "
                f"{a['unique']} unique, {a['recovered']} recovered vs lowest FVU (width "
                f"{b['width']}, k {b['k']}) MCC {b['mcc']:.3f}, {b['unique']} unique, "
                f"{b['recovered']} recovered: MCC {a['mcc'] - b['mcc']:+.3f}, recovered "
                f"{a['recovered'] - b['recovered']:+d}: the pick recovers {verdict} true features",
                flush=True,
            )
            outcomes.append(a["recovered"] >= b["recovered"])
    print(
        f"\npick recovers at least as many true features (cos >= {RECOVERED_COS:g}) as the lowest "
        f"FVU in {sum(outcomes)} of {len(outcomes)} sweeps"
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--rows", type=int, default=60_000, help="training rows (one epoch)")
    ap.add_argument("--eval-rows", type=int, default=10_000, help="held-out rows scored")
    ap.add_argument("--width", type=int, default=256, help="latents of every SAE")
    ap.add_argument("--k", type=int, default=8, help="L0 target (TopK's k; JumpReLU's aim)")
    ap.add_argument("--batch", type=int, default=256, help="rows per optimizer step")
    ap.add_argument(
        "--lrs",
        default=argparse.SUPPRESS,  # resolved below: it depends on --pick
        help="the lr grid, comma-separated (default 3e-3,1e-2,3e-2; --pick: 1e-2)",
    )
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated")
    ap.add_argument("--libs", default="ours,SAELens", help="libraries, comma-separated")
    ap.add_argument(
        "--archs",
        default=argparse.SUPPRESS,  # resolved below: it depends on --pick
        help=f"architectures, comma-separated (default {','.join(ARCHS)}; --pick: topk)",
    )
    ap.add_argument("--data-seed", type=int, default=42, help="seed of the synthetic model")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument(
        "--pick",
        action="store_true",
        help="our SAEs only, over --pick-ks x --pick-widths: the sweep's pick "
        "(sweeps.ranking.pick) beside the lowest val/fvu (see the module doc)",
    )
    ap.add_argument("--pick-ks", default="4,8,16,32", help="--pick: the k grid")
    ap.add_argument("--pick-widths", default="256,512", help="--pick: the width grid")
    ap.add_argument(
        "--max-dead-frac",
        type=float,
        default=0.2,
        help="--pick: the pick's bound on val/never_fired_frac",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lr_grid = getattr(args, "lrs", None) or ("1e-2" if args.pick else "3e-3,1e-2,3e-2")
    lrs = [float(v) for v in lr_grid.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    libs = args.libs.split(",")
    archs = (getattr(args, "archs", None) or ("topk" if args.pick else ",".join(ARCHS))).split(",")
    for name in libs:
        if name not in TRAINERS:
            ap.error(f"unknown library {name!r}: choose from {', '.join(TRAINERS)}")
    for name in archs:
        if name not in ARCHS:
            ap.error(f"unknown architecture {name!r}: choose from {', '.join(ARCHS)}")

    t0 = time.perf_counter()
    model = synthetic_model(args.data_seed)
    x, _ = sample(model, args.rows, seed=args.data_seed + 1)
    val, val_features = sample(model, args.eval_rows, seed=args.data_seed + 2)
    in_trees = len(model.hierarchy.feature_indices_used) if model.hierarchy else 0
    grid = (
        f"widths {args.pick_widths}, ks {args.pick_ks}, archs {archs}"
        if args.pick
        else f"{args.width} latents, k={args.k}"
    )
    print(
        f"synthetic: {model.cfg.num_features} features ({in_trees} in hierarchy trees) in "
        f"d={model.cfg.hidden_dim}, {(val_features > 0).sum(1).float().mean():.2f} active per "
        f"row; {args.rows} training rows, {args.eval_rows} held out ({time.perf_counter() - t0:.0f}"
        f" s); {grid}, batches of {args.batch}, one epoch ({args.rows // args.batch} steps), "
        f"lrs {lrs}, seeds {seeds}",
        flush=True,
    )
    if args.pick:
        run_pick(args, model, x, val, val_features, archs, lrs, seeds)
        print(f"({time.perf_counter() - t0:.0f} s)")
        return
    table = {}
    for arch in archs:
        for lr in lrs:
            for lib in libs:
                runs = []
                for seed in seeds:
                    t1 = time.perf_counter()
                    # train_sae warns once per process about CPU-only features: keep it quiet
                    with contextlib.redirect_stderr(io.StringIO()):
                        scored = TRAINERS[lib](
                            arch, x, val, width=args.width, k=args.k, lr=lr,
                            batch=args.batch, seed=seed,
                        )  # fmt: skip
                    runs.append(score(scored, model, val_features))
                    print(
                        f"  {lib} {arch} lr {lr:g} seed {seed}: MCC {runs[-1]['mcc']:.3f} "
                        f"({time.perf_counter() - t1:.0f} s)",
                        flush=True,
                    )
                mean = {m: statistics.mean(r[m] for r in runs) for m in runs[0]}
                mean["spread"] = max(r["mcc"] for r in runs) - min(r["mcc"] for r in runs)
                table[(arch, lr, lib)] = mean
    print()
    cols = "architecture | lr | library | MCC (seed spread) | L0 | EV | dead | F1 | ours - SAELens"
    print(f"| {cols} |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for (arch, lr, lib), m in table.items():
        peer = table.get((arch, lr, "SAELens"))
        diff = f"{m['mcc'] - peer['mcc']:+.3f}" if lib == "ours" and peer else "-"
        print(
            f"| {arch} | {lr:g} | {lib} | {m['mcc']:.3f} ({m['spread']:.3f}) | {m['l0']:.2f} | "
            f"{m['ev']:.3f} | {m['dead']:.1f} | {m['f1']:.3f} | {diff} |"
        )
    print()
    print("| architecture | library | best lr | MCC |")
    print("|---|---|---:|---:|")
    for arch in archs:
        for lib in libs:
            lr, m = max(
                ((lr, table[(arch, lr, lib)]) for lr in lrs), key=lambda item: item[1]["mcc"]
            )
            print(f"| {arch} | {lib} | {lr:g} | {m['mcc']:.3f} |")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
