"""Activations per second of one SAE training step: this project vs a dense PyTorch reference
vs EleutherAI sparsify (when installed), same inputs, measured in one run. The dense reference
uses our fused Adam; sparsify runs twice, with its trainer's Adam and with our fused one.

    python benchmarks/bench_sae_step.py [--steps 7] [--device cpu|cuda]

On a GPU machine `--device cuda` prints the whole GPU table in one run: ours, the dense
reference and, where sparsify imports, its Triton kernels (sparsify uses them on CUDA). On CPU
the header says whether the bf16 candidate prefilter is on at each shape, and why.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sae import SaeConfig, TrainConfig, kernels
from sae.trainer import Trainer, _adam

SHAPES = [(768, 6144, 32, 4096), (768, 3072, 64, 500)]  # (d, M, k, B)


def dense_reference(d, M, k, device):
    """Stock autograd: dense (B, M) latents, dense decoder matmul."""
    torch.manual_seed(0)
    W_enc = torch.nn.Parameter(torch.randn(M, d, device=device) / d**0.5)
    b_enc = torch.nn.Parameter(torch.zeros(M, device=device))
    W_dec = torch.nn.Parameter(W_enc.data.clone() / W_enc.data.norm(dim=1, keepdim=True))
    b_dec = torch.nn.Parameter(torch.zeros(d, device=device))
    params = [W_enc, b_enc, W_dec, b_dec]
    opt = _adam(params, 1e-4)

    def step(x):
        pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
        vals, idx = pre.topk(k, dim=1, sorted=False)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
        e = x - (z @ W_dec + b_dec)
        loss = e.pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
        opt.step()
        with torch.no_grad():
            W_dec.div_(W_dec.norm(dim=1, keepdim=True))

    return step


def sparsify_step(d, M, k, device, fused_adam: bool):
    """sparsify's SparseCoder step; with fused_adam=False its trainer's own torch.optim.Adam."""
    from sparsify import SparseCoder, SparseCoderConfig

    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(num_latents=M, k=k), device=device)
    params = list(sae.parameters())
    opt = _adam(params, 1e-4) if fused_adam else torch.optim.Adam(params, lr=1e-4)
    dead = torch.zeros(M, dtype=torch.bool, device=device)

    def step(x):
        out = sae(x, dead_mask=dead)
        loss = out.fvu + out.auxk_loss / 32
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        sae.set_decoder_norm_to_unit_norm()

    return step


def ours(d, M, k, B, device):
    acts = torch.randn(B * 4, d)
    cfg = TrainConfig(batch_size=B, val_fraction=0, steps=10**9, device=device, lr=1e-4)
    trainer = Trainer(acts, SaeConfig(num_latents=M, k=k), cfg)
    return lambda x: trainer.train_step(x)


def measure(step, x, steps, sync):
    step(x)  # warm-up: allocations, autotuning
    sync()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(x)
        sync()
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7, help="timed steps per method")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:
        import sparsify  # noqa: F401

        have_sparsify = True
    except ImportError:
        have_sparsify = False
        print("eai-sparsify not installed (pip install -e '.[bench]'): its column is skipped")

    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    header = f"{'d':>4} {'M':>5} {'k':>3} {'B':>5} | {'ours':>9} {'dense':>9}"
    header += f" {'sparsify':>9} {'sp+fused':>9} | {'ours/dense':>10} {'ours/sparsify':>13}"
    header += f" {'ours/sp+fused':>13}"
    print(header + "\n" + "-" * len(header))
    for d, M, k, B in SHAPES:
        x = torch.randn(B, d, device=device)
        if device.type == "cpu":
            on = kernels.bf16_prefilter(torch.empty(B, d), torch.empty(M, d))
            print(
                f"bf16 prefilter at B={B}: {'on' if on else 'off'} (native bf16 flags: "
                f"{kernels._native_bf16_cpu()}, >= 2^28 MACs: {B * M * d >= 2**28})"
            )
        rate = {"ours": measure(ours(d, M, k, B, args.device), x, args.steps, sync)}
        rate["dense"] = measure(dense_reference(d, M, k, device), x, args.steps, sync)
        if have_sparsify:
            for name, fused in (("sparsify", False), ("sp+fused", True)):
                step = sparsify_step(d, M, k, device, fused)
                rate[name] = measure(step, x, args.steps, sync)
        sp, spf = rate.get("sparsify", float("nan")), rate.get("sp+fused", float("nan"))
        print(
            f"{d:>4} {M:>5} {k:>3} {B:>5} | {rate['ours']:>9,.0f} {rate['dense']:>9,.0f} "
            f"{sp:>9,.0f} {spf:>9,.0f} | {rate['ours'] / rate['dense']:>9.2f}x "
            f"{rate['ours'] / sp:>12.2f}x {rate['ours'] / spf:>12.2f}x"
        )
    print("(activations per second, median of timed steps; higher is better)")
    print("sparsify: its trainer's torch.optim.Adam; sp+fused: with the fused Adam ours uses")


if __name__ == "__main__":
    main()
