"""Train one TopK SAE on a matrix of activations, with exact checkpoint and resume."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.optim.adam import adam

from .config import SaeConfig, TrainConfig
from .metrics import SaeStats, evaluate
from .model import TopKSae

STATE_FILE = "trainer_state.pt"

CAPTURE_AFTER = 3
"""Eager steps on a GPU before the step is captured: the first ones allocate the workspaces
and caches a capture must find in place."""


class DivergedError(RuntimeError):
    """Training diverged: the loss became NaN or infinite, or the FVU passed
    TrainConfig.diverged_fvu. The same data, config and seed diverge again."""


@dataclass
class TrainResult:
    sae: TopKSae
    """The trained SAE; with normalize_input its weights read raw activations."""
    metrics: dict[str, float]
    """Final metrics: dead_frac (training window) and, on the validation split, fvu,
    explained_variance, l0, never_fired_frac, dense_frac, mean_act, max_act (and train/fvu,
    step, input_scale)."""
    firing_frequency: Tensor
    """Fraction of validation inputs on which each latent fired, (M,)."""
    mean_activation: Tensor
    """Per latent, its mean validation activation where it fired (0 if it never did), (M,)."""
    max_activation: Tensor
    """Per latent, its largest validation activation, (M,)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """The metrics passed to the callback at each evaluation."""


class CapturedStep:
    """A training step captured in one CUDA graph: forward, AuxK, backward, gradient
    projection, Adam, lr schedule, renormalisation and bookkeeping, replayed on a static
    input buffer. Its batches must have the captured shape; others run eagerly."""

    def __init__(self, graph: torch.cuda.CUDAGraph, x_BD: Tensor):
        self.graph, self.x_BD = graph, x_BD

    @classmethod
    def capture(
        cls, step: Callable[[Tensor], None], x_BD: Tensor, optimizer
    ) -> CapturedStep | None:
        """Capture step(x) for batches like x_BD, or warn once why not and return None."""
        static_BD = x_BD.clone()
        graph = torch.cuda.CUDAGraph()
        # Gradients are made inside the graph, in its memory pool, and reused by every replay.
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(graph):
                step(static_BD)
        except Exception as e:  # what CUDA refused during capture: its reason, once
            torch.cuda.synchronize()
            optimizer.zero_grad(set_to_none=True)
            warnings.warn(
                f"training eagerly: the step could not be captured in a CUDA graph ({e})",
                stacklevel=3,
            )
            return None
        return cls(graph, static_BD)

    def fits(self, x_BD: Tensor) -> bool:
        return x_BD.shape == self.x_BD.shape

    def replay(self, x_BD: Tensor) -> None:
        """One step on x_BD: copied into the static buffer (from pinned memory without
        waiting), then the graph."""
        self.x_BD.copy_(x_BD, non_blocking=True)
        self.graph.replay()


def as_acts_tensor(acts, name: str = "acts") -> Tensor:
    """View an (N, d) array or tensor as a CPU/GPU tensor without copying it.

    Read-only numpy arrays (memory-mapped caches, Ray object-store arrays) are wrapped as is:
    torch warns that they are not writable, but training never writes to its input. Any other
    object with a torch `shape` and `dtype` whose `[rows]` (an index tensor or a slice) returns a
    tensor is taken as is: it reads batches on demand, e.g. sweeps.activations.cache.RowFile.
    """
    if isinstance(acts, np.ndarray):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*not writable.*")
            acts = torch.from_numpy(acts)
    elif not isinstance(acts, Tensor) and not isinstance(getattr(acts, "dtype", None), torch.dtype):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(acts).__name__}")
    if len(acts.shape) != 2:
        raise ValueError(f"{name} must be 2-D (rows, d_in), got shape {tuple(acts.shape)}")
    if acts.shape[0] == 0:
        raise ValueError(f"{name} is empty: no rows to train on")
    if not acts.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {acts.dtype}")
    return acts


