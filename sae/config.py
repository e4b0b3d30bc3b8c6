"""Configs of the SAE and of its training. Each field's docstring is its help text."""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Literal


@dataclass
class SaeConfig:
    """Shape of a TopK sparse autoencoder (the fields of sparsify's `cfg.json`)."""

    expansion_factor: int = 8
    """Number of latents as a multiple of the input width d_in."""

    num_latents: int = 0
    """Number of latents. When > 0 it overrides expansion_factor."""

    k: int = 32
    """Number of latents kept active per input (TopK)."""

    normalize_decoder: bool = True
    """Keep every decoder row at unit norm during training."""

    activation: Literal["topk", "batchtopk", "matryoshka", "jumprelu"] = "topk"
    """topk: the k largest latents of each input (sparsify's). batchtopk (Bussmann et al.
    2024): the k * B largest over a training batch of B inputs, so inputs share the budget;
    at inference a latent fires above a threshold estimated during training. matryoshka
    (Bussmann et al. 2025): batchtopk whose first latents must also reconstruct the input on
    their own, at each width of matryoshka_fractions (nested dictionaries, against feature
    absorption); it runs as a batchtopk SAE. jumprelu (Rajamanoharan et al. 2024): a latent
    fires where its pre-activation exceeds its own learnt threshold; k is the L0 that training
    aims at (TrainConfig.l0_coefficient), and the L0 reached is measured, not fixed."""

    matryoshka_fractions: list[float] = dataclasses.field(
        default_factory=lambda: [0.125, 0.25, 0.5]
    )
    """matryoshka: the inner dictionaries' widths as fractions of the SAE's, increasing; the
    whole width is always the last level. Each level adds its reconstruction's FVU to the
    loss. Training only: what the SAE computes does not depend on it."""

    jumprelu_bandwidth: float = 0.05
    """jumprelu: width of the straight-through rectangle kernel of the thresholds' gradient.
    Only pre-activations within bandwidth / 2 of a threshold move it. In the units of the
    pre-activations (SAELens's default). Training only."""

    @property
    def thresholded(self) -> bool:
        """Whether the SAE selects by one learnt threshold at inference (batchtopk's rule)."""
        return self.activation in ("batchtopk", "matryoshka")

    @property
    def jumprelu(self) -> bool:
        """Whether each latent has its own learnt threshold (a `threshold` parameter, (M,))."""
        return self.activation == "jumprelu"

    def matryoshka_widths(self, num_latents: int) -> list[int]:
        """The inner levels' widths in latents (the whole width not included)."""
        if self.activation != "matryoshka":
            return []
        widths = sorted({max(1, round(f * num_latents)) for f in self.matryoshka_fractions})
        return [w for w in widths if w < num_latents]

    def resolve_num_latents(self, d_in: int) -> int:
        """Width of the SAE for an input of width d_in."""
        return self.num_latents if self.num_latents > 0 else d_in * self.expansion_factor

    def validate(self, d_in: int | None = None) -> None:
        if self.expansion_factor <= 0 and self.num_latents <= 0:
            raise ValueError(
                f"expansion_factor must be > 0 (got {self.expansion_factor}) "
                "unless num_latents is set"
            )
        if self.num_latents < 0:
            raise ValueError(f"num_latents must be >= 0 (got {self.num_latents})")
        if self.k <= 0:
            raise ValueError(f"k must be > 0 (got {self.k})")
        if self.activation not in ("topk", "batchtopk", "matryoshka", "jumprelu"):
            raise ValueError(
                "activation must be topk, batchtopk, matryoshka or jumprelu "
                f"(got {self.activation!r})"
            )
        if not (math.isfinite(self.jumprelu_bandwidth) and self.jumprelu_bandwidth > 0):
            raise ValueError(f"jumprelu_bandwidth must be > 0 (got {self.jumprelu_bandwidth})")
        f = list(self.matryoshka_fractions)
        if not all(a < b for a, b in zip([0.0, *f], [*f, 1.0])):
            raise ValueError(
                "matryoshka_fractions must increase within (0, 1), e.g. [0.125, 0.25, 0.5] "
                f"(got {self.matryoshka_fractions!r})"
            )
        if d_in is not None:
            if d_in <= 0:
                raise ValueError(f"d_in must be > 0 (got {d_in})")
            m = self.resolve_num_latents(d_in)
            if self.k > m:
                raise ValueError(
                    f"k={self.k} is larger than num_latents={m}: lower k or widen the SAE"
                )


