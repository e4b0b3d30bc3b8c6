"""The TopK sparse autoencoder, saved in EleutherAI sparsify's checkpoint layout.

A BatchTopK or Matryoshka SAE (`activation: batchtopk`, `matryoshka`) is saved in the same
layout plus one tensor, `threshold` (a scalar): at inference a latent fires where its
pre-activation exceeds it. A JumpReLU SAE's `threshold` holds one learnt threshold per latent,
(M,). sparsify has none of these and refuses them (an unexpected tensor).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import SaeConfig, from_dict
from .kernels import jumprelu, sparse_decode, topk_encode

THRESHOLD_LR = 0.01
"""BatchTopK: weight of each training batch in the running average of the inference
threshold (SAELens's topk_threshold_lr)."""

#: sparsify cfg.json keys for models this class cannot run: loading them would ignore weights.
UNSUPPORTED = {"transcode": "a transcoder", "skip_connection": "a skip connection"}

#: cfg.json keys a checkpoint must hold (besides its width, num_latents or expansion_factor).
REQUIRED = ("d_in", "k", "activation")


class ForwardOutput(NamedTuple):
    sae_out: Tensor
    """Reconstruction of the input."""
    latent_acts: Tensor
    """Activations of the selected latents, (B, k); BatchTopK: (B, widest row), zero-padded."""
    latent_indices: Tensor
    """Indices of the selected latents, same shape."""
    fvu: Tensor
    """Fraction of variance unexplained on this batch."""
    auxk_loss: Tensor
    """AuxK loss (0 when no dead mask is given or no latent is dead)."""
    inner_fvu: Tensor
    """Matryoshka: the sum over the inner levels of the FVU of the reconstruction by the
    level's latents alone (0 for the other activations); part of the training loss."""
    l0_loss: Tensor
    """JumpReLU: (L0 / k - 1)^2 with the batch's mean L0 counted straight-through, which
    TrainConfig.l0_coefficient weighs in the loss (0 for the other activations)."""


class TopKSae(nn.Module):
    """encoder: nn.Linear(d_in, M); decoder: W_dec (M, d_in), b_dec (d_in,) as in sparsify."""

    def __init__(self, d_in: int, cfg: SaeConfig, device=None, dtype=None):
        super().__init__()
        cfg.validate(d_in)
        self.cfg = cfg
        self.d_in = d_in
        self.num_latents = cfg.resolve_num_latents(d_in)
        self.encoder = nn.Linear(d_in, self.num_latents, device=device, dtype=dtype)
        self.encoder.bias.data.zero_()
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(d_in, device=device, dtype=dtype))
        # Unit-norm rows from the start, as Gao et al. prescribe for every SAE.
        self.set_decoder_norm_to_unit_norm()
        if cfg.thresholded:
            self.register_buffer("threshold", torch.zeros((), device=device, dtype=dtype))
        if cfg.jumprelu:
            # Learnt, and kept >= 0 by the trainer (a negative one would pass negative
            # pre-activations); the trainer sets its start from the first batch.
            self.threshold = nn.Parameter(torch.zeros(self.num_latents, device=device, dtype=dtype))

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    def _check_width(self, x_BD: Tensor) -> None:
        if x_BD.shape[-1] != self.d_in:
            raise ValueError(
                f"input has d_in={x_BD.shape[-1]} but this SAE was built for d_in={self.d_in}"
            )

    def _rule(self, batch_topk: bool) -> tuple[str, float | Tensor]:
        if self.cfg.jumprelu:
            return "threshold", self.threshold.detach()
        if not self.cfg.thresholded:
            return "topk", 0.0
        return ("batchtopk", 0.0) if batch_topk else ("threshold", float(self.threshold))

    def pre_activations(self, x_BD: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc.T + b_enc for every latent, (B, M): dense, with autograd."""
        return torch.addmm(self.encoder.bias, x_BD - self.b_dec, self.encoder.weight.t())

    def encode(
        self, x_BD: Tensor, *, batch_topk: bool = False, exact: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Activations and indices of the selected latents, each (B, k) for TopK.
        BatchTopK selects by its threshold, or with batch_topk=True the top k*B of the batch.
        `exact`: never pick candidates with a bf16 matmul (TrainConfig.exact_topk)."""
        self._check_width(x_BD)
        rule, threshold = self._rule(batch_topk)
        acts_BK, idx_BK, _, _ = topk_encode(
            x_BD,
            self.encoder.weight,
            self.encoder.bias,
            self.b_dec,
            self.cfg.k,
            rule=rule,
            threshold=threshold,
            exact=exact,
        )
        return acts_BK, idx_BK

    def decode(self, acts_BK: Tensor, idx_BK: Tensor) -> Tensor:
        return sparse_decode(acts_BK, idx_BK, self.W_dec) + self.b_dec

    def forward(
        self,
        x_BD: Tensor,
        *,
        dead_mask: Tensor | None = None,
        total_variance: Tensor | None = None,
        batch_topk: bool = False,
        exact: bool = False,
    ) -> ForwardOutput:
        """Encode, decode and score x. `dead_mask` (M,) bool turns on the AuxK loss;
        `batch_topk` selects BatchTopK's training rule (top k*B of the batch); `exact` as in
        `encode`."""
        self._check_width(x_BD)
        rule, threshold = self._rule(batch_topk)
        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        # Gao et al. appendix B.1: k_aux = d/2, capped at the dead count; loss scaled down
        # when there are few dead latents.
        k_aux = min(self.d_in // 2, num_dead)
        if self.cfg.jumprelu:
            # Dense: the thresholds' gradient needs the pre-activations near them, which a
            # sparse selection would not keep.
            pre_BM = self.pre_activations(x_BD)
            acts_BM, fires_BM = jumprelu(pre_BM, self.threshold, self.cfg.jumprelu_bandwidth)
            sae_out = acts_BM @ self.W_dec + self.b_dec
            width = max(int(fires_BM.sum(1).max()), 1)
            acts_BK, idx_BK = acts_BM.detach().topk(width, dim=1, sorted=False)
            l0_loss = (fires_BM.sum(1).mean() / self.cfg.k - 1).pow(2)
            if k_aux > 0:
                aux_acts, aux_idx = pre_BM.masked_fill(~dead_mask, -math.inf).topk(k_aux, dim=1)
                aux_acts = aux_acts.relu()
        else:
            acts_BK, idx_BK, aux_acts, aux_idx = topk_encode(
                x_BD,
                self.encoder.weight,
                self.encoder.bias,
                self.b_dec,
                self.cfg.k,
                dead_mask if k_aux > 0 else None,
                k_aux,
                rule,
                threshold,
                exact,
            )
            sae_out = self.decode(acts_BK, idx_BK)
            l0_loss = sae_out.new_zeros(())
        e_BD = x_BD - sae_out
        if total_variance is None:
            total_variance = (x_BD - x_BD.mean(0)).pow(2).sum()
        fvu = e_BD.pow(2).sum() / total_variance
        if k_aux > 0:
            # Dead latents learn to predict the main reconstruction's residual (no b_dec:
            # the residual already accounts for it).
            e_hat = sparse_decode(aux_acts, aux_idx, self.W_dec)
            scale = min(num_dead / (self.d_in // 2), 1.0)
            auxk_loss = scale * (e_hat - e_BD.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = fvu.new_zeros(())
        inner_fvu = fvu.new_zeros(())
        for width in self.cfg.matryoshka_widths(self.num_latents):
            # the level's own latents: the first `width`, their activations as the batch chose
            inner_BK = torch.where(idx_BK < width, acts_BK, 0)
            e_inner = x_BD - self.decode(inner_BK, idx_BK)
            inner_fvu = inner_fvu + e_inner.pow(2).sum() / total_variance
        return ForwardOutput(sae_out, acts_BK, idx_BK, fvu, auxk_loss, inner_fvu, l0_loss)

    @torch.no_grad()
    def update_threshold(self, acts_BK: Tensor) -> None:
        """BatchTopK: move the inference threshold towards the smallest positive activation
        the batch rule kept (Bussmann et al.); the first batch sets it."""
        positive = acts_BK[acts_BK > 0]
        if len(positive) == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        if self.threshold == 0:
            self.threshold.copy_(smallest)
        else:
            self.threshold.lerp_(smallest, THRESHOLD_LR)

    @torch.no_grad()
    def input_scale_folded(self, scale: float) -> TopKSae:
        """A copy that reads raw x, for an SAE trained on scale * x: the same latents fire,
        their activations, both biases and the thresholds shrink by 1/scale; the weights are
        unchanged."""
        raw = TopKSae(self.d_in, self.cfg, device=self.device, dtype=self.W_dec.dtype)
        raw.load_state_dict(self.state_dict())
        for name, tensor in raw.state_dict().items():
            if name not in ("encoder.weight", "W_dec"):
                tensor.div_(scale)
        return raw

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        eps = torch.finfo(self.W_dec.dtype).eps
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True) + eps

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the radial part of W_dec's gradient, so steps move along the sphere."""
        if self.W_dec.grad is None:
            return
        parallel_M = (self.W_dec.grad * self.W_dec.data).sum(dim=1, keepdim=True)
        self.W_dec.grad -= parallel_M * self.W_dec.data

    def save(self, directory: str | Path) -> Path:
        """Write cfg.json and sae.safetensors in sparsify's layout (plus `threshold` for
        BatchTopK, Matryoshka and JumpReLU)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.state_dict()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
            str(directory / "sae.safetensors"),
        )
        # The real width, not 0 ("use expansion_factor"), spares other loaders the lookup.
        cfg = {**dataclasses.asdict(self.cfg), "num_latents": self.num_latents, "d_in": self.d_in}
        (directory / "cfg.json").write_text(json.dumps(cfg, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu") -> TopKSae:
        """Load a checkpoint written by `save` or by sparsify (other extra cfg keys, such as
        sparsify's training-only multi_topk, are ignored)."""
        directory = Path(directory)
        cfg_path, weights_path = directory / "cfg.json", directory / "sae.safetensors"
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: not an SAE checkpoint directory")
        try:
            raw = json.loads(cfg_path.read_text())
        except ValueError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e}): not an SAE checkpoint") from None
        # Every field that changes what the SAE computes must be there: a default in its
        # place would load another SAE than the one saved.
        missing = [key for key in REQUIRED if key not in raw]
        if not raw.get("num_latents") and not raw.get("expansion_factor"):
            missing.append("num_latents")
        if missing:
            raise ValueError(
                f"{cfg_path} lacks {', '.join(missing)}, which the SAE's function depends on: "
                "not a complete checkpoint (save it with TopKSae.save or sparsify)"
            )
        d_in = raw.pop("d_in")
        for key, what in UNSUPPORTED.items():
            if raw.get(key):
                raise ValueError(
                    f"{cfg_path} describes {what} ({key}: true), which TopKSae cannot run: "
                    "load it with sparsify.SparseCoder.load_from_disk"
                )
        known = {f.name for f in dataclasses.fields(SaeConfig)}
        try:
            cfg = from_dict(SaeConfig, {k: v for k, v in raw.items() if k in known})
            cfg.validate(d_in)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: {e}") from None
        try:
            tensors = load_file(str(weights_path), device=str(device))
        except Exception as e:  # safetensors' own error type: a damaged or foreign file
            raise ValueError(f"{weights_path} cannot be read ({e}): a damaged file?") from None
        sae = cls(d_in, cfg, device=device, dtype=tensors.get("W_dec", torch.empty(0)).dtype)
        expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if found != expected:
            wrong = sorted(
                k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k)
            )
            detail = ", ".join(
                f"{k} {found.get(k, 'missing')} (want {expected.get(k, 'none')})" for k in wrong
            )
            raise ValueError(f"{weights_path} does not match {cfg_path}: {detail}")
        sae.load_state_dict(tensors)
        return sae
