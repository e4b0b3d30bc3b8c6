"""The extraction pipeline and its cache, end to end on a tiny CLIP and generated images."""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import (
    make_bad_images,
    make_hf_dataset,
    make_image_folder,
    make_parquet,
    make_tiny_clip,
    random_image,
)
from PIL import Image

from sweeps.activations import cache
from sweeps.activations.clip import Preprocessing, load_vision_model
from sweeps.activations.extract import (
    ExtractResult,
    absolute_paths,
    extract,
    locate_cache,
    runs_here,
)
from sweeps.cli import describe_extract
from sweeps.config import ConfigError, from_mapping, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"), num_layers=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("folder"), n=24)


@pytest.fixture(scope="module")
def built(ray_session, tiny, folder, tmp_path_factory):
    """The folder's cache in each token mode, built once for the tests that read it."""
    cache_root = tmp_path_factory.mktemp("cache")
    return {mode: run(config(tiny, folder, cache_root, token_mode=mode)) for mode in ("cls", "all")}


def config(tiny, path, cache_dir, source="folder", **extract):
    sections = {
        "model": {"name_or_path": tiny},
        "data": {"source": source, "path": str(path)},
        "extract": {
            "layers": [0, 2],
            "cache_dir": str(cache_dir),
            "batch_size": 8,
            "rows_per_task": 7,
            **extract,
        },
    }
    return sections


def run(sections) -> ExtractResult:
    return extract(from_mapping(sections))


