"""The TopK sparse autoencoder, saved in EleutherAI sparsify's checkpoint layout.

A BatchTopK or Matryoshka SAE (`activation: batchtopk`, `matryoshka`) is saved in the same
layout plus one tensor, `threshold` (a scalar): at inference a latent fires where its
pre-activation exceeds it. A JumpReLU SAE's `threshold` holds one learnt threshold per latent,
(M,). sparsify has none of these and refuses them (an unexpected tensor).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from . import architectures, kernels
from .config import SaeConfig, from_dict
from .kernels import Selection, decode, encode, exact_pre, over_threshold, per_row, top_per_row

#: sparsify cfg.json keys for models this class cannot run: loading them would ignore weights.
UNSUPPORTED = {"transcode": "a transcoder", "skip_connection": "a skip connection"}

#: cfg.json keys a checkpoint must hold (besides its width, num_latents or expansion_factor).
REQUIRED = ("d_in", "k", "activation")


class ForwardOutput(NamedTuple):
    sae_out: Tensor
    """Reconstruction of the input."""
    latent_acts: Tensor
    """Activations of the selected latents: (B, k) for TopK; (B, widest row), zero-padded,
    for a threshold; the batch rule (training BatchTopK) selects k*B over the whole batch:
    flat, (k*B,), rows in latent_rows; JumpReLU in training: dense, (B, M)."""
    latent_indices: Tensor
    """Indices of the selected latents, the same shape."""
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
    fired_M: Tensor
    """Which latents fired (a positive activation) on some row of the batch, (M,) bool."""
    latent_rows: Tensor | None = None
    """The batch rule: the row of each selected latent; None for the other layouts."""

    def dense_latents(self, num_latents: int) -> Tensor:
        """The activations as a dense (B, M) matrix, whatever the layout."""
        out_BM = self.latent_acts.new_zeros(len(self.sae_out), num_latents)
        if self.latent_rows is None:
            return out_BM.scatter_(1, self.latent_indices, self.latent_acts)
        return out_BM.index_put_((self.latent_rows, self.latent_indices), self.latent_acts)


def _fired(sel: Selection, num_latents: int) -> Tensor:
    hits_M = torch.zeros(num_latents, device=sel.acts_N.device)
    return hits_M.index_add_(0, sel.latents_N, (sel.acts_N > 0).float()) > 0


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
        self.architecture = architectures.get(cfg.activation)(cfg)
        """What differs between architectures: selection, extra losses and state."""
        self.architecture.add_state(self)

    @property
    def device(self) -> torch.device:
        return self.encoder.weight.device

    @property
    def k_aux(self) -> int:
        """Latents the AuxK loss selects per row at most (Gao et al. appendix B.1: d/2)."""
        return min(self.d_in // 2, self.num_latents)

    def aux_width(self, dead_M: Tensor, host_free: bool) -> int:
        """Latents the AuxK loss selects per row: k_aux, dead or not, when the step must not
        read the host (its shapes then never depend on how many latents are dead; the live
        ones it picks get 0); else min(dead, k_aux), read on the host, 0 when none is dead.
        Both give the same loss; the second skips AuxK's work while few latents are dead."""
        return self.k_aux if host_free else min(int(dead_M.sum()), self.k_aux)

    def _check_width(self, x_BD: Tensor) -> None:
        if x_BD.shape[-1] != self.d_in:
            raise ValueError(
                f"input has d_in={x_BD.shape[-1]} but this SAE was built for d_in={self.d_in}"
            )

    def pre_activations(self, x_BD: Tensor) -> Tensor:
        """(x - b_dec) @ W_enc.T + b_enc for every latent, (B, M): dense, with autograd."""
        return torch.addmm(self.encoder.bias, x_BD - self.b_dec, self.encoder.weight.t())

    @torch.no_grad()
    def _select(
        self, x_BD: Tensor, training: bool, exact: bool, aux_width: int, dead_M: Tensor | None
    ) -> tuple[Selection, Selection | None]:
        """The latents the architecture's rule selects (in training or at inference), and the
        AuxK selection of aux_width latents per row among dead_M, without autograd. A per-row
        TopK may pick candidates with a bf16 matmul (kernels.bf16_prefilter)."""
        W_MD, b_M = self.encoder.weight, self.encoder.bias
        xc_BD = x_BD - self.b_dec
        rescore = None
        if self.architecture.prefilter and kernels.bf16_prefilter(xc_BD, W_MD, exact):
            pre_BM = torch.addmm(b_M.bfloat16(), xc_BD.bfloat16(), W_MD.bfloat16().t())
            rescore = functools.partial(exact_pre, xc_BD, W_MD, b_M)
        else:
            pre_BM = torch.addmm(b_M, xc_BD, W_MD.t())
        sel = self.architecture.select(self, pre_BM, training, rescore=rescore)
        aux = None
        if aux_width:
            aux = top_per_row(pre_BM, aux_width, mask_M=dead_M, rescore=rescore)
        return sel, aux

    def encode(
        self, x_BD: Tensor, *, batch_topk: bool = False, exact: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Activations and indices of the selected latents, each (B, k) for TopK; with a
        threshold (BatchTopK at inference, JumpReLU) rows are padded to the widest with zeros.
        With batch_topk=True an architecture whose training rule selects over the batch
        (BatchTopK's top k*B) selects by it (padded alike).
        `exact`: never pick candidates with a bf16 matmul (TrainConfig.exact_topk)."""
        self._check_width(x_BD)
        if batch_topk and self.architecture.flat:
            with torch.no_grad():
                pre_BM = self.pre_activations(x_BD)
                flat = self.architecture.select(self, pre_BM, training=True)
                keep_BM = torch.zeros_like(pre_BM, dtype=torch.bool)
                keep_BM[flat.rows_N, flat.latents_N] = True
                sel = over_threshold(pre_BM, keep_BM)
        else:
            sel, _ = self._select(x_BD, training=False, exact=exact, aux_width=0, dead_M=None)
        acts_N = encode(sel, x_BD, self.encoder.weight, self.encoder.bias, self.b_dec)
        width = len(sel.acts_N) // len(x_BD)
        return acts_N.view(len(x_BD), width), sel.latents_N.view(len(x_BD), width)

    def decode(self, acts_BK: Tensor, idx_BK: Tensor) -> Tensor:
        """The reconstruction from K latents per row (as `encode` gives them)."""
        sel = per_row(acts_BK, idx_BK)
        return decode(sel, self.W_dec) + self.b_dec

    def forward(
        self,
        x_BD: Tensor,
        *,
        dead_mask: Tensor | None = None,
        total_variance: Tensor | None = None,
        batch_topk: bool = False,
        exact: bool = False,
        host_free: bool = True,
    ) -> ForwardOutput:
        """Encode, decode and score x. `dead_mask` (M,) bool turns on the AuxK loss;
        `batch_topk` selects the architecture's training rule (BatchTopK's top k*B of the
        batch); `exact` as in `encode`. With the TopK or batch rule nothing here waits for
        the device, unless host_free=False lets AuxK size itself by the dead count (see
        aux_width)."""
        self._check_width(x_BD)
        M = self.num_latents
        aux_width = 0 if dead_mask is None else self.aux_width(dead_mask, host_free)
        params = (self.encoder.weight, self.encoder.bias, self.b_dec)
        arch = self.architecture
        sel = None
        if arch.dense:
            pre_BM = self.pre_activations(x_BD)
            acts_BM, fires_BM, l0_loss = arch.dense_forward(self, pre_BM)
            sae_out = acts_BM @ self.W_dec + self.b_dec
            latent_acts, latent_indices = acts_BM.detach(), torch.arange(M, device=x_BD.device)
            latent_indices, rows = latent_indices.expand(len(x_BD), M), None
            fired_M = fires_BM.detach().any(0)
            aux = None
            if aux_width:
                aux = top_per_row(pre_BM.detach(), aux_width, mask_M=dead_mask)
                picked_N = pre_BM[aux.rows_N, aux.latents_N]
                aux = aux._replace(acts_N=torch.where(aux.acts_N > 0, picked_N, 0))
        else:
            sel, aux = self._select(x_BD, batch_topk, exact, aux_width, dead_mask)
            sel = sel._replace(acts_N=encode(sel, x_BD, *params[:2], self.b_dec))
            if aux is not None:
                aux = aux._replace(acts_N=encode(aux, x_BD, *params[:2], self.b_dec))
            sae_out = decode(sel, self.W_dec) + self.b_dec
            l0_loss = sae_out.new_zeros(())
            fired_M = _fired(sel, M)
            flat = arch.flat and batch_topk
            rows = sel.rows_N if flat else None
            shape = (-1,) if flat else (len(x_BD), -1)
            latent_acts, latent_indices = sel.acts_N.view(shape), sel.latents_N.view(shape)
        e_BD = x_BD - sae_out
        if total_variance is None:
            total_variance = (x_BD - x_BD.mean(0)).pow(2).sum()
        fvu = e_BD.pow(2).sum() / total_variance
        if aux is not None:
            # Dead latents learn to predict the main reconstruction's residual (no b_dec:
            # the residual already accounts for it). Gao et al.: the loss is scaled down
            # when fewer than d/2 latents are dead, and is 0 when none is.
            e_hat = decode(aux, self.W_dec)
            scale = (dead_mask.sum() / (self.d_in // 2)).clamp(max=1)
            auxk_loss = scale * (e_hat - e_BD.detach()).pow(2).sum() / total_variance
        else:
            auxk_loss = fvu.new_zeros(())
        inner_fvu = (
            fvu.new_zeros(()) if sel is None else arch.inner_fvu(self, x_BD, sel, total_variance)
        )
        return ForwardOutput(
            sae_out, latent_acts, latent_indices, fvu, auxk_loss, inner_fvu, l0_loss, fired_M, rows
        )

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
