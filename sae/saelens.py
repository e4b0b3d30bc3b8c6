"""SAELens's own checkpoint layout for a TopKSae, written beside sparsify's in one folder.

SAELens's default disk loader (`sae_lens.SAE.load_from_disk(folder)`) reads `cfg.json` and
`sae_weights.safetensors` holding W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in] and
b_dec [d_in]. Its "topk" architecture computes relu(topk((x - b_dec) @ W_enc + b_enc)) @ W_dec
+ b_dec, which is this TopKSae with W_enc = encoder.weight transposed. One cfg.json carries
SAELens's fields and ours; each loader (ours, sparsify's, SAELens's) ignores the others' keys,
so the folder loads in all three.

A BatchTopK SAE is saved as SAELens saves its own after training: architecture "jumprelu",
with our scalar inference threshold repeated per latent as `threshold` [d_sae]. SAELens's
JumpReLU keeps relu(pre) where pre > threshold, which is our inference rule. A JumpReLU SAE
is that architecture as it is, its `threshold` [d_sae] written unchanged. sparsify has none of
these: our `sae.safetensors` then holds `threshold` beside sparsify's tensors.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .model import TopKSae

WEIGHTS_FILE = "sae_weights.safetensors"

#: The SAELens config format written: from 6.0 on, model and hook sit under "metadata", and a
#: cfg.json without a version >= 6 is read through SAELens's converter for older files.
FORMAT_VERSION = "6.0.0"

# SaeConfig fields that the SAELens config expresses (the others change nothing at inference,
# or, when set away from their defaults, something SAELens's "topk" SAE cannot represent).
_EXPRESSED = {"expansion_factor", "num_latents", "k", "normalize_decoder", "activation"}
_EXPRESSED |= {"matryoshka_fractions", "jumprelu_bandwidth"}  # training only
_TENSORS = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}


def save_saelens(
    sae: TopKSae, directory: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write `sae` in sparsify's layout (`TopKSae.save`) plus SAELens's weights and config.

    `metadata` goes to SAELens's `metadata` section: model_name, hook_name and other keys
    SAELens knows (any key is kept)."""
    _check_expressible(sae)
    directory = sae.save(directory)
    tensors = {
        "W_enc": sae.encoder.weight.T,
        "b_enc": sae.encoder.bias,
        "W_dec": sae.W_dec,
        "b_dec": sae.b_dec,
    }
    jumprelu = sae.architecture.saelens == "jumprelu"  # batchtopk, matryoshka: as a JumpReLU
    if jumprelu:
        tensors["threshold"] = sae.threshold.expand(sae.num_latents)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(directory / WEIGHTS_FILE),
    )
    cfg = json.loads((directory / "cfg.json").read_text())
    cfg |= {
        "architecture": sae.architecture.saelens,
        "d_in": sae.d_in,
        "d_sae": sae.num_latents,
        "k": sae.cfg.k,
        "dtype": str(sae.W_dec.dtype).removeprefix("torch."),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        "metadata": {
            "sae_lens_version": FORMAT_VERSION,
            "sae_lens_training_version": None,
            **(metadata or {}),
        },
    }
    (directory / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return directory


def _check_expressible(sae: TopKSae) -> None:
    allowed = _TENSORS | ({"threshold"} if sae.architecture.saelens == "jumprelu" else set())
    extra = sorted(set(sae.state_dict()) - allowed)
    changed = [
        f"{f.name}={getattr(sae.cfg, f.name)!r}"
        for f in dataclasses.fields(sae.cfg)
        if f.name not in _EXPRESSED and getattr(sae.cfg, f.name) != f.default
    ]
    if extra or changed:
        raise ValueError(
            "SAELens's topk and jumprelu SAEs cannot express this SAE "
            f"({', '.join(changed + [f'tensor {t}' for t in extra])}): export it in sparsify's "
            "layout only (TopKSae.save)"
        )
