"""What an SAE architecture is: how it selects latents in training and at inference, what it
adds to the loss, the state it keeps, and what SAELens and sparsify call it.

`sae.model.TopKSae` holds the weights every architecture shares (encoder, W_dec, b_dec) and
asks its architecture, `TopKSae.architecture`, everything that differs. A new architecture is
one subclass in a file of its own and one registration (`sae/architectures/__init__.py`).

Configs and the sweep read these classes without torch (the CLI's --help, `best`, a cache hit
load none): an architecture's module imports torch and sae.kernels inside its methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from torch import Tensor

    from sae.config import SaeConfig, TrainConfig
    from sae.kernels import Selection
    from sae.model import ForwardOutput, TopKSae


class Architecture:
    """One kind of SAE. Subclasses set the class attributes and override `select`; the other
    methods default to a TopK SAE's (no state, no extra loss)."""

    name: ClassVar[str]
    """Its SaeConfig.activation: the config's, search.activation's and cfg.json's value."""

    title: ClassVar[str]
    """Its name for people: the leaderboard, the model card, the export."""

    saelens: ClassVar[str] = "topk"
    """The SAELens architecture it is exported as: topk, or jumprelu for any SAE that fires
    latents above a threshold (per latent, or one for all, repeated)."""

    sparsify: ClassVar[bool] = False
    """Whether EleutherAI sparsify loads it (sparsify runs TopK alone)."""

    searched: ClassVar[tuple[str, ...]] = ()
    """Searched hyperparameters (search.<name>, a TrainConfig field) its trials sample and
    other architectures' trials leave at 0."""

    label: ClassVar[dict[str, str]] = {}
    """How its searched hyperparameters are written in a trial's label: name -> prefix."""

    prefilter: ClassVar[bool] = False
    """Its selection keeps each row's k largest pre-activations, which a bf16 matmul may
    propose candidates for (kernels.bf16_prefilter)."""

    flat: ClassVar[bool] = False
    """Its training selection is over the whole batch (k * B latents, rows in latent_rows)."""

    dense: ClassVar[bool] = False
    """Its forward is dense (B, M) through `dense_forward`, not a selection."""

    def __init__(self, cfg: SaeConfig):
        self.cfg = cfg

    def add_state(self, sae: TopKSae) -> None:
        """Register the parameters and buffers it needs beyond the shared weights (saved and
        loaded with them, in sparsify's sae.safetensors)."""

    def select(self, sae: TopKSae, pre_BM: Tensor, training: bool, rescore=None) -> Selection:
        """The latents that fire for pre-activations pre_BM, ReLU applied, in training (the
        rule that learns) or at inference. `rescore(idx_BC)` gives exact values where pre_BM
        is a bf16 estimate (only when `prefilter`)."""
        raise NotImplementedError

    def dense_forward(self, sae: TopKSae, pre_BM: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`dense` architectures: training activations (B, M) with autograd, which latents
        fire (B, M), and the sparsity loss (the trainer weighs it by l0_coefficient)."""
        raise NotImplementedError

    def inner_fvu(
        self, sae: TopKSae, x_BD: Tensor, sel: Selection, total_variance: Tensor
    ) -> Tensor:
        """An extra reconstruction loss on the selection, part of the training loss."""
        return x_BD.new_zeros(())

    def loss(self, out: ForwardOutput, train: TrainConfig) -> Tensor:
        """Its terms of the training loss beyond FVU and AuxK."""
        return out.inner_fvu + train.l0_coefficient * out.l0_loss

    def initialise(self, sae: TopKSae, x_BD: Tensor, train: TrainConfig) -> None:
        """Set its state from the first training batch (after b_dec)."""

    def after_step(self, sae: TopKSae, out: ForwardOutput) -> None:
        """Update its state after an optimizer step, on the device (the step is captured in a
        CUDA graph: nothing here may read a value on the host)."""