def reference_acts(tiny, images, layers, token_mode):
    """HF processor, then the full model with output_hidden_states: the plain way."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil.from_pretrained(tiny)
    model = load_vision_model(tiny)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hidden = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    return {
        layer: (hidden[layer + 1][:, 0] if token_mode == "cls" else hidden[layer + 1]).numpy()
        for layer in layers
    }


@pytest.mark.parametrize("token_mode", ["cls", "all"])
def test_cache_equals_direct_forward(built, tiny, folder, token_mode):
    result = built[token_mode]
    paths = sorted(p for p in Path(folder).rglob("*.png"))
    want = reference_acts(tiny, [Image.open(p) for p in paths], [0, 2], token_mode)
    assert cache.load_row_ids(result.cache_dir, split="all").tolist() == list(range(len(paths)))
    for layer, acts in want.items():
        got = cache.load_layer(result.cache_dir, layer, split="all")
        assert got.dtype == np.float16
        np.testing.assert_allclose(got, acts.reshape(-1, acts.shape[-1]), rtol=2e-3, atol=2e-3)
    tokens = 1 if token_mode == "cls" else 17
    assert result.manifest["tokens_per_image"] == tokens
    assert cache.load_layer(result.cache_dir, 2, split="all").shape == (24 * tokens, 32)


def test_cache_contract_with_plain_pyarrow_and_noop_rerun(built, tiny, folder, capsys):
    result = built["cls"]
    parts = sorted(glob.glob(str(result.cache_dir / "part-*.parquet")))
    table = pa.concat_tables([pq.read_table(p) for p in parts]).sort_by("row_id")
    assert table.schema.field("row_id").type == pa.int64()
    assert table.schema.field("label").type == pa.int64()
    layer = table.schema.field("layer_2").type
    assert isinstance(layer, pa.FixedShapeTensorType)
    assert layer.value_type == pa.float16() and list(layer.shape) == [32]
    assert table["layer_0"].combine_chunks().to_numpy_ndarray().shape == (24, 32)
    assert table["label"].to_pylist() == [0] * 12 + [1] * 12  # cat/*, then dog/*

    manifest = json.loads((result.cache_dir / "manifest.json").read_text())
    assert manifest["rows"] == 24 and manifest["skipped"] == {} and manifest["d_model"] == 32
    assert manifest["label_names"] == ["cat", "dog"] and manifest["layers"] == [0, 2]
    capsys.readouterr()

    again = run(config(tiny, folder, result.cache_dir.parent))
    assert again.reused and again.cache_dir == result.cache_dir
    assert capsys.readouterr().out == ""  # the library returns; the CLI prints
    assert describe_extract(again).startswith("extract: cache hit, no work done: 24 images")
    assert len(os.listdir(result.cache_dir.parent)) == 2  # cls and all: nothing new


def test_a_cache_hit_loads_no_model_library_and_no_ray(built, tiny, folder):
    """The key hashes the model's files, not what transformers makes of them: a hit needs
    no torch or transformers, and the manifest says how the images were preprocessed."""
    sections = config(tiny, folder, built["cls"].cache_dir.parent)
    code = (
        "import json, sys; from sweeps.config import from_mapping; "
        "from sweeps.activations.extract import extract; "
        f"r = extract(from_mapping(json.loads({json.dumps(sections)!r}))); "
        "print(r.reused, *(m in sys.modules for m in ('torch', 'transformers', 'ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == ["True", "False", "False", "False"], out.stderr
    assert Preprocessing.from_json(built["cls"].manifest["preprocessing"]) == (
        Preprocessing.from_pretrained(tiny)
    )


def test_the_models_preprocessor_config_is_in_the_key(built, tiny, folder, tmp_path):
    changed = shutil.copytree(tiny, tmp_path / "clip")
    processor = json.loads(Path(changed, "preprocessor_config.json").read_text())
    processor["image_mean"] = [0.5, 0.5, 0.5]
    Path(changed, "preprocessor_config.json").write_text(json.dumps(processor))
    cache_root = built["cls"].cache_dir.parent
    *_, key, found = locate_cache(
        absolute_paths(from_mapping(config(str(changed), folder, cache_root)))
    )
    assert found is None and key != built["cls"].manifest["key"]


def test_in_process_and_ray_data_write_the_same_bytes(ray_session, built, tiny, tmp_path):
    # `built` ran in this process (one local node, no GPU); Ray Data must write the same parts.
    assert built["cls"].manifest["run"]["nodes"] == [socket.gethostname()]
    sections = config(tiny, Path(built["cls"].manifest["inputs"]["data"]["path"]), tmp_path)
    ray_data = extract(from_mapping(sections), in_process=False)
    here, there = built["cls"].cache_dir, ray_data.cache_dir
    assert there.name == here.name  # the same key
    assert ray_data.manifest["run"]["nodes"] == [ray_session.get_runtime_context().get_node_id()]
    # no GPU: every image decoded on CPUs, in both
    rows = built["cls"].manifest["rows"]
    assert ray_data.manifest["run"]["cpu_decoded"] == built["cls"].manifest["run"]["cpu_decoded"]
    assert built["cls"].manifest["run"]["cpu_decoded"] == rows
    parts = ray_data.manifest["parts"]
    assert parts == built["cls"].manifest["parts"] and len(parts) == 3  # batches of 8
    for part in parts:
        assert (here / part).read_bytes() == (there / part).read_bytes(), part
    drop_run = [
        {k: v for k, v in r.manifest.items() if k != "run"} for r in (built["cls"], ray_data)
    ]
    assert drop_run[0] == drop_run[1]


def test_runs_here_only_on_one_local_node_without_gpus(ray_session, tiny, folder):
    cfg = from_mapping(config(tiny, folder, "/unused"))
    assert runs_here(cfg)  # the session's local instance: one node, CPUs, no GPU
    gpu = from_mapping(config(tiny, folder, "/unused", num_gpus_per_actor=1))
    assert not runs_here(gpu)


def test_train_val_split_is_deterministic_and_by_image(built):
    cache_dir = built["all"].cache_dir
    train = cache.load_row_ids(cache_dir, "train", val_fraction=0.3, seed=1)
    val = cache.load_row_ids(cache_dir, "val", val_fraction=0.3, seed=1)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(24))
    assert 0 < len(val) < 24
    assert np.array_equal(val, cache.load_row_ids(cache_dir, "val", val_fraction=0.3, seed=1))
    acts = cache.load_layer(cache_dir, 0, "val", val_fraction=0.3, seed=1)
    assert acts.shape == (len(val) * 17, 32)  # every token of a validation image
    assert len(cache.load_labels(cache_dir, "val", val_fraction=0.3, seed=1)) == len(val)


def test_hf_dataset_source_with_limit(ray_session, tiny, tmp_path):
    path = make_hf_dataset(tmp_path / "hf", n=30)
    sections = config(tiny, path, tmp_path / "cache", source="hf")
    sections["data"]["limit"] = 10
    result = run(sections)
    assert cache.load_row_ids(result.cache_dir, "all").tolist() == list(range(10))
    assert cache.load_labels(result.cache_dir, "all").tolist() == [i % 3 for i in range(10)]
    assert result.manifest["label_names"] == ["a", "b", "c"]


def test_parquet_source_rows_across_row_groups(ray_session, tiny, tmp_path):
    path = make_parquet(tmp_path / "data.parquet", n=23, rows_per_group=5)
    sections = config(tiny, path, tmp_path / "cache", source="parquet")
    sections["data"].update(image_column="img", label_column="y", fraction=0.6)
    result = run(sections)
    row_ids = cache.load_row_ids(result.cache_dir, "all")
    assert row_ids.tolist() == np.flatnonzero(cache.unit_hash(np.arange(23)) < 0.6).tolist()
    assert cache.load_labels(result.cache_dir, "all").tolist() == (row_ids % 4).tolist()
    images = pq.read_table(path)["img"].to_pylist()
    want = reference_acts(tiny, [Image.open(io.BytesIO(images[i])) for i in row_ids], [2], "cls")
    got = cache.load_layer(result.cache_dir, 2, "all")
    np.testing.assert_allclose(got, want[2], rtol=2e-3, atol=2e-3)


def test_bad_images_are_counted_and_good_rows_kept(ray_session, tiny, tmp_path):
    root = tmp_path / "images"
    make_image_folder(root / "good", n=20)
    expected = make_bad_images(root / "bad")
    sections = config(tiny, root, tmp_path / "cache", max_bad_fraction=0.2)
    result = run(sections)
    reasons = [r for r in expected.values() if r]
    assert result.manifest["skipped"] == {r: reasons.count(r) for r in reasons}
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    kept = {str(paths[i].relative_to(root)) for i in cache.load_row_ids(result.cache_dir, "all")}
    want = {f"good/{p.relative_to(root / 'good')}" for p in (root / "good").rglob("*.png")}
    want |= {f"bad/{name}" for name, reason in expected.items() if reason is None}
    assert kept == want
    acts = cache.load_layer(result.cache_dir, 0, "all")
    assert np.isfinite(acts).all() and len(acts) == len(want)


def test_decoding_in_processes_gives_what_one_process_gives(tmp_path):
    """The CPU decoder's worker processes: the same pixels and reasons, row for row, on
    every awkward file."""
    from sweeps.activations.sources import decode_batch
    from sweeps.config import DataConfig

    make_bad_images(tmp_path, huge_side=2000)
    names = sorted(p.name for p in tmp_path.iterdir())
    index = {
        "row_id": np.arange(len(names)),
        "path": np.array([str(tmp_path / n) for n in names], object),
        "label": np.full(len(names), -1),
    }
    args = (index, DataConfig(source="folder", path=str(tmp_path)), Preprocessing(), 10**8)
    one, three = decode_batch(*args), decode_batch(*args, processes=3)
    assert list(three["reason"]) == list(one["reason"])
    np.testing.assert_array_equal(three["pixels"], one["pixels"])


def test_decoding_on_a_device_where_there_is_none_is_refused(tiny, folder, tmp_path):
    with pytest.raises(ValueError, match="extract.decode=device: extraction runs in this"):
        extract(from_mapping(config(tiny, folder, tmp_path / "cache", decode="device")))
    assert not (tmp_path / "cache").exists()  # refused before anything was written


def test_too_many_bad_images_fail_clearly_and_leave_nothing(ray_session, tiny, tmp_path):
    root = tmp_path / "images"
    make_image_folder(root / "good", n=6)
    make_bad_images(root / "bad", huge_side=100)
    with pytest.raises(ValueError, match="max_bad_fraction"):
        run(config(tiny, root, tmp_path / "cache", max_bad_fraction=0.05))
    assert os.listdir(tmp_path / "cache") == []


def test_non_finite_activations_name_the_rows(ray_session, tmp_path):
    path = make_tiny_clip(tmp_path / "nan", num_layers=2)
    model = load_vision_model(path)
    with torch.no_grad():
        model.encoder.layers[1].mlp.fc2.bias.fill_(float("inf"))
    model.save_pretrained(path)
    folder = make_image_folder(tmp_path / "images", n=5)
    with pytest.raises(FloatingPointError, match=r"row ids \[0, 1, 2, 3, 4\]"):
        run(config(path, folder, tmp_path / "cache", layers=[1]))


def test_killed_run_then_rerun_gives_a_complete_cache(ray_session, tiny, tmp_path):
    # one slow-to-decode JPEG, copied: the run takes seconds, so it dies mid-way
    root = tmp_path / "images"
    root.mkdir()
    random_image(np.random.default_rng(0), 1500, 2000).save(root / "0000.jpg", quality=95)
    for i in range(1, 60):
        shutil.copy(root / "0000.jpg", root / f"{i:04d}.jpg")
    cache_root = tmp_path / "cache"
    sections = config(tiny, root, cache_root, batch_size=2, rows_per_task=2)
    (tmp_path / "cfg.json").write_text(json.dumps(sections))  # JSON is YAML
    address = ray_session.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [
            sys.executable,
            "run_sweep.py",
            "extract",
            "--config",
            str(tmp_path / "cfg.json"),
            "--address",
            address,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 900  # a hang guard; the condition is what we wait on
    while not glob.glob(str(cache_root / ".tmp-*" / "part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "extract never wrote a part"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not glob.glob(str(cache_root / "*" / "manifest.json")), "killed run looks complete"

    result = run(sections)
    assert not result.reused and result.manifest["rows"] == 60
    assert [p.name for p in cache_root.iterdir()] == [result.cache_dir.name]
    acts = cache.load_layer(result.cache_dir, 2, "all")
    want = reference_acts(tiny, [Image.open(root / "0000.jpg")], [2], "cls")[2]
    np.testing.assert_allclose(acts, np.repeat(want, 60, axis=0), rtol=2e-3, atol=2e-3)


CLUSTER_SCRIPT = """
import json, sys, threading, time
import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors
from sweeps.config import from_mapping
from sweeps.activations.extract import extract

