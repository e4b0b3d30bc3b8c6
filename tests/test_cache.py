"""The node-local uncompressed copy of a cached layer, and training from it batch by batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae import SaeConfig, TrainConfig
from sae.trainer import Trainer
from sweeps.activations import cache

D = 8


def make_cache(root, tokens: int, n: int = 40, part_rows=((0, 10), (25, 40), (10, 25))):
    """A cache written as extraction does, its parts in the order Ray might finish them; part
    (25, 40) also holds its rows shuffled."""
    rng = np.random.default_rng(0)
    acts = rng.standard_normal((n, tokens, D)).astype(np.float16)
    run_dir = cache.start_run(root, "k")
    parts = []
    for lo, hi in part_rows:
        ids = np.arange(lo, hi)
        if lo == 25:
            ids = rng.permutation(ids)
        values = acts[ids] if tokens > 1 else acts[ids, 0]
        parts.append(cache.write_part(run_dir, ids, ids % 3, {2: values}))
    manifest = {
        "key": f"key-{tokens}",
        "layers": [2],
        "parts": sorted(parts),
        "d_model": D,
        "tokens_per_image": tokens,
        "dtype": "float16",
    }
    return cache.finish_run(run_dir, manifest)[0]


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("split", ["train", "val", "all"])
def test_layer_file_holds_the_rows_of_load_layer(tmp_path, tokens, split):
    cache_dir = make_cache(tmp_path / "cache", tokens)
    path = cache.layer_file(cache_dir, 2, split, 0.3, 1, root=tmp_path / "arrays")
    expected = cache.load_layer(cache_dir, 2, split, 0.3, 1)
    np.testing.assert_array_equal(np.load(path), expected)
    # the split stays by image: all tokens of an image on one side
    assert len(expected) % tokens == 0


def test_layer_file_is_written_once_and_refuses_unknown_layers(tmp_path):
    cache_dir = make_cache(tmp_path / "cache", 1)
    path = cache.layer_file(cache_dir, 2, root=tmp_path / "arrays")
    inode = path.stat().st_ino
    assert cache.layer_file(cache_dir, 2, root=tmp_path / "arrays").stat().st_ino == inode
    with pytest.raises(KeyError, match="layer 5 is not in cache"):
        cache.layer_file(cache_dir, 5, root=tmp_path / "arrays")


def test_layer_files_live_in_a_private_directory_never_another_users(tmp_path, monkeypatch):
    """The default was a shared /tmp folder reused as found: anyone on the machine could plant
    the activations trials read."""
    import os

    cache_dir = make_cache(tmp_path / "cache", 1)
    monkeypatch.delenv(cache.ARRAY_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    path = cache.layer_file(cache_dir, 2)
    assert path.parent.parent == tmp_path / "xdg" / "clip-sae-arrays"
    for directory in (path.parent, path.parent.parent):
        assert directory.stat().st_mode & 0o777 == 0o700
    if os.getuid() == 0:  # as CI runs: root can make a directory of another user
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 4242, 4242)
        with pytest.raises(PermissionError, match="belongs to another user"):
            cache.layer_file(cache_dir, 2, root=theirs)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="writable by others"):
        cache.layer_file(cache_dir, 2, root=shared)


def _peak_rise_kb(read) -> int:
    """How far this process's peak resident memory rose above its current size during read()."""

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak := current
    before = status("VmRSS")
    read()
    return status("VmHWM") - before


def test_row_file_returns_batches_and_holds_only_them(tmp_path):
    cache_dir = make_cache(tmp_path / "cache", 5)
    path = cache.layer_file(cache_dir, 2, "all", root=tmp_path / "arrays")
    rows = cache.RowFile(path)
    expected = np.load(path)
    assert rows.shape == expected.shape and len(rows) == 200 and rows.dtype == torch.float16
    index = torch.tensor([150, 3, 77, 3, 0, 1, 2])
    np.testing.assert_array_equal(rows[index].numpy(), expected[index.numpy()])
    np.testing.assert_array_equal(rows[10:20].numpy(), expected[10:20])
    with pytest.raises(IndexError, match="out of range"):
        rows[torch.tensor([200])]
    # 64 MB of rows on disk; a batch of 1,000 random rows (2 MB) may not map the file in
    big = cache.RowFile(write_rows(tmp_path / "big.npy", 1 << 22))
    batch = torch.from_numpy(np.random.default_rng(0).choice(1 << 22, 1000, replace=False))
    assert _peak_rise_kb(lambda: big[batch]) < 8 * 1024


def write_rows(path, n):
    a = np.lib.format.open_memmap(path, "w+", np.float16, (n, D))
    a[:] = 1
    a.flush()
    del a
    return path


def test_training_on_a_row_file_equals_training_in_memory(tmp_path):
    cache_dir = make_cache(tmp_path / "cache", 5)
    cfg = TrainConfig(batch_size=20, steps=12, eval_every=4, device="cpu", seed=3)
    sae_cfg = SaeConfig(num_latents=32, k=4)
    splits = [("train", 0.25, 0), ("val", 0.25, 0)]
    arrays = [cache.load_layer(cache_dir, 2, *s) for s in splits]
    files = [cache.RowFile(cache.layer_file(cache_dir, 2, *s, tmp_path)) for s in splits]
    ref = Trainer(arrays[0], sae_cfg, cfg, val_acts=arrays[1]).fit()
    got = Trainer(files[0], sae_cfg, cfg, val_acts=files[1]).fit()
    for name, tensor in ref.sae.state_dict().items():
        torch.testing.assert_close(got.sae.state_dict()[name], tensor, rtol=0, atol=0)
    assert got.metrics == ref.metrics


def test_a_trial_reads_its_cached_layer_from_the_node_copy(tmp_path, monkeypatch):
    from sweeps.search.data import CachedLayer, layer_arrays

    monkeypatch.setenv(cache.ARRAY_DIR_ENV, str(tmp_path / "node"))
    cache_dir = make_cache(tmp_path / "cache", 5)
    train, val = layer_arrays(CachedLayer(str(cache_dir), 2, 0.25, 0))
    assert isinstance(train, cache.RowFile) and train.path.parent.parent == tmp_path / "node"
    for rows, split in ((train, "train"), (val, "val")):
        expected = cache.load_layer(cache_dir, 2, split, 0.25, 0)
        np.testing.assert_array_equal(rows[torch.arange(len(rows))].numpy(), expected)