@dataclass
class TrainConfig:
    """How to train one SAE on a matrix of activations."""

    lr: float | None = None
    """Peak Adam learning rate. Unset: 2e-4 / sqrt(num_latents / 2**14), as in sparsify."""

    batch_size: int = 4096
    """Activations per optimizer step."""

    auxk_alpha: float = 1.0
    """Weight of the AuxK loss that revives dead latents (0 turns it off). Gao et al. and
    sparsify use 1/32; on the ground-truth benchmark 1 (SAELens's) with a window of 20,000
    recovered more true features with every architecture (docs/performance.md)."""

    l0_coefficient: float = 1.0
    """jumprelu: weight of the sparsity loss (L0 / k - 1)^2 (L0: the batch's mean count).
    L0 is counted straight-through; the loss pulls it towards k from either side. Higher: an
    L0 closer to k, at some cost in reconstruction."""

    jumprelu_init_threshold: float | None = None
    """jumprelu: every latent's initial threshold. Unset: each latent's threshold starts where
    it fires on a third of the first batch (sae.trainer.JUMPRELU_INIT_FIRING), low, so the
    L0 loss raises it, as Rajamanoharan et al. start at 0.001, but in the data's units."""

    dead_feature_threshold: int = 20_000
    """A latent is dead once it has not fired for this many training activations; AuxK
    trains the dead ones. 20,000 is a fifth of an epoch of a 10^5-image CLS dataset. On the
    ground-truth benchmark it beat 100,000 (fewer latents left dead, more features found);
    sparsify's 10M counts text tokens and would never fire on a CLS dataset of 10^4..10^6."""

    normalize_input: bool = False
    """Scale the activations to a mean squared norm of d_in, folded back into the saved
    weights. The scale is estimated on training rows; the saved weights read raw activations,
    and layers whose norms differ share one lr range. On in sweeps."""

    encoder_init_norm: float = 0.1
    """Norm of each encoder row at the start: the decoder's unit row scaled down (the encoder
    starts as the decoder's transpose). Small rows let Adam turn them towards features in
    few steps, which left almost no latent dead at k = 16 on the ground-truth benchmark (MCC
    0.93 against 0.86 at nn.Linear's ~0.58, docs/performance.md)."""

    decoder_lr_scale: float = 10.0
    """The decoder rows' Adam learning rate as a multiple of lr. Adam moves each weight by
    about lr per step, so a unit-norm decoder row turns towards a feature ten times slower
    than an encoder row of norm 0.1; SAELens's decoder rows start at norm 0.1 (free, with
    activations rescaled by it) and turn that much faster until they grow. On SAELens's
    synthetic benchmark (benchmarks/bench_synthetic.py, k=8, 3 seeds) TopK's MCC at lr 3e-3,
    1e-2, 3e-2 went from 0.675, 0.712, 0.700 at 1 (below SAELens's 0.713, 0.724) to 0.721,
    0.730, 0.730 at 10; BatchTopK, Matryoshka and JumpReLU gained too. Training only."""

    b_dec_init: Literal["mean", "geometric_median"] = "mean"
    """Initial b_dec: the first batch's mean, or its geometric median (Gao et al.), which
    outlier rows and dimensions move less."""

    lr_warmup_steps: int = 100
    """Linear warmup steps from 0 to lr."""

    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warmup: constant, linear to 0 (sparsify's), or cosine to 0."""

    steps: int = 0
    """Optimizer steps to train. When 0, `epochs` decides."""

    epochs: float = 1.0
    """Passes over the training split, used when steps is 0."""

    diverged_fvu: float = 100.0
    """Training stops with DivergedError when the mean training FVU between two evaluations
    passes this (or the loss is NaN or infinite). FVU 1 is what b_dec alone
    scores; a run at lr 1e6 reached 10^12."""

    val_fraction: float = 0.05
    """Fraction of rows held out for validation when no validation set is given."""

    eval_every: int = 100
    """Steps between validation passes (each one calls the callback)."""

    checkpoint_every: int = 0
    """Steps between full-state checkpoints offered to the callback (0: at every eval)."""

    exact_topk: bool = False
    """Select latents from the fp32 encoder matmul on CPU too. Off: where bf16 matmuls are
    faster, a bf16 matmul picks 2k candidates per row that are then rescored in fp32 (the same
    latents in every case tested, about 1.8x faster per step)."""

    seed: int = 0
    """Seed of initialisation, split and shuffling."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: cuda when available under auto."""

    freeze_decoder: bool = False
    """Keep the decoder at its random start and train the rest: a control, what an encoder
    alone reaches with a dictionary that learned nothing."""

    cuda_graph: bool = True
    """On a GPU, capture the training step in one CUDA graph. After a few eager steps the whole
    step is captured and replayed, so the host only launches it; off, every step runs eagerly.
    Where capture fails, training goes on eagerly and says why once."""

    def validate(self) -> None:
        # (the field, whether its rule holds, what to do); the error shows the field's value
        checks = [
            (
                "lr",
                self.lr is None or (math.isfinite(self.lr) and self.lr > 0),
                "lr must be > 0",
            ),
            ("batch_size", self.batch_size > 0, "batch_size must be > 0"),
            (
                "auxk_alpha",
                self.auxk_alpha >= 0 and math.isfinite(self.auxk_alpha),
                "auxk_alpha must be >= 0",
            ),
            (
                "l0_coefficient",
                self.l0_coefficient >= 0 and math.isfinite(self.l0_coefficient),
                "l0_coefficient must be >= 0",
            ),
            (
                "jumprelu_init_threshold",
                self.jumprelu_init_threshold is None
                or (
                    math.isfinite(self.jumprelu_init_threshold)
                    and self.jumprelu_init_threshold >= 0
                ),
                "jumprelu_init_threshold must be >= 0 or unset",
            ),
            (
                "dead_feature_threshold",
                self.dead_feature_threshold > 0,
                "dead_feature_threshold must be > 0",
            ),
            (
                "encoder_init_norm",
                math.isfinite(self.encoder_init_norm) and self.encoder_init_norm > 0,
                "encoder_init_norm must be > 0",
            ),
            (
                "decoder_lr_scale",
                math.isfinite(self.decoder_lr_scale) and self.decoder_lr_scale > 0,
                "decoder_lr_scale must be > 0",
            ),
            (
                "b_dec_init",
                self.b_dec_init in ("mean", "geometric_median"),
                "b_dec_init must be mean or geometric_median",
            ),
            ("lr_warmup_steps", self.lr_warmup_steps >= 0, "lr_warmup_steps must be >= 0"),
            (
                "lr_schedule",
                self.lr_schedule in ("constant", "linear", "cosine"),
                "lr_schedule must be constant, linear or cosine",
            ),
            ("steps", self.steps >= 0, "steps must be >= 0"),
            ("epochs", math.isfinite(self.epochs) and self.epochs > 0, "epochs must be > 0"),
            (
                "diverged_fvu",
                self.diverged_fvu > 1,  # NaN fails too
                "diverged_fvu must be > 1 (FVU 1 is the mean's)",
            ),
            ("val_fraction", 0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
            ("eval_every", self.eval_every > 0, "eval_every must be > 0"),
            ("checkpoint_every", self.checkpoint_every >= 0, "checkpoint_every must be >= 0"),
            (
                "device",
                self.device in ("auto", "cpu", "cuda"),
                "device must be auto, cpu or cuda",
            ),
        ]
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"{message} (got {getattr(self, name)!r})")


def from_dict(cls, values: dict, where: str = ""):
    """Build a config dataclass from a dict (parsed YAML or JSON), checking every value against
    its field's annotation and naming unknown keys instead of ignoring them."""
    import typing

    where = where or cls.__name__
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"unknown {where} field(s): {', '.join(unknown)}; valid: {', '.join(sorted(names))}"
        )
    hints = typing.get_type_hints(cls)
    return cls(**{k: coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def coerce(value, hint, name: str):
    """`value` as the type `hint` (int, float, bool, str, Literal, list[...], X | None, Any).

    Numeric strings are accepted where a float is expected, since YAML reads `1e-3` as a
    string; nothing else is converted. Raises ValueError naming the field, type and value."""
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return coerce(value, option, name)
            except ValueError:
                pass
        raise ValueError(f"{name}: expected {_type_name(hint)}, got {value!r}")
    if origin is typing.Literal:
        if value in args and not (isinstance(value, bool) and True in args):
            return value
        raise ValueError(f"{name}: expected one of {', '.join(map(str, args))}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{name}: expected {_type_name(hint)}, got {value!r}")
        return [coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return value
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }
    if ok.get(hint):
        return float(value) if hint is float else value
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint not in ok:
        raise TypeError(f"{name}: no rule for the annotation {hint!r}")
    raise ValueError(f"{name}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint) -> str:
    import typing

    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if hint in names:
        return names[hint]
    if typing.get_origin(hint) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is list:
        plural = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0]) or _type_name(args[0])}"
    text = " or ".join(_type_name(a) for a in args)
    return text + " or null" if type(None) in typing.get_args(hint) else text


def field_help(cls) -> dict[str, str]:
    """Field docstrings of a config dataclass and of the dataclasses it extends, read from
    their modules' source: the CLI's help."""
    helps: dict[str, str] = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            helps |= _module_field_docs(base.__module__).get(base.__qualname__, {})
    return helps


@functools.cache
def _module_field_docs(module: str) -> dict[str, dict[str, str]]:
    # One parse per module: inspect.getsource(cls) parses the whole module for every class.
    import ast
    import inspect
    import sys

    docs = {}
    for node in ast.parse(inspect.getsource(sys.modules[module])).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs[node.name] = {}
        for field, nxt in zip(node.body, node.body[1:]):
            if (
                isinstance(field, ast.AnnAssign)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                fields[field.target.id] = " ".join(nxt.value.value.split())
    return docs


__all__ = ["SaeConfig", "TrainConfig", "coerce", "from_dict", "field_help"]
