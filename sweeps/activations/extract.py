"""Extraction: images -> CLIP vision model -> activation cache, in this process or on Ray Data.

The driver indexes the source (activations.sources: stable row ids) and finds the cache by the key
of its inputs. On one machine without GPUs, an Encoder in this process decodes and encodes
batch after batch; elsewhere the index streams through (on GPU nodes) decode tasks and a pool
of Encoder actors. Either writes Parquet parts into the run's private directory, and only
per-row outcomes come back to the driver, never activations.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from sweeps.activations import cache
from sweeps.activations.sources import Source, decode_batch, index_source
from sweeps.config import Config

if TYPE_CHECKING:
    from sweeps.activations.clip import Preprocessing


@dataclass
class ExtractResult:
    cache_dir: Path
    manifest: dict
    reused: bool


# ---- model ----


class Encoder:
    """One CLIP vision model, writing a Parquet part per batch: a Ray Data actor, or called
    in the driver (`_run_here`).

    It gets only the values it needs, not the config: constructor arguments travel to every
    actor. `decode` (decode_batch's keyword arguments) makes it decode its batches itself: on
    its GPU with `on_device` (device_decode), else in cpu_threads worker processes, taking
    turns with the forward (each thread added to the forward's makes both slower)."""

    def __init__(
        self,
        name_or_path: str,
        revision: str | None,
        model_dtype: str,
        layers: list[int],
        token_mode: str,
        cache_dtype: str,
        pre: Preprocessing,
        run_dir: str,
        cpu_threads: int,
        decode: dict | None = None,
        on_device: bool = False,
        node: str | None = None,
    ):
        import torch

        from sweeps.activations.clip import DTYPES, load_vision_model

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if on_device:
            from sweeps.activations.device_decode import device_decoder_problem

            problem = device_decoder_problem(pre, self.device)
            if problem:
                raise RuntimeError(
                    f"extract.decode=device: {problem}; set extract.decode=cpu to decode on CPUs"
                )
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
            self.dtype = torch.float32  # fp16/bf16 matmuls are slow or missing on CPU
        else:
            self.dtype = torch.float16 if model_dtype == "auto" else DTYPES[model_dtype]
        self.model = load_vision_model(name_or_path, revision, self.dtype).to(self.device)
        self.pre, self.run_dir = pre, run_dir
        self.layers, self.token_mode = layers, token_mode
        self.cache_dtype = np.dtype(cache_dtype)
        if node is None:
            import ray

            node = ray.get_runtime_context().get_node_id()
        self.node = node
        self.decode, self.on_device = decode, on_device
        if decode is not None and not on_device:
            self.decode = {**decode, "processes": cpu_threads}

    def _decoded(self, batch: dict) -> dict:
        if self.on_device:
            from sweeps.activations.device_decode import decode_on_device

            return decode_on_device(batch, **self.decode, device=self.device)
        if self.decode is not None:
            batch = decode_batch(batch, **self.decode)
        return {**batch, "cpu_decoded": np.count_nonzero(batch["reason"] == "")}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sweeps.activations.clip import capture_layers

        batch = self._decoded(batch)
        reasons = batch["reason"].copy()
        ok = reasons == ""
        if ok.any():
            with self.torch.inference_mode():
                pixels = self.torch.as_tensor(batch["pixels"], device=self.device)
                pixels = pixels[self.torch.from_numpy(ok).to(self.device)]
                acts = capture_layers(
                    self.model, self.pre.normalize(pixels, self.dtype), self.layers, self.token_mode
                )
                acts = {
                    layer: a.float().cpu().numpy().astype(self.cache_dtype)
                    for layer, a in acts.items()
                }
            finite = np.logical_and.reduce(
                [np.isfinite(a).reshape(len(a), -1).all(axis=1) for a in acts.values()]
            )
            if finite.all():
                cache.write_part(self.run_dir, batch["row_id"][ok], batch["label"][ok], acts)
            else:  # the driver raises; a part with NaNs must never exist
                reasons[np.flatnonzero(ok)[~finite]] = "nonfinite"
        n = len(reasons)
        # per row for Ray Data's batches; the batch's count on its first row
        cpu_decoded = np.zeros(n, np.int64)
        cpu_decoded[:1] = batch["cpu_decoded"]
        return {
            "row_id": batch["row_id"],
            "reason": reasons,
            "node": np.array([self.node] * n, dtype=object),
            "device": np.array([f"{self.device}/{str(self.dtype)[6:]}"] * n, dtype=object),
            "cpu_decoded": cpu_decoded,
        }


# ---- driver ----


def cache_inputs(cfg: Config, source: Source) -> dict:
    """Everything that decides the cache's content: its key is a hash of this. Only what
    the config names; what follows from the model's files (preprocessing, width) is pinned
    by their hash and recorded in the manifest."""
    data = dataclasses.asdict(cfg.data)
    return {
        "model": cache.model_identity(cfg.model.name_or_path, cfg.model.revision),
        "model_dtype": cfg.model.dtype,
        "data": {**data, "fingerprint": source.fingerprint},
        "layers": sorted(cfg.extract.layers),
        "token_mode": cfg.extract.token_mode,
        "cache_dtype": cfg.extract.cache_dtype,
        "max_image_pixels": cfg.extract.max_image_pixels,
    }


def locate_cache(cfg: Config):
    """(source, key inputs, key, cache dir or None) of cfg, without Ray or the model.

    cfg's paths must be absolute (absolute_paths): the key hashes them."""
    source = index_source(cfg.data)
    inputs = cache_inputs(cfg, source)
    key = cache.cache_key(inputs)
    return source, inputs, key, cache.find_cache(cfg.extract.cache_dir, key)


def extract(
    cfg: Config,
    start_ray: Callable[[], object] | None = None,
    in_process: bool | None = None,
    progress=None,
    verify: bool = False,
    rebuild: bool = False,
) -> ExtractResult:
    """Build the activation cache for cfg, or find it (then `reused`); nothing is printed.

    in_process: run the Encoder in this process, without Ray (True), or through Ray Data
    (False); None decides: in this process on one machine without GPUs (`runs_here`). Both
    write the same parts. For Ray Data, Ray must be initialised or `start_ray` given: it is
    called only then, so a cache hit or an in-process run starts no Ray. progress: a bar the
    caller owns (a sweeps.progress bar, or anything with update(n)), told of each batch done.
    A hit checks its parts' sizes, and with verify their checksums; rebuild deletes the key's
    cache first (a damaged one is reported, not rebuilt, without it)."""
    cfg = absolute_paths(cfg)
    source, inputs, key, found = locate_cache(cfg)
    if found and rebuild:
        shutil.rmtree(found)
    elif found:  # a hit loads no torch, transformers or model: it returns in a second
        return ExtractResult(found, cache.read_manifest(found, verify=verify), reused=True)

    from transformers import CLIPVisionConfig

    from sweeps.activations.clip import Preprocessing

    model, ex = cfg.model, cfg.extract
    vision = CLIPVisionConfig.from_pretrained(model.name_or_path, revision=model.revision)
    if max(ex.layers) >= vision.num_hidden_layers:
        raise ValueError(
            f"extract.layers: {model.name_or_path} has layers 0..{vision.num_hidden_layers - 1} "
            f"(got {ex.layers}); pick layers in that range"
        )
    pre = Preprocessing.from_pretrained(model.name_or_path, model.revision)
    here = runs_here(cfg) if in_process is None else in_process
    if here and ex.decode == "device":
        raise ValueError(
            "extract.decode=device: extraction runs in this process, on CPUs (no GPU here); "
            "use auto or cpu"
        )
    if not here and start_ray is not None:
        start_ray()
    run_dir = cache.start_run(ex.cache_dir, key)
    try:
        if here:
            stats = _run_here(cfg, pre, source, run_dir, progress)
        else:
            stats = _run_pipeline(cfg, pre, source, run_dir, progress)
        parts = sorted(p.name for p in run_dir.glob("part-*.parquet"))
        row_ids = cache.read_columns(run_dir, parts, [])["row_id"].to_numpy()
        if not np.array_equal(row_ids, stats.pop("done_ids")):
            raise RuntimeError(f"parts in {run_dir} do not match the rows processed: rerun")
        t_tokens = (
            1 if ex.token_mode == "cls" else (vision.image_size // vision.patch_size) ** 2 + 1
        )
        manifest = {
            "key": key,
            "inputs": inputs,
            "preprocessing": dataclasses.asdict(pre),
            "layers": sorted(ex.layers),
            "token_mode": ex.token_mode,
            "dtype": ex.cache_dtype,
            "d_model": vision.hidden_size,
            "tokens_per_image": t_tokens,
            "rows": len(row_ids),
            "requested": len(source.index),
            "skipped": stats["skipped"],
            "label_names": source.label_names,
            "parts": parts,
            "run": stats["run"],
            "version": _version(),
        }
        cache_dir, _ = cache.finish_run(run_dir, manifest)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return ExtractResult(cache_dir, manifest, reused=False)


def runs_here(cfg: Config) -> bool:
    """Whether extraction runs in this process: one machine and no GPU, where Ray's start-up
    (instance, actor, a model load in a worker) would cost more than it parallelises. True
    when no Ray is initialised (or, initialised, it is one live node, this one, with CPUs and
    no GPUs), no GPU is asked for or present, and RAY_ADDRESS names no cluster."""
    import torch

    if cfg.extract.num_gpus_per_actor or torch.cuda.is_available():
        return False
    ray = sys.modules.get("ray")  # not imported: not initialised either
    if ray is None or not ray.is_initialized():
        return not os.environ.get("RAY_ADDRESS")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    resources = ray.cluster_resources()
    return (
        len(nodes) == 1
        and nodes[0]["NodeID"] == ray.get_runtime_context().get_node_id()
        and resources.get("CPU", 0) > 0
        and not resources.get("GPU", 0)
    )


def _encoder_args(cfg: Config, pre: Preprocessing, run_dir: Path, cpu_threads: int) -> dict:
    m, ex = cfg.model, cfg.extract
    return {
        "name_or_path": m.name_or_path,
        "revision": m.revision,
        "model_dtype": m.dtype,
        "layers": list(ex.layers),
        "token_mode": ex.token_mode,
        "cache_dtype": ex.cache_dtype,
        "pre": pre,
        "run_dir": str(run_dir),
        "cpu_threads": cpu_threads,
    }


def _batches(index: pa.Table, size: int) -> list[pa.Table]:
    """Consecutive slices of the index: both paths give the Encoder these same batches, so
    their parts are the same bytes."""
    return [index.slice(i, size) for i in range(0, len(index), size)]


def _run_here(cfg, pre, source, run_dir, progress) -> dict:
    """The Encoder in this process; the next batch decodes (in worker processes) while this
    one runs its forward."""
    import torch

    ex = cfg.extract
    threads = torch.get_num_threads()
    cpu_threads = ex.cpu_threads or os.cpu_count() or 1
    # half the cores decode the next batch in processes while the forward runs
    decode = {"data": cfg.data, "pre": pre, "max_pixels": ex.max_image_pixels}
    decode["processes"] = max(1, cpu_threads // 2)
    tally = _Tally(len(source.index), ex.max_bad_fraction, progress)
    blocks = [
        {
            name: column.to_numpy(zero_copy_only=False)
            for name, column in zip(b.column_names, b.columns)
        }
        for b in _batches(source.index, ex.batch_size)
    ]
    try:
        encoder = Encoder(
            **_encoder_args(cfg, pre, run_dir, cpu_threads), node=socket.gethostname()
        )
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(decode_batch, blocks[0], **decode)
            for i in range(len(blocks)):
                batch = pending.result()
                if i + 1 < len(blocks):
                    pending = pool.submit(decode_batch, blocks[i + 1], **decode)
                tally.add(encoder(batch))
    finally:
        torch.set_num_threads(threads)  # the Encoder set this process's threads
    return tally.result()


def _run_pipeline(cfg, pre, source, run_dir, progress) -> dict:
    import ray

    ex = cfg.extract
    num_gpus = ex.num_gpus_per_actor
    if num_gpus is None:
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    cpu_threads = ex.cpu_threads or max(1, (os.cpu_count() or 1) // ex.num_actors)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the caller's bar counts images instead
    decode = {"data": cfg.data, "pre": pre, "max_pixels": ex.max_image_pixels}
    if num_gpus == 0 and ex.decode == "device":
        raise ValueError(
            "extract.decode=device: the models run on CPUs (extract.num_gpus_per_actor=0 or "
            "no GPU in the cluster); use auto or cpu"
        )
    on_device = num_gpus > 0 and (
        ex.decode == "device"
        or (ex.decode == "auto" and importlib.util.find_spec("torchvision") is not None)
    )
    if on_device:
        # Encoded bytes travel; each GPU actor decodes its batches with nvJPEG.
        ds = ray.data.from_arrow(_batches(source.index, ex.batch_size))
        batch_size = None
    elif num_gpus > 0:
        # A GPU actor must not wait for decoding: CPU tasks decode ahead of it.
        ds = ray.data.from_arrow(_batches(source.index, ex.rows_per_task))
        ds = ds.map_batches(decode_batch, batch_size=None, batch_format="numpy", fn_kwargs=decode)
        batch_size = ex.batch_size
    else:
        # A CPU actor decodes itself; each block is one batch, the same as in _run_here.
        ds = ray.data.from_arrow(_batches(source.index, ex.batch_size))
        batch_size = None
    ds = ds.map_batches(
        Encoder,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ex.num_actors),
        num_gpus=num_gpus,
        # a GPU actor mostly waits on its device; and remote args unlike the decode tasks'
        # keep Ray from fusing decoding into it, which would serialise them. A CPU actor
        # decodes itself, in cpu_threads processes.
        num_cpus=0.5,
        fn_constructor_kwargs={
            **_encoder_args(cfg, pre, run_dir, cpu_threads),
            "decode": None if num_gpus > 0 and not on_device else decode,
            "on_device": on_device,
        },
    )
    tally = _Tally(len(source.index), ex.max_bad_fraction, progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        tally.add(batch)
    return tally.result()


class _Tally:
    """Counts the Encoder's per-row outcomes; raises on non-finite rows or too many bad ones."""

    def __init__(self, total: int, max_bad_fraction: float, progress):
        self.total, self.max_bad_fraction, self.progress = total, max_bad_fraction, progress
        self.skipped, self.done, self.nodes, self.devices = Counter(), [], set(), set()
        self.cpu_decoded = 0
        self.start = time.perf_counter()

    def add(self, batch: dict[str, np.ndarray]) -> None:
        reasons = batch["reason"]
        nonfinite = batch["row_id"][reasons == "nonfinite"]
        if len(nonfinite):
            raise FloatingPointError(
                f"non-finite activations for row ids {nonfinite[:20].tolist()}: with "
                "extract.cache_dtype=float16, try float32 (or model.dtype=float32)"
            )
        self.skipped.update(reasons[reasons != ""].tolist())
        self.done.append(batch["row_id"][reasons == ""])
        self.nodes.update(batch["node"].tolist())
        self.devices.update(batch["device"].tolist())
        self.cpu_decoded += int(batch["cpu_decoded"].sum())
        if self.progress is not None:
            self.progress.update(len(reasons))
        bad = sum(self.skipped.values())
        if bad > self.max_bad_fraction * self.total:
            raise ValueError(
                f"{bad} of {self.total} images are unusable ({dict(self.skipped)}), above "
                f"extract.max_bad_fraction={self.max_bad_fraction}: fix the data or raise "
                "that limit"
            )

    def result(self) -> dict:
        seconds = time.perf_counter() - self.start
        done = np.sort(np.concatenate(self.done)) if self.done else np.zeros(0, np.int64)
        return {
            "done_ids": done,
            "skipped": dict(self.skipped),
            "run": {
                "seconds": round(seconds, 3),
                "images_per_s": round(len(done) / seconds, 2),
                "nodes": sorted(self.nodes),
                "devices": sorted(self.devices),
                "cpu_decoded": self.cpu_decoded,
            },
        }


def absolute_paths(cfg: Config) -> Config:
    """Workers run elsewhere (another cwd, another node): make local paths absolute."""

    def resolve(p):
        return str(Path(p).resolve()) if p and Path(p).exists() else p

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, name_or_path=resolve(cfg.model.name_or_path)),
        data=dataclasses.replace(cfg.data, path=resolve(cfg.data.path)),
        extract=dataclasses.replace(
            cfg.extract, cache_dir=str(Path(cfg.extract.cache_dir).resolve())
        ),
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("clip-sae-sweeps")
    except PackageNotFoundError:
        return "unknown"
