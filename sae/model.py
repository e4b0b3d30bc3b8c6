"""The TopK sparse autoencoder, saved in EleutherAI sparsify's checkpoint layout."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import SaeConfig, from_dict
from .kernels import sparse_decode, topk_encode


class ForwardOutput(NamedTuple):
    sae_out: Tensor
    """Reconstruction of the input."""
    latent_acts: Tensor
    """Activations of the k selected latents, (B, k)."""
    latent_indices: Tensor
    """Indices of the k selected latents, (B, k)."""
    fvu: Tensor
    """Fraction of variance unexplained on this batch."""
    auxk_loss: Tensor
    """AuxK loss (0 when no dead mask is given or no latent is dead)."""


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
        # Unit-norm rows from the start, as the issue and Gao et al. prescribe for every SAE.
        self.set_decoder_norm_to_unit_norm()

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    def _check_width(self, x_BD: Tensor) -> None:
        if x_BD.shape[-1] != self.d_in:
            raise ValueError(
                f"input has d_in={x_BD.shape[-1]} but this SAE was built for d_in={self.d_in}"
            )

    def encode(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """Activations and indices of the top-k latents, each (B, k)."""
        self._check_width(x_BD)
        acts_BK, idx_BK, _, _ = topk_encode(
            x_BD, self.encoder.weight, self.encoder.bias, self.b_dec, self.cfg.k
        )
        return acts_BK, idx_BK

    def decode(self, acts_BK: Tensor, idx_BK: Tensor) -> Tensor:
        return sparse_decode(acts_BK, idx_BK, self.W_dec) + self.b_dec

    def forward(
        self, x_BD: Tensor, *, dead_mask: Tensor | None = None, total_variance: Tensor | None = None
    ) -> ForwardOutput:
        """Encode, decode and score x. `dead_mask` (M,) bool turns on the AuxK loss."""
        self._check_width(x_BD)
        num_dead = int(dead_mask.sum()) if dead_mask is not None else 0
        # Gao et al. appendix B.1: k_aux = d/2, capped at the dead count; loss scaled down
        # when there are few dead latents.
        k_aux = min(self.d_in // 2, num_dead)
        acts_BK, idx_BK, aux_acts, aux_idx = topk_encode(
            x_BD,
            self.encoder.weight,
            self.encoder.bias,
            self.b_dec,
            self.cfg.k,
            dead_mask if k_aux > 0 else None,
            k_aux,
        )
        sae_out = self.decode(acts_BK, idx_BK)
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
        return ForwardOutput(sae_out, acts_BK, idx_BK, fvu, auxk_loss)

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
        """Write cfg.json and sae.safetensors in sparsify's layout."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "encoder.weight": self.encoder.weight,
            "encoder.bias": self.encoder.bias,
            "W_dec": self.W_dec,
            "b_dec": self.b_dec,
        }
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
        """Load a checkpoint written by `save` or by sparsify (extra cfg keys are ignored)."""
        directory = Path(directory)
        cfg_path, weights_path = directory / "cfg.json", directory / "sae.safetensors"
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: not an SAE checkpoint directory")
        raw = json.loads(cfg_path.read_text())
        d_in = raw.pop("d_in")
        known = {f.name for f in dataclasses.fields(SaeConfig)}
        cfg = from_dict(SaeConfig, {k: v for k, v in raw.items() if k in known})
        tensors = load_file(str(weights_path), device=str(device))
        sae = cls(d_in, cfg, device=device, dtype=tensors["W_dec"].dtype)
        sae.load_state_dict(tensors)
        return sae