def check_finite(acts_ND: Tensor, name: str = "acts", chunk: int = 65536) -> None:
    """Raise naming the first rows that hold NaN or inf."""
    for start in range(0, len(acts_ND), chunk):
        ok_B = torch.isfinite(acts_ND[start : start + chunk]).all(dim=1)
        if not bool(ok_B.all()):
            bad = (~ok_B).nonzero().squeeze(1)[:5] + start
            raise ValueError(
                f"{name} holds NaN or inf, first at rows {bad.tolist()}: clean or drop them"
            )


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available: use device='auto' or 'cpu'")
    return torch.device(device)


def geometric_median(x_BD: Tensor, iters: int = 200) -> Tensor:
    """The point minimising the summed distance to the rows (Weiszfeld's iteration)."""
    x = x_BD.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp(min=1e-12)
        new = (w[:, None] * x).sum(0) / w.sum()
        done = (new - m).norm() <= 1e-9 * (1 + m.norm())
        m = new
        if done:
            break
    return m.to(x_BD.dtype)


def total_steps(cfg: TrainConfig, n_train: int, batch_size: int) -> int:
    """Optimizer steps of a run: cfg.steps, or cfg.epochs passes of n_train rows."""
    return cfg.steps or max(1, math.ceil(cfg.epochs * n_train / batch_size))


def lr_factor(cfg: TrainConfig, total_steps: int, step: Tensor) -> Tensor:
    """The learning rate at `step` (a tensor, so the step computes it on the device) as a
    fraction of the peak: a linear warmup, then cfg.lr_schedule's decay over the rest."""
    warmup = min(cfg.lr_warmup_steps, max(total_steps - 1, 0))
    s = step.to(torch.float64)
    progress = ((s - warmup) / max(total_steps - warmup, 1)).clamp(0, 1)
    if cfg.lr_schedule == "constant":
        decay = torch.ones_like(s)
    elif cfg.lr_schedule == "linear":
        decay = 1 - progress
    else:
        decay = 0.5 * (1 + torch.cos(math.pi * progress))
    return torch.where(s < warmup, (s + 1) / (warmup + 1), decay)


