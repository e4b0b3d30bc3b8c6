"""Checkpoints: exact round trip, and EleutherAI sparsify loads ours unchanged."""

import json

import pytest
import torch
from safetensors import safe_open

from sae import SaeConfig, TopKSae


def _trained_like_sae():
    torch.manual_seed(0)
    sae = TopKSae(16, SaeConfig(expansion_factor=4, k=5))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def test_save_writes_sparsify_layout_and_load_is_exact(tmp_path):
    sae = _trained_like_sae()
    sae.save(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "cfg.json").read_text())
    assert cfg["d_in"] == 16 and cfg["k"] == 5 and cfg["expansion_factor"] == 4
    with safe_open(str(tmp_path / "ckpt" / "sae.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes == {
        "encoder.weight": (64, 16),
        "encoder.bias": (64,),
        "W_dec": (64, 16),
        "b_dec": (16,),
    }
    loaded = TopKSae.load(tmp_path / "ckpt")
    for (name, a), (_, b) in zip(sae.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(8, 16)
    assert torch.equal(sae(x).sae_out, loaded(x).sae_out)


def test_load_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json is missing"):
        TopKSae.load(tmp_path)


def test_sparsify_loads_our_checkpoint_with_same_latents_and_reconstruction(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is in the dev extra")
    sae = _trained_like_sae()
    sae.save(tmp_path / "ckpt")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "ckpt")
    x = torch.randn(32, 16)
    ours = sae(x)
    out = theirs(x)
    torch.testing.assert_close(out.sae_out, ours.sae_out)
    order_ours = ours.latent_indices.sort(dim=1)
    order_theirs = out.latent_indices.sort(dim=1)
    assert torch.equal(order_ours.values, order_theirs.values)
    torch.testing.assert_close(
        ours.latent_acts.gather(1, order_ours.indices),
        out.latent_acts.gather(1, order_theirs.indices),
    )


@pytest.mark.parametrize("option, what", [("transcode", "transcoder"), ("skip_connection", "skip")])
def test_sparsify_transcoder_or_skip_connection_is_refused(tmp_path, option, what):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is in the dev extra")
    cfg = sparsify.SparseCoderConfig(num_latents=32, k=4, **{option: True})
    sparsify.SparseCoder(8, cfg).save_to_disk(tmp_path / "coder")
    with pytest.raises(ValueError, match=f"{what}.*{option}: true.*sparsify"):
        TopKSae.load(tmp_path / "coder")


def test_batchtopk_checkpoint_holds_its_threshold(tmp_path):
    torch.manual_seed(0)
    sae = TopKSae(16, SaeConfig(expansion_factor=4, k=5, activation="batchtopk"))
    sae.threshold.fill_(0.25)
    sae.save(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "cfg.json").read_text())["activation"] == "batchtopk"
    with safe_open(str(tmp_path / "ckpt" / "sae.safetensors"), "pt") as f:
        assert set(f.keys()) == {"encoder.weight", "encoder.bias", "W_dec", "b_dec", "threshold"}
    loaded = TopKSae.load(tmp_path / "ckpt")
    assert loaded.threshold.item() == 0.25
    x = torch.randn(8, 16)
    assert torch.equal(sae(x).sae_out, loaded(x).sae_out)


@pytest.mark.parametrize("key", ["k", "d_in", "activation", "width"])
def test_a_cfg_json_without_a_field_the_sae_depends_on_is_refused(tmp_path, key):
    """A cfg.json without k once loaded silently with k=32: another SAE than the one saved."""
    _trained_like_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    for dropped in ("num_latents", "expansion_factor") if key == "width" else (key,):
        cfg.pop(dropped)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    want = "num_latents" if key == "width" else key
    with pytest.raises(ValueError, match=f"cfg.json lacks {want}"):
        TopKSae.load(tmp_path)


def test_weights_that_do_not_match_cfg_json_are_refused_with_the_tensor(tmp_path):
    _trained_like_sae().save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "num_latents": 32}))
    with pytest.raises(
        ValueError, match=r"does not match .*W_dec \(64, 16\) \(want \(32, 16\)\)"
    ) as e:
        TopKSae.load(tmp_path)
    # only the tensors that differ: b_dec (16,) fits both widths
    assert "encoder.bias (64,) (want (32,))" in str(e.value) and "b_dec" not in str(e.value)


def test_weights_without_a_tensor_are_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _trained_like_sae().save(tmp_path)
    tensors = load_file(str(tmp_path / "sae.safetensors"))
    del tensors["W_dec"]
    save_file(tensors, str(tmp_path / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"W_dec missing \(want \(64, 16\)\)"):
        TopKSae.load(tmp_path)


@pytest.mark.parametrize("damage", ["truncated weights", "cfg not json", "k above width"])
def test_a_damaged_checkpoint_is_a_clear_error_naming_the_file(tmp_path, damage):
    _trained_like_sae().save(tmp_path)
    weights, cfg_path = tmp_path / "sae.safetensors", tmp_path / "cfg.json"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
        culprit = weights
    elif damage == "cfg not json":
        cfg_path.write_text("{k: 5")
        culprit = cfg_path
    else:
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "k": 1000}))
        culprit = cfg_path
    with pytest.raises(ValueError, match=str(culprit)):
        TopKSae.load(tmp_path)
