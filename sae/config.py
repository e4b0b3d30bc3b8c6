"""Configs of the SAE and of its training: dataclasses that pydantic reads (`from_dict`). Each
field's docstring is its help text."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import typing
from dataclasses import dataclass
from typing import Annotated, Literal

from annotated_types import Ge, Gt, Lt
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    TypeAdapter,
    ValidationError,
    with_config,
)
from pydantic_core import PydanticCustomError

from sae import architectures

#: How pydantic reads a config: unknown keys are errors, each field's docstring is its
#: description, and the types are JSON's, exactly (no "3" for 3, no true for 1): `from_dict`.
CONFIG = ConfigDict(extra="forbid", strict=True, use_attribute_docstrings=True, allow_inf_nan=False)


def _number(value):
    """YAML 1.1 reads 1e-3 (no dot) as a string: where a number is expected, it is one."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    return value


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the field and the fix."""


def rule(ok, fix: str) -> AfterValidator:
    """A field's own check, run by pydantic after its type's: a value failing ok(value) is
    refused as "field (got value): fix" (`from_dict`)."""

    def check(value):
        if not ok(value):
            raise PydanticCustomError("rule", "{fix}", {"fix": fix})
        return value

    return AfterValidator(check)


#: Seeds reach numpy's and Optuna's generators, which take 0 .. 2**32 - 1.
SEED_MAX = 2**32 - 1

#: A float field: a finite number (CONFIG), or a string that reads as one.
Float = Annotated[float, BeforeValidator(_number)]

#: An integer that fits what consumes it: numpy's, torch's and Arrow's 64-bit integers (a seed
#: of 2**64 once failed after Ray started).
Int = Annotated[int, rule(lambda v: abs(v) < 2**63, "use a number below 2**63")]

#: Bounded numbers, checked by pydantic with the types (`from_dict`).
Seed = Annotated[int, rule(lambda v: 0 <= v <= SEED_MAX, f"use a seed in 0..{SEED_MAX}")]
PositiveInt = Annotated[Int, Gt(0)]
Count = Annotated[Int, Ge(0)]
PositiveFloat = Annotated[Float, Gt(0)]
NonNegativeFloat = Annotated[Float, Ge(0)]


@with_config(CONFIG)
@dataclass
class SaeConfig:
    """Shape of a TopK sparse autoencoder (the fields of sparsify's `cfg.json`)."""

    expansion_factor: Int = 8
    """Number of latents as a multiple of the input width d_in."""

    num_latents: Count = 0
    """Number of latents. When > 0 it overrides expansion_factor."""

    k: PositiveInt = 32
    """Number of latents kept active per input (TopK)."""

    normalize_decoder: bool = True
    """Keep every decoder row at unit norm during training."""

    activation: Annotated[str, AfterValidator(lambda v: architectures.get(v).name)] = "topk"
    """The architecture: topk, batchtopk, matryoshka, jumprelu, or one a package registers
    (sae/architectures/__init__.py). topk: the k largest latents of each input (sparsify's).
    batchtopk (Bussmann et al. 2024): the k * B largest over a training batch of B inputs,
    so inputs share the budget; at inference a latent fires above a threshold estimated
    during training. matryoshka (Bussmann et al. 2025): batchtopk whose first latents must
    also reconstruct the input on their own, at each width of matryoshka_fractions (nested
    dictionaries, against feature absorption); it runs as a batchtopk SAE. jumprelu
    (Rajamanoharan et al. 2024): a latent fires where its pre-activation exceeds its own
    learnt threshold; k is the L0 that training aims at (TrainConfig.l0_coefficient), and
    the L0 reached is measured, not fixed."""

    matryoshka_fractions: Annotated[
        list[Float],
        rule(
            lambda f: all(a < b for a, b in zip([0.0, *f], [*f, 1.0])),
            "use fractions that increase within (0, 1), e.g. [0.125, 0.25, 0.5]",
        ),
    ] = dataclasses.field(default_factory=lambda: [0.125, 0.25, 0.5])
    """matryoshka: the inner dictionaries' widths as fractions of the SAE's, increasing; the
    whole width is always the last level. Each level adds its reconstruction's FVU to the
    loss. Training only: what the SAE computes does not depend on it."""

    jumprelu_bandwidth: PositiveFloat = 0.05
    """jumprelu: width of the straight-through rectangle kernel of the thresholds' gradient.
    Only pre-activations within bandwidth / 2 of a threshold move it. In the units of the
    pre-activations (SAELens's default). Training only."""

    def resolve_num_latents(self, d_in: int) -> int:
        """Width of the SAE for an input of width d_in."""
        return self.num_latents if self.num_latents > 0 else d_in * self.expansion_factor

    def validate(self, d_in: int | None = None) -> None:
        from_dict(type(self), dataclasses.asdict(self), where="")  # types, bounds, rules
        if self.expansion_factor <= 0 and self.num_latents <= 0:
            raise ValueError(
                f"expansion_factor must be > 0 (got {self.expansion_factor}) "
                "unless num_latents is set"
            )
        if d_in is not None:
            if d_in <= 0:
                raise ValueError(f"d_in must be > 0 (got {d_in})")
            m = self.resolve_num_latents(d_in)
            if self.k > m:
                raise ValueError(
                    f"k={self.k} is larger than num_latents={m}: lower k or widen the SAE"
                )


@with_config(CONFIG)
@dataclass
class TrainConfig:
    """How to train one SAE on a matrix of activations."""

    lr: PositiveFloat | None = None
    """Peak Adam learning rate. Unset: 2e-4 / sqrt(num_latents / 2**14), as in sparsify."""

    batch_size: PositiveInt = 4096
    """Activations per optimizer step."""

    auxk_alpha: NonNegativeFloat = 1.0
    """Weight of the AuxK loss that revives dead latents (0 turns it off). Gao et al. and
    sparsify use 1/32; on the ground-truth benchmark 1 (SAELens's) with a window of 20,000
    recovered more true features with every architecture (docs/performance.md)."""

    l0_coefficient: NonNegativeFloat = 1.0
    """jumprelu: weight of the sparsity loss (L0 / k - 1)^2 (L0: the batch's mean count).
    L0 is counted straight-through; the loss pulls it towards k from either side. Higher: an
    L0 closer to k, at some cost in reconstruction."""

    jumprelu_init_threshold: NonNegativeFloat | None = None
    """jumprelu: every latent's initial threshold. Unset: each latent's threshold starts where
    it fires on a third of the first batch (sae.architectures.jumprelu.INIT_FIRING), low, so
    the L0 loss raises it, as Rajamanoharan et al. start at 0.001, but in the data's units."""

    dead_feature_threshold: PositiveInt = 20_000
    """A latent is dead once it has not fired for this many training activations; AuxK
    trains the dead ones. 20,000 is a fifth of an epoch of a 10^5-image CLS dataset. On the
    ground-truth benchmark it beat 100,000 (fewer latents left dead, more features found);
    sparsify's 10M counts text tokens and would never fire on a CLS dataset of 10^4..10^6."""

    normalize_input: bool = False
    """Scale the activations to a mean squared norm of d_in, folded back into the saved
    weights. The scale is estimated on training rows; the saved weights read raw activations,
    and layers whose norms differ share one lr range. On in sweeps."""

    encoder_init_norm: PositiveFloat = 0.1
    """Norm of each encoder row at the start: the decoder's unit row scaled down (the encoder
    starts as the decoder's transpose). Small rows let Adam turn them towards features in
    few steps, which left almost no latent dead at k = 16 on the ground-truth benchmark (MCC
    0.93 against 0.86 at nn.Linear's ~0.58, docs/performance.md)."""

    decoder_lr_scale: PositiveFloat = 10.0
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

    lr_warmup_steps: Count = 100
    """Linear warmup steps from 0 to lr."""

    lr_schedule: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warmup: constant, linear to 0 (sparsify's), or cosine to 0."""

    steps: Count = 0
    """Optimizer steps to train. When 0, `epochs` decides."""

    epochs: PositiveFloat = 1.0
    """Passes over the training split, used when steps is 0."""

    diverged_fvu: Annotated[Float, Gt(1)] = 100.0
    """Training stops with DivergedError when the mean training FVU between two evaluations
    passes this (or the loss is NaN or infinite). FVU 1 is what b_dec alone
    scores; a run at lr 1e6 reached 10^12."""

    val_fraction: Annotated[Float, Ge(0), Lt(1)] = 0.05
    """Fraction of rows held out for validation when no validation set is given."""

    eval_every: PositiveInt = 100
    """Steps between validation passes (each one calls the callback)."""

    checkpoint_every: Count = 0
    """Steps between full-state checkpoints offered to the callback (0: at every eval)."""

    exact_topk: bool = False
    """Select latents from the fp32 encoder matmul on CPU too. Off: where bf16 matmuls are
    faster, a bf16 matmul picks 2k candidates per row that are then rescored in fp32 (the same
    latents in every case tested, about 1.8x faster per step)."""

    seed: Seed = 0
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
        """Types, choices and bounds as the annotations give them."""
        from_dict(type(self), dataclasses.asdict(self), where="")


def from_dict(cls, values: dict, where: str | None = None):
    """A config dataclass (CONFIG) from a dict of parsed YAML or JSON, nested sections too,
    checked by pydantic against the annotations. Every error is one ValueError line naming the
    field (`where.field`; where: the class's name by default); unknown keys list the valid ones.
    """
    # As JSON: strict Python validation would take only dataclass instances, not mappings.
    try:
        return _adapter(cls).validate_json(json.dumps(values, default=str))
    except ValidationError as e:
        where = cls.__name__ if where is None else where
        raise ConfigError(_one_line(cls, e.errors(), where)) from None


_adapter = functools.cache(TypeAdapter)

#: How the errors name what pydantic expected, by its error types.
EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}
EXPECTED |= {"string_type": "a string", "dict_type": "a mapping", "dataclass_type": "a mapping"}
PLURAL = {int: "integers", float: "numbers", str: "strings", dict: "mappings"}
FIXES = {"finite_number": "use a finite number"}
BOUNDS = {
    "greater_than": ">",
    "greater_than_equal": ">=",
    "less_than": "<",
    "less_than_equal": "<=",
}


def _one_line(cls, errors: list[dict], where: str) -> str:
    unknown = [e["loc"] for e in errors if e["type"] == "unexpected_keyword_argument"]
    if unknown:
        *section, _ = unknown[0]
        names = sorted(str(loc[-1]) for loc in unknown if list(loc[:-1]) == section)
        valid = sorted(f.name for f in dataclasses.fields(_field_type(cls, section)))
        what = [where, *section][-1]
        return f"unknown {what} field(s): {', '.join(names)}; valid: {', '.join(valid)}"
    error, name = errors[0], where
    for key in error["loc"]:
        name += f"[{key}]" if isinstance(key, int) else f".{key}" if name else key
    expected = EXPECTED.get(error["type"])
    if error["type"] == "list_type":
        expected = "a list of " + PLURAL[typing.get_args(_field_type(cls, error["loc"]))[0]]
    if error["type"] == "literal_error":
        expected = "one of " + error["ctx"]["expected"].replace("'", "").replace(" or ", ", ")
    if expected:
        return f"{name}: expected {expected}, got {error['input']!r}"
    if error["type"] in BOUNDS:
        (bound,) = error["ctx"].values()
        return f"{name} must be {BOUNDS[error['type']]} {bound} (got {error['input']!r})"
    if error["type"] == "value_error":  # a validator's own one-line message
        return str(error["ctx"]["error"])
    fix = error["msg"] if error["type"] == "rule" else FIXES.get(error["type"])
    if fix:
        return f"{name} (got {error['input']!r}): {fix}"
    return f"{name}: {error['msg']} (got {error['input']!r})"


def _field_type(cls, path) -> type:
    """The annotation of the field at `path` (names of nested fields) in dataclass cls."""
    for key in path:
        cls = typing.get_type_hints(cls)[key]
    return cls


@functools.cache
def field_help(cls) -> dict[str, str]:
    """{field: its docstring on one line} of a config dataclass (CONFIG) and of the dataclasses
    it extends, as pydantic's schema has them (use_attribute_docstrings): the CLI's help."""
    helps = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        props = _adapter(base).json_schema()["properties"]
        helps |= {
            k: " ".join(v["description"].split()) for k, v in props.items() if "description" in v
        }
    return helps
