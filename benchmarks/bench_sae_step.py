"""Activations per second of one SAE training step: this project against dense PyTorch and
EleutherAI sparsify (when installed), same inputs, measured in one run.

    python benchmarks/bench_sae_step.py [--device cpu|cuda] [--shapes cpu|gpu] [--steps N]
                                        [--quick] [--architectures]

Columns (medians of the timed steps, after warm-up steps):
  ours     Trainer.train_step (on a GPU: bf16 autocast, captured in a CUDA graph)
  dense32  stock autograd TopK, dense (B, M) latents, fused Adam, fp32
  dense16  the same in bf16 autocast
  graph16  dense16 with the whole step captured in one CUDA graph (GPU only)
  sp32     sparsify's SparseCoder step with its trainer's torch.optim.Adam, fp32
  sp16     the same in bf16 autocast
`--architectures` adds ours for each of TopK, BatchTopK, Matryoshka and JumpReLU. On CPU the
header says whether the bf16 candidate prefilter is on at each shape, and why.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from contextlib import nullcontext

import torch

from sae import SaeConfig, TrainConfig, kernels
from sae.trainer import CAPTURE_AFTER, CapturedStep, Trainer, _adam

CPU_SHAPES = [(768, 6144, 32, 4096), (768, 3072, 64, 500)]  # (d, M, k, B)
GPU_SHAPES = [
    (768, 3072, 64, 100),
    (768, 3072, 64, 500),
    (768, 6144, 32, 100),
    (768, 6144, 32, 4096),
    (768, 24576, 64, 4096),
    (1024, 32768, 64, 4096),
]
ARCHITECTURES = ("topk", "batchtopk", "matryoshka", "jumprelu")


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def dense_step(d, M, k, device, bf16: bool):
    """Stock autograd: dense (B, M) latents, dense decoder matmul, fused Adam; returns the
    step and its optimizer."""
    torch.manual_seed(0)
    W_enc = torch.nn.Parameter(torch.randn(M, d, device=device) / d**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(M, device=device))
    W_dec = torch.nn.Parameter(W_enc.data.clone() / W_enc.data.norm(dim=1, keepdim=True))
    b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = _adam(params, torch.tensor(1e-4, device=device))

    def step(x):
        with _autocast(device, bf16):
            pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
            vals, idx = pre.topk(k, dim=1, sorted=False)
            z = torch.zeros_like(pre).scatter(1, idx, vals)
            e = x - (z @ W_dec + b_dec)
            loss = e.float().pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step, opt


def graph_step(d, M, k, device, x, warmup: int):
    """dense16 with the whole step captured in one CUDA graph (the bar a GPU step must meet)."""
    step, opt = dense_step(d, M, k, device, bf16=True)
    for _ in range(warmup):
        step(x)
    captured = CapturedStep.capture(step, x, opt)
    if captured is None:
        raise RuntimeError("the dense step could not be captured")
    return captured.replay


def sparsify_step(d, M, k, device, bf16: bool):
    """sparsify's SparseCoder step, with its trainer's torch.optim.Adam."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=M, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    dead = torch.zeros(M, dtype=torch.bool, device=device)

    def step(x):
        with _autocast(device, bf16):
            out = sae(x, dead_mask=dead)
            loss = out.fvu + out.auxk_loss / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def ours(d, M, k, B, device, activation="topk"):
    acts = torch.randn(B * 4, d)
    cfg = TrainConfig(batch_size=B, val_fraction=0, steps=10**9, device=str(device), lr=1e-4)
    trainer = Trainer(acts, SaeConfig(num_latents=M, k=k, activation=activation), cfg)
    return trainer.train_step


def measure(step, x, steps, warmup, sync):
    """Median activations/s of `steps` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):  # allocations, autotuning, ours' CUDA graph capture
        step(x)
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x)
        sync()
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _rate(r) -> str:
    return "-" if r is None else f"{r:,.0f}"


def _ratio(a, b) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", choices=("cpu", "gpu"), help="default: the device's")
    parser.add_argument("--steps", type=int, help="timed steps per method (30 GPU, 7 CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument(
        "--quick", action="store_true", help="rehearsal: widths /8, batches <= 256, 3 steps"
    )
    parser.add_argument(
        "--architectures", action="store_true", help="also time ours for all 4 architectures"
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    shapes = GPU_SHAPES if (args.shapes or ("gpu" if cuda else "cpu")) == "gpu" else CPU_SHAPES
    steps = args.steps or (30 if cuda else 7)
    if args.quick:
        shapes = [(d, M // 8, k, min(B, 256)) for d, M, k, B in shapes]
        steps = min(steps, 3)
    try:
        import sparsify  # noqa: F401

        have_sparsify = True
    except ImportError:
        have_sparsify = False
        print("eai-sparsify not installed (pip install -e '.[bench]'): its columns are skipped")

    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    if cuda:
        print(f"gpu={torch.cuda.get_device_name()} cuda={torch.version.cuda}")
    print(f"{steps} timed steps after {args.warmup} warm-ups, medians, activations/s\n")
    cols = ["ours", "dense32", "dense16", "graph16", "sp32", "sp16"]
    ratios = [("ours", "dense16"), ("ours", "graph16"), ("ours", "sp32"), ("ours", "sp16")]
    print(_row(["d", "M", "k", "B", *cols, *(f"{a}/{b}" for a, b in ratios)]))
    print(_row(["---"] * 4 + ["---:"] * (len(cols) + len(ratios))))
    notes = []
    for d, M, k, B in shapes:
        x = torch.randn(B, d, device=device)
        if not cuda:
            on = kernels.bf16_prefilter(torch.empty(B, d), torch.empty(M, d))
            notes.append(
                f"bf16 prefilter at ({d}, {M}, {k}, {B}): {'on' if on else 'off'} (native bf16 "
                f"flags: {kernels._native_bf16_cpu()}, >= 2^28 MACs: {B * M * d >= 2**28})"
            )
        run = functools.partial(measure, x=x, steps=steps, warmup=args.warmup, sync=sync)
        # ours is captured after CAPTURE_AFTER eager steps: warm-ups from there
        rate = {"ours": run(ours(d, M, k, B, device), warmup=CAPTURE_AFTER + args.warmup)}
        rate["dense32"] = run(dense_step(d, M, k, device, bf16=False)[0])
        rate["dense16"] = run(dense_step(d, M, k, device, bf16=True)[0])
        rate["graph16"] = run(graph_step(d, M, k, device, x, args.warmup)) if cuda else None
        if have_sparsify:
            rate["sp32"] = run(sparsify_step(d, M, k, device, bf16=False))
            rate["sp16"] = run(sparsify_step(d, M, k, device, bf16=True))
        cells = [_rate(rate.get(c)) for c in cols]
        cells += [_ratio(rate.get(a), rate.get(b)) for a, b in ratios]
        print(_row([d, M, k, B, *cells]), flush=True)
    print("\n".join(["", *notes]) if notes else "")
    if args.architectures:
        print("\nours, each architecture (activations/s)\n")
        print(_row(["d", "M", "k", "B", *ARCHITECTURES]))
        print(_row(["---"] * 4 + ["---:"] * len(ARCHITECTURES)))
        for d, M, k, B in shapes:
            x = torch.randn(B, d, device=device)
            cells = [
                _rate(
                    measure(
                        ours(d, M, k, B, device, a), x, steps, CAPTURE_AFTER + args.warmup, sync
                    )
                )
                for a in ARCHITECTURES
            ]
            print(_row([d, M, k, B, *cells]), flush=True)


if __name__ == "__main__":
    main()