class Trainer:
    """Owns the SAE, optimizer, schedule, dead-latent counters and position in the data.

    Batches are a pure function of (seed, epoch, step), so `save_state`/`load_state` plus the
    same data resume a run exactly where it stopped.

    With normalize_input, `self.sae` trains on input_scale * x; `export_sae()` is the same SAE
    reading raw x, which is what results and checkpoints hold.
    """

    def __init__(self, acts, sae_cfg: SaeConfig, cfg: TrainConfig, val_acts=None):
        cfg.validate()
        acts = as_acts_tensor(acts)
        d_in = acts.shape[1]
        sae_cfg.validate(d_in)
        self.cfg, self.sae_cfg = cfg, sae_cfg
        self.device = resolve_device(cfg.device)
        if self.device.type == "cpu":
            # Adam moments of rarely-firing latents decay into denormals, which run ~20x
            # slower on x86 CPUs; flushing them to zero changes no metric we report.
            torch.set_flush_denormal(True)

        split = torch.Generator().manual_seed(cfg.seed)
        if val_acts is not None:
            val_acts = as_acts_tensor(val_acts, "val_acts")
            if val_acts.shape[1] != d_in:
                raise ValueError(f"val_acts has d_in={val_acts.shape[1]} but acts has d_in={d_in}")
            self.train_idx = torch.arange(len(acts))
            self.val = val_acts
        else:
            perm = torch.randperm(len(acts), generator=split)
            n_val = round(len(acts) * cfg.val_fraction)
            if n_val >= len(acts):
                raise ValueError(
                    f"val_fraction={cfg.val_fraction} leaves no training rows out of {len(acts)}"
                )
            if cfg.val_fraction > 0 and n_val == 0:
                n_val = 1 if len(acts) > 1 else 0
            self.train_idx = perm[n_val:].sort().values
            self.val = acts[perm[:n_val].sort().values] if n_val else None
        check_finite(acts)
        if self.val is not None:
            check_finite(self.val, "val_acts")
        self.acts = acts
        self.n_train = len(self.train_idx)
        self.batch_size = min(cfg.batch_size, self.n_train)
        self.batches_per_epoch = self.n_train // self.batch_size
        self.total_steps = total_steps(cfg, self.n_train, self.batch_size)
        sample_ND = self._training_sample()
        if not bool((sample_ND - sample_ND[0]).any()):
            raise ValueError(
                "every training row is the same vector (all zero or constant): an SAE has "
                "nothing to learn from it and its FVU is undefined; check the layer and model "
                "that produced the activations"
            )
        self.input_scale = 1.0
        if cfg.normalize_input:  # the training rows' mean squared norm becomes d_in
            self.input_scale = math.sqrt(d_in / sample_ND.pow(2).sum(1).mean().item())

        torch.manual_seed(cfg.seed)
        self.sae = TopKSae(d_in, sae_cfg, device=self.device)
        with torch.no_grad():
            self.sae.encoder.weight.copy_(self.sae.W_dec * cfg.encoder_init_norm)
        self.peak_lr = cfg.lr or 2e-4 / math.sqrt(self.sae.num_latents / 2**14)
        self.step = 0
        self.step_T = torch.zeros((), dtype=torch.int64, device=self.device)
        """The step on the device, which the captured step reads and advances."""
        self.lr_T = (self.peak_lr * lr_factor(cfg, self.total_steps, self.step_T)).float()
        if cfg.freeze_decoder:
            self.sae.W_dec.requires_grad_(False)
        trained = [p for p in self.sae.parameters() if p.requires_grad]
        self.optimizer = _adam(trained, self.lr_T)
        self.since_fired_M = torch.zeros(
            self.sae.num_latents, dtype=torch.int64, device=self.device
        )
        self.nonfinite_step = torch.tensor(-1, device=self.device)
        """The first step whose loss was not finite (-1: none), read at log points."""
        self.loss_sums = torch.zeros(2, device=self.device)
        """Sums of the training FVU and AuxK loss since the last evaluation."""
        self.last_stats: tuple[int, SaeStats] | None = None
        """(step, validation stats) of the latest evaluation, reused by result()."""
        self._perm: tuple[int, Tensor] | None = None
        self._graph: CapturedStep | None = None
        self._capture = self.device.type == "cuda" and cfg.cuda_graph
        self.host_free = self.device.type != "cpu"
        """Whether the step never reads a value on the host. On the CPU a read costs nothing,
        and AuxK sizes itself by the dead count instead (TopKSae.aux_width)."""

    # -- data --------------------------------------------------------------------------------
    def _training_sample(self, max_rows: int = 2**16) -> Tensor:
        """A fixed sample of training rows in float64, for the input checks and the input
        scale (normalize_input: each coordinate gets unit RMS, as in SAELens)."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        sample = self.train_idx[torch.randperm(self.n_train, generator=gen)[:max_rows]]
        return self.acts[sample.sort().values].double()

    def batch_rows(self, step: int) -> Tensor:
        """Training row indices of a step's batch: each epoch is its own permutation."""
        epoch, pos = divmod(step, self.batches_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            self._perm = (epoch, self.train_idx[torch.randperm(self.n_train, generator=gen)])
        return self._perm[1][pos * self.batch_size : (pos + 1) * self.batch_size]

    def _batch(self, step: int) -> Tensor:
        """A step's rows as stored (any float dtype), on the host; pinned for a GPU, so its
        copy to the device does not wait."""
        rows = self.acts[self.batch_rows(step)]
        return rows.pin_memory() if self.device.type == "cuda" else rows

    def _read_ahead(self):
        """Batches from self.step on, each read in a thread while the one before trains: rows
        read from a file (the service's cache.RowFile) may come from disk. One batch ahead, no
        more."""
        with ThreadPoolExecutor(1) as reader:
            pending = reader.submit(self._batch, self.step)
            while True:
                batch = pending.result()
                if self.step + 1 < self.total_steps:
                    pending = reader.submit(self._batch, self.step + 1)
                yield batch

    # -- training ----------------------------------------------------------------------------
    def train_step(self, x_BD: Tensor) -> None:
        """One optimizer step on raw rows x_BD (any float dtype, on the host or the device).

        On a GPU (TrainConfig.cuda_graph) the first CAPTURE_AFTER steps run eagerly, then the
        step is captured in a CUDA graph and replayed for every batch of the same shape."""
        if self.step == 0:
            self._initialise(self._scaled(x_BD.to(self.device)))
        if self._capture and self._graph is None and self.step >= CAPTURE_AFTER:
            self._graph = CapturedStep.capture(self._step, x_BD.to(self.device), self.optimizer)
            self._capture = self._graph is not None
        if self._graph is not None and self._graph.fits(x_BD):
            self._graph.replay(x_BD)
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self._step(x_BD.to(self.device, non_blocking=True))
        self.step += 1

    def _scaled(self, x_BD: Tensor) -> Tensor:
        x_BD = x_BD.float()
        return x_BD * self.input_scale if self.input_scale != 1 else x_BD

    def _step(self, x_BD: Tensor) -> None:
        """The step itself, on a batch on the device: with host_free nothing in it reads a value
        on the host or depends on one, so a CUDA graph can capture it and torch.compile trace
        it whole.
        The gradients must be None when it starts."""
        sae, cfg = self.sae, self.cfg
        x_BD = self._scaled(x_BD)
        dead_M = self.since_fired_M >= cfg.dead_feature_threshold if cfg.auxk_alpha > 0 else None
        cuda = self.device.type == "cuda"
        # No autocast cache: a CUDA graph cannot hold it.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda, cache_enabled=False):
            out = sae(
                x_BD,
                dead_mask=dead_M,
                batch_topk=True,
                exact=cfg.exact_topk,
                host_free=self.host_free,
            )
        loss = out.fvu + cfg.auxk_alpha * out.auxk_loss + sae.architecture.loss(out, cfg)
        # The first step whose loss was not finite, read at log points (check_diverged).
        first = (self.nonfinite_step < 0) & ~torch.isfinite(loss.detach())
        self.nonfinite_step.copy_(torch.where(first, self.step_T, self.nonfinite_step))
        self.loss_sums.add_(torch.stack([out.fvu.detach(), out.auxk_loss.detach()]))
        loss.backward()
        renormalise = self.sae_cfg.normalize_decoder and not cfg.freeze_decoder
        if renormalise:
            sae.remove_gradient_parallel_to_decoder_directions()
        self.lr_T.copy_(self.peak_lr * lr_factor(cfg, self.total_steps, self.step_T))
        scaled = cfg.decoder_lr_scale != 1 and sae.W_dec.requires_grad
        if scaled:
            W_dec_before = sae.W_dec.detach().clone()
        _adam_step(self.optimizer)
        if scaled:
            # Adam's step is proportional to its lr (no weight decay): W_dec's step times
            # decoder_lr_scale is Adam's step at lr * decoder_lr_scale for the decoder alone,
            # with one optimizer and one lr as before (checkpoints and capture unchanged).
            with torch.no_grad():
                sae.W_dec.lerp_(W_dec_before, 1 - cfg.decoder_lr_scale)
        if renormalise:
            sae.set_decoder_norm_to_unit_norm()
        sae.architecture.after_step(sae, out)
        self.since_fired_M.add_(len(x_BD)).masked_fill_(out.fired_M, 0)
        self.step_T.add_(1)

    @torch.no_grad()
    def _initialise(self, x_BD: Tensor) -> None:
        """From the first batch: b_dec at its mean or geometric median, then the
        architecture's state (JumpReLU's thresholds)."""
        init = x_BD.mean(0) if self.cfg.b_dec_init == "mean" else geometric_median(x_BD)
        self.sae.b_dec.copy_(init)
        self.sae.architecture.initialise(self.sae, x_BD, self.cfg)

    def validate(self) -> SaeStats | None:
        if self.val is None:
            return None
        return evaluate(
            self.sae,
            self.val,
            batch_size=max(self.batch_size, 1024),
            device=self.device,
            input_scale=self.input_scale,
            exact=self.cfg.exact_topk,
        )

    def fit(self, callback: Callable[[dict, Trainer], None] | None = None) -> TrainResult:
        cfg = self.cfg
        history: list[dict[str, float]] = []
        n_since, t0 = 0, time.perf_counter()
        metrics: dict[str, float] = {}
        batches = self._read_ahead()
        while self.step < self.total_steps:
            self.train_step(next(batches))
            n_since += 1
            if self.step % cfg.eval_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - t0
                train_fvu, auxk_loss = (self.loss_sums / n_since).tolist()
                self.loss_sums.zero_()
                self.check_diverged(train_fvu)
                metrics = {
                    "step": self.step,
                    "epoch": self.step / max(self.batches_per_epoch, 1),
                    "train/fvu": train_fvu,
                    "auxk_loss": auxk_loss,
                    "lr": self.lr_T.item(),
                    "acts_per_s": n_since * self.batch_size / max(elapsed, 1e-9),
                    "dead_frac": self.dead_fraction(),
                }
                stats = self.validate()
                self.last_stats = (self.step, stats) if stats is not None else None
                if stats is not None:
                    val = stats.result()
                    metrics.update(
                        {
                            "val/fvu": val["fvu"],
                            "val/l0": val["l0"],
                            "val/never_fired_frac": val["never_fired_frac"],
                            "val/shrinkage": val["shrinkage"],
                            "dense_frac": val["dense_frac"],
                        }
                    )
                history.append(metrics)
                if callback is not None:
                    callback(metrics, self)
                n_since, t0 = 0, time.perf_counter()
        return self.result(history)

    def check_diverged(self, train_fvu: float) -> None:
        """Raise DivergedError, naming the step, if a loss so far was not finite or the mean
        training FVU since the last evaluation passed cfg.diverged_fvu."""
        step = int(self.nonfinite_step)
        if step < 0 and train_fvu <= self.cfg.diverged_fvu:
            return
        if step >= 0:
            reason = f"diverged at step {step}: the loss became NaN or infinite"
        else:
            reason = (
                f"diverged by step {self.step}: training FVU {train_fvu:.3g} "
                f"(above diverged_fvu={self.cfg.diverged_fvu:g})"
            )
        raise DivergedError(
            f"{reason}; lower the learning rate (lr {self.lr_T.item():.2e} at that point)"
        )

    def result(self, history: list[dict[str, float]]) -> TrainResult:
        fresh = self.last_stats is not None and self.last_stats[0] == self.step
        stats = self.last_stats[1] if fresh else self.validate()
        if stats is None:  # no validation split: score the training rows instead
            stats = evaluate(
                self.sae,
                self.acts[self.train_idx],
                device=self.device,
                input_scale=self.input_scale,
                exact=self.cfg.exact_topk,
            )
        final = {
            **stats.result(),
            "dead_frac": self.dead_fraction(),
            "step": self.step,
            "input_scale": self.input_scale,
        }
        if history:
            final["train/fvu"] = history[-1]["train/fvu"]
        return TrainResult(
            self.export_sae(),
            final,
            stats.firing_frequency().cpu(),
            stats.mean_activation().cpu(),
            stats.max_act_M.cpu(),
            history,
        )

    def export_sae(self):
        """The SAE reading raw activations (input_scale folded into its biases)."""
        if self.input_scale == 1:
            return self.sae
        return self.sae.input_scale_folded(self.input_scale)

    def dead_fraction(self) -> float:
        """Latents that have not fired for dead_feature_threshold training activations (the
        window AuxK acts on; sparsify's dead fraction)."""
        return (self.since_fired_M >= self.cfg.dead_feature_threshold).float().mean().item()

    def checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint_every or self.cfg.eval_every
        return self.step % every == 0 or self.step == self.total_steps

    # -- state -------------------------------------------------------------------------------
    def save_state(self, directory: str | Path) -> Path:
        """SAE (sparsify layout) plus everything needed to continue: optimizer, schedule,
        dead counters and step. Loads with torch.load(weights_only=True)."""
        directory = Path(directory)
        self.export_sae().save(directory)
        state = {
            # The training-space biases, so a resume need not unfold (inexactly) the saved ones.
            "train_space": {
                name: t.cpu()
                for name, t in self.sae.state_dict().items()
                if name not in ("encoder.weight", "W_dec")
            },
            "input_scale": self.input_scale,
            "optimizer": self.optimizer.state_dict(),
            "since_fired": self.since_fired_M.cpu(),
            "step": self.step,
            "seed": self.cfg.seed,
            "n_train": self.n_train,
            "batch_size": self.batch_size,
        }
        tmp = directory / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(directory / STATE_FILE)
        return directory

    def load_state(self, directory: str | Path) -> None:
        directory = Path(directory)
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        for key, mine in (
            ("n_train", self.n_train),
            ("batch_size", self.batch_size),
            ("seed", self.cfg.seed),
        ):
            if state[key] != mine:
                raise ValueError(
                    f"checkpoint {directory} was trained with {key}={state[key]}, "
                    f"this run has {key}={mine}: resume with the same data and settings"
                )
        loaded = TopKSae.load(directory, device=self.device)
        if loaded.d_in != self.sae.d_in or loaded.num_latents != self.sae.num_latents:
            raise ValueError(
                f"checkpoint {directory} has d_in={loaded.d_in}, M={loaded.num_latents}; "
                f"this run has d_in={self.sae.d_in}, M={self.sae.num_latents}"
            )
        self.sae.load_state_dict(loaded.state_dict())
        self.input_scale = state.get("input_scale", 1.0)
        with torch.no_grad():
            for name, tensor in state.get("train_space", {}).items():
                self.sae.state_dict()[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        # The step computes the lr into this tensor; a loaded state holds its own copy.
        self.optimizer.param_groups[0]["lr"] = self.lr_T
        self.since_fired_M.copy_(state["since_fired"])
        self.step = state["step"]
        self.step_T.fill_(self.step)


def _adam(params: list[Tensor], lr_T: Tensor) -> torch.optim.Adam:
    """Adam reading its lr from the device tensor lr_T, its state made now (not at the first
    step) so the step can be captured: fused where the device has the kernel (several times
    faster than foreach on CPU; capturable on CUDA)."""
    device = params[0].device
    optimizer = torch.optim.Adam(params, lr=lr_T, fused=True, capturable=True)
    for p in params:
        # Adam's own layout: a float32 step on the parameter's device (capturable or fused).
        optimizer.state[p] = {
            "step": torch.zeros((), dtype=torch.float32, device=device),
            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
        }
    return optimizer


def _adam_step(optimizer: torch.optim.Adam) -> None:
    """optimizer.step() through torch.optim's functional Adam: the method breaks torch.compile
    graphs on purpose, the function computes the same update. torch.compile does not trace the
    fused kernel (one kernel already): a compiled step runs Adam's foreach form."""
    group = optimizer.param_groups[0]
    params = [p for p in group["params"] if p.grad is not None]
    state = [optimizer.state[p] for p in params]
    beta1, beta2 = group["betas"]
    fused = group["fused"] and not torch.compiler.is_compiling()
    with torch.no_grad():
        adam(
            params,
            [p.grad for p in params],
            [s["exp_avg"] for s in state],
            [s["exp_avg_sq"] for s in state],
            [],
            [s["step"] for s in state],
            foreach=not fused,
            capturable=group["capturable"],
            fused=fused,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )


def train_sae(
    acts,
    sae_cfg: SaeConfig,
    train_cfg: TrainConfig,
    callback: Callable[[dict, Trainer], None] | None = None,
    *,
    val_acts=None,
    resume_from: str | Path | None = None,
) -> TrainResult:
    """Train a TopK SAE on `acts` (N, d_in).

    `callback(metrics, trainer)` runs every `eval_every` steps; it may call
    `trainer.save_state(dir)` when `trainer.checkpoint_due()`. `resume_from` continues from
    such a directory. Raises ValueError on bad input before training, DivergedError when the
    loss becomes NaN or infinite or the FVU passes train_cfg.diverged_fvu (at the next
    evaluation).
    """
    trainer = Trainer(acts, sae_cfg, train_cfg, val_acts=val_acts)
    if resume_from is not None:
        trainer.load_state(resume_from)
    return trainer.fit(callback)