sections, images = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
workers = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
ray.init(address=cluster.address, log_to_driver=False)

def feed(fifo, image):
    with open(fifo, "wb") as f:  # blocks until a decode task opens the pipe
        f.write(open(image, "rb").read())

def release_images_once_both_actors_are_up():
    # An actor is ALIVE once its constructor (model load) returned. Until then no image can
    # be decoded, so the first actor up cannot take every row before the second starts.
    alive = [("state", "=", "ALIVE")]
    while sum("Encoder" in a.class_name for a in list_actors(filters=alive)) < 2:
        time.sleep(0.2)
    for fifo, image in images.items():
        threading.Thread(target=feed, args=(fifo, image), daemon=True).start()

threading.Thread(target=release_images_once_both_actors_are_up, daemon=True).start()
result = extract(from_mapping(sections))
print(json.dumps({"nodes": result.manifest["run"]["nodes"], "rows": result.manifest["rows"],
                  "workers": sorted(w.node_id for w in workers)}))
ray.shutdown()
cluster.shutdown()
"""


def test_two_simulated_gpu_nodes_each_run_an_actor(tiny, folder, tmp_path):
    # The images are named pipes that the script fills only once both actors are up.
    pipes, images = tmp_path / "pipes", {}
    for image in sorted(Path(folder).rglob("*.png")):
        pipe = pipes / image.relative_to(folder)
        pipe.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(pipe)
        images[str(pipe)] = str(image)
    assert len(images) == 24
    sections = config(
        tiny,
        pipes,
        tmp_path / "cache",
        num_actors=2,
        num_gpus_per_actor=1,
        batch_size=2,
        rows_per_task=2,
    )
    env = os.environ | {"PYTHONPATH": str(ROOT), "RAY_ADDRESS": ""}
    out = subprocess.run(
        [sys.executable, "-c", CLUSTER_SCRIPT, json.dumps(sections), json.dumps(images)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["rows"] == 24
    assert report["nodes"] == report["workers"]


def test_config_errors_name_the_field_and_the_fix(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  source: folder\n  path: /x\nextract:\n  layers: [9]\n")
    cfg = load_config(cfg_file, ["extract.layers=[1, 3]", "model.dtype=float16"])
    assert cfg.extract.layers == [1, 3] and cfg.model.dtype == "float16"
    with pytest.raises(ConfigError, match="unknown config section.*sea"):
        load_config(cfg_file, ["sea.x=1"])
    with pytest.raises(ConfigError, match="unknown extract field.*layer"):
        load_config(cfg_file, ["extract.layer=1"])
    with pytest.raises(ConfigError, match=r"extract.layers: expected a list of integers, got 9"):
        load_config(cfg_file, ["extract.layers=9"])
    with pytest.raises(ConfigError, match=r"extract.layers \(got \[9, 9\]\).*\[7, 9, 11\]"):
        load_config(cfg_file, ["extract.layers=[9, 9]"])
    with pytest.raises(ConfigError, match="data.fraction"):
        load_config(cfg_file, ["data.fraction=0"])
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(cfg_file, ["extract"])


def test_cli_extract_help_lists_config_fields():
    out = subprocess.run(
        [sys.executable, "run_sweep.py", "extract", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    assert "extract.max_bad_fraction" in out.stdout and "Fail when more than" in out.stdout


def test_layer_out_of_range_is_a_config_error(ray_session, tiny, folder, tmp_path):
    with pytest.raises(ValueError, match=r"extract.layers.*0\.\.3"):
        run(config(tiny, folder, tmp_path, layers=[4]))


def test_a_saved_config_loads_from_any_directory_on_a_first_run(tmp_path, monkeypatch):
    """The demo's config read its model and images as hub ids before they existed, and saved
    them relative: `analyze --config runs/demo/config.yaml` from elsewhere then failed."""
    from sweeps.cli import DEMO_CONFIG
    from sweeps.config import save_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO_CONFIG, base=".")  # the demo's own call, before the assets exist
    assert not Path(cfg.model.name_or_path).is_absolute()  # a possible hub id, so kept
    Path(cfg.model.name_or_path).mkdir(parents=True)  # what prepare_demo then makes
    Path(cfg.data.path).mkdir(parents=True)
    saved = save_config(cfg, Path(cfg.sweep.out_dir) / "config.yaml")
    monkeypatch.chdir(Path(tmp_path).anchor)
    again = load_config(saved)
    assert again.model.name_or_path == str(tmp_path / cfg.model.name_or_path)
    assert again.data.path == str(tmp_path / cfg.data.path)
    assert again.sweep.out_dir == str(tmp_path / cfg.sweep.out_dir)


def test_a_dangling_link_is_skipped_and_counted_not_fatal(ray_session, tiny, tmp_path):
    """One dangling symlink in an image folder once aborted the whole extraction."""
    root = Path(make_image_folder(tmp_path / "imgs", n=12))
    (root / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    result = run(config(tiny, root, tmp_path / "cache", max_bad_fraction=0.5))
    assert result.manifest["rows"] == 12 and result.manifest["skipped"] == {"missing": 1}


def test_a_parquet_image_column_of_numbers_names_the_column(tiny, tmp_path):
    pq.write_table(pa.table({"image": [1, 2, 3], "label": [0, 1, 0]}), tmp_path / "d.parquet")
    sections = config(tiny, tmp_path / "d.parquet", tmp_path / "cache", source="parquet")
    with pytest.raises(ValueError, match="data.image_column: column 'image' .* holds int64"):
        run(sections)


def test_a_home_relative_path_is_the_users_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "imgs").mkdir()
    path = tmp_path / "c.yaml"
    path.write_text("data: {source: folder, path: ~/imgs}\nextract: {cache_dir: ~/cache}\n")
    cfg = load_config(path)
    assert cfg.data.path == str(tmp_path / "imgs")
    assert cfg.extract.cache_dir == str(tmp_path / "cache")
    over = load_config(None, ["data.path=~/imgs", "data.source=folder"])
    assert over.data.path == str(tmp_path / "imgs")


def test_a_damaged_cache_is_reported_with_its_part_and_rebuilt_on_request(
    ray_session, tiny, folder, tmp_path, capsys
):
    """`extract` once reported a hit on a truncated part; a manifest without parts was a
    KeyError and planted NaNs reached training."""
    import yaml

    from sweeps.cli import main

    sections = config(tiny, folder, tmp_path / "cache")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(sections))
    first = run(sections)
    part = first.cache_dir / first.manifest["parts"][0]
    assert first.manifest["part_files"][part.name]["bytes"] == part.stat().st_size

    good = part.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    part.write_bytes(bytes(flipped))  # same size: only the checksum tells
    assert main(["extract", "--config", str(path)]) == 0
    assert "cache hit" in capsys.readouterr().out
    assert main(["extract", "--config", str(path), "--verify"]) == 2
    err = capsys.readouterr().err
    assert f"part {part.name} does not match its checksum" in err and "--rebuild" in err

    part.write_bytes(good[:-10])  # truncated
    assert main(["extract", "--config", str(path)]) == 2
    assert f"part {part.name} holds {len(good) - 10} bytes" in capsys.readouterr().err
    with pytest.raises(cache.DamagedCache, match=part.name):
        cache.load_layer(first.cache_dir, 0, "all")

    assert main(["extract", "--config", str(path), "--rebuild"]) == 0
    assert "images done" in capsys.readouterr().out
    assert main(["extract", "--config", str(path), "--verify"]) == 0
    assert "every part matches its checksum" in capsys.readouterr().out

    manifest_path = first.cache_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "parts"}))
    assert main(["extract", "--config", str(path)]) == 2
    assert "manifest.json lacks parts" in capsys.readouterr().err


def test_non_finite_activations_are_an_error_when_read(tmp_path):
    d, rows = 4, 6
    column = pa.FixedShapeTensorArray.from_numpy_ndarray(
        np.where(np.arange(rows * d).reshape(rows, d) == 5, np.nan, 1.0).astype(np.float16)
    )
    with pytest.raises(cache.DamagedCache, match="non-finite"):
        cache.layer_values(column)


def test_ctrl_c_during_extract_leaves_no_partial_cache_and_prints_one_line(tiny, tmp_path):
    """Ctrl-C in `extract` once printed a KeyboardInterrupt traceback."""
    root = tmp_path / "images"
    root.mkdir()
    random_image(np.random.default_rng(0), 1500, 2000).save(root / "0000.jpg", quality=95)
    for i in range(1, 60):  # slow to decode: the run takes seconds
        shutil.copy(root / "0000.jpg", root / f"{i:04d}.jpg")
    cache_root = tmp_path / "cache"
    (tmp_path / "cfg.json").write_text(
        json.dumps(config(tiny, root, cache_root, batch_size=2, rows_per_task=2))
    )
    proc = subprocess.Popen(
        [sys.executable, "run_sweep.py", "extract", "--config", str(tmp_path / "cfg.json")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 900  # a hang guard; the condition is what we wait on
    while not glob.glob(str(cache_root / ".tmp-*" / "part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "extract never wrote a part"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("interrupted (SIGINT): ") and "Traceback" not in err, err
    assert not glob.glob(str(cache_root / ".tmp-*")) and not list(
        cache_root.glob("*/manifest.json")
    )
