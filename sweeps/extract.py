"""Ray Data pipeline: images -> CLIP preprocessing (CPU tasks) -> CLIP actors -> activation cache.

The driver indexes the source (stable row ids), streams index blocks through decode tasks and
a pool of model actors that write Parquet parts into the run's private directory, and counts
what comes back. Only per-row outcomes travel back to the driver, never activations.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sae.clip import Preprocessing
from sweeps import cache
from sweeps.config import Config
from sweeps.sources import Source, decode_batch, index_source


@dataclass
class ExtractResult:
    cache_dir: Path
    manifest: dict
    reused: bool


# ---- model actors ----


class Encoder:
    """A Ray Data actor: one CLIP vision model, writing a Parquet part per batch.

    On CPU it also decodes its batches (`decode`: decode_batch's keyword arguments): decoding
    in separate tasks would only take cores from the forward, and each thread it adds to the
    forward's threads makes both slower than taking turns."""

    def __init__(
        self,
        cfg: Config,
        pre: Preprocessing,
        run_dir: str,
        cpu_threads: int,
        decode: dict | None = None,
    ):
        import ray
        import torch

        from sae.clip import DTYPES, load_vision_model

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(cpu_threads)  # Ray sets OMP_NUM_THREADS=1 in workers
            self.dtype = torch.float32  # fp16/bf16 matmuls are slow or missing on CPU
        else:
            self.dtype = torch.float16 if cfg.model.dtype == "auto" else DTYPES[cfg.model.dtype]
        model = load_vision_model(cfg.model.name_or_path, cfg.model.revision, self.dtype)
        self.model = model.to(self.device)
        self.pre, self.run_dir = pre, run_dir
        self.layers, self.token_mode = cfg.extract.layers, cfg.extract.token_mode
        self.cache_dtype = np.dtype(cfg.extract.cache_dtype)
        self.node = ray.get_runtime_context().get_node_id()
        self.decode = None if decode is None else {**decode, "threads": cpu_threads}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from sae.clip import capture_layers

        if self.decode is not None:
            batch = decode_batch(batch, **self.decode)
        reasons = batch["reason"].copy()
        ok = reasons == ""
        if ok.any():
            pixels = self.torch.from_numpy(batch["pixels"][ok]).to(self.device)
            acts = capture_layers(
                self.model, self.pre.normalize(pixels, self.dtype), self.layers, self.token_mode
            )
            acts = {
                layer: a.float().cpu().numpy().astype(self.cache_dtype) for layer, a in acts.items()
            }
            finite = np.logical_and.reduce(
                [np.isfinite(a).reshape(len(a), -1).all(axis=1) for a in acts.values()]
            )
            if finite.all():
                cache.write_part(self.run_dir, batch["row_id"][ok], batch["label"][ok], acts)
            else:  # the driver raises; a part with NaNs must never exist
                reasons[np.flatnonzero(ok)[~finite]] = "nonfinite"
        n = len(reasons)
        return {
            "row_id": batch["row_id"],
            "reason": reasons,
            "node": np.array([self.node] * n, dtype=object),
            "device": np.array([f"{self.device}/{str(self.dtype)[6:]}"] * n, dtype=object),
        }


# ---- driver ----


def cache_inputs(cfg: Config, pre: Preprocessing, source: Source) -> dict:
    """Everything that decides the cache's content: its key is a hash of this."""
    data = dataclasses.asdict(cfg.data)
    return {
        "model": cache.model_identity(cfg.model.name_or_path, cfg.model.revision),
        "model_dtype": cfg.model.dtype,
        "preprocessing": dataclasses.asdict(pre),
        "data": {**data, "fingerprint": source.fingerprint},
        "layers": sorted(cfg.extract.layers),
        "token_mode": cfg.extract.token_mode,
        "cache_dtype": cfg.extract.cache_dtype,
        "max_image_pixels": cfg.extract.max_image_pixels,
    }


def locate_cache(cfg: Config):
    """(preprocessing, source, key inputs, key, cache dir or None) of cfg, without Ray.

    cfg's paths must be absolute (absolute_paths): the key hashes them."""
    pre = Preprocessing.from_pretrained(cfg.model.name_or_path, cfg.model.revision)
    source = index_source(cfg.data)
    inputs = cache_inputs(cfg, pre, source)
    key = cache.cache_key(inputs)
    return pre, source, inputs, key, cache.find_cache(cfg.extract.cache_dir, key)


def extract(cfg: Config, start_ray: Callable[[], object] | None = None) -> ExtractResult:
    """Build the activation cache for cfg, or find it. Ray must be initialised, or
    `start_ray` given: it is called only when there is work to do, so a cache hit needs no
    Ray."""
    import ray
    from transformers import CLIPVisionConfig

    cfg = absolute_paths(cfg)
    model, ex = cfg.model, cfg.extract
    vision = CLIPVisionConfig.from_pretrained(model.name_or_path, revision=model.revision)
    if max(ex.layers) >= vision.num_hidden_layers:
        raise ValueError(
            f"extract.layers: {model.name_or_path} has layers 0..{vision.num_hidden_layers - 1} "
            f"(got {ex.layers}); pick layers in that range"
        )
    pre, source, inputs, key, found = locate_cache(cfg)
    if found:
        manifest = cache.read_manifest(found)
        print(f"extract: cache hit, no work done: {manifest['rows']} images in {found}")
        return ExtractResult(found, manifest, reused=True)

    if start_ray is not None:
        start_ray()
    run_dir = cache.start_run(ex.cache_dir, key)
    try:
        num_gpus = ex.num_gpus_per_actor
        if num_gpus is None:
            num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
        cpu_threads = ex.cpu_threads or max(1, (os.cpu_count() or 1) // ex.num_actors)
        stats = _run_pipeline(cfg, pre, source, run_dir, num_gpus, cpu_threads)
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
    run = stats["run"]
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(stats["skipped"].items())) or "none"
    print(
        f"extract: {manifest['rows']} images done, {sum(stats['skipped'].values())} skipped "
        f"({skipped}), {run['images_per_s']:.1f} images/s, cache {cache_dir}"
    )
    return ExtractResult(cache_dir, manifest, reused=False)


def _run_pipeline(cfg, pre, source, run_dir, num_gpus, cpu_threads) -> dict:
    import ray

    ex = cfg.extract
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # one tqdm bar in images instead of one per operator
    index = source.index
    blocks = [index.slice(i, ex.rows_per_task) for i in range(0, len(index), ex.rows_per_task)]
    ds = ray.data.from_arrow(blocks)
    decode = {"data": cfg.data, "pre": pre, "max_pixels": ex.max_image_pixels}
    if num_gpus > 0:
        # A GPU actor must not wait for decoding: CPU tasks decode ahead of it.
        ds = ds.map_batches(decode_batch, batch_size=None, batch_format="numpy", fn_kwargs=decode)
    ds = ds.map_batches(
        Encoder,
        batch_size=ex.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=ex.num_actors),
        num_gpus=num_gpus,
        # a GPU actor mostly waits on its device; and remote args unlike the decode tasks'
        # keep Ray from fusing decoding into it, which would serialise them. A CPU actor
        # decodes itself and sizes its threads by cpu_threads.
        num_cpus=0.5,
        fn_constructor_kwargs={
            "cfg": cfg,
            "pre": pre,
            "run_dir": str(run_dir),
            "cpu_threads": cpu_threads,
            "decode": None if num_gpus > 0 else decode,
        },
    )
    total, max_bad = len(index), ex.max_bad_fraction * len(index)
    skipped, done, nodes, devices = Counter(), [], set(), set()
    start = time.perf_counter()
    with tqdm(total=total, desc="extract", unit="img", dynamic_ncols=True) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            reasons = batch["reason"]
            nonfinite = batch["row_id"][reasons == "nonfinite"]
            if len(nonfinite):
                raise FloatingPointError(
                    f"non-finite activations for row ids {nonfinite[:20].tolist()}: with "
                    "extract.cache_dtype=float16, try float32 (or model.dtype=float32)"
                )
            skipped.update(reasons[reasons != ""].tolist())
            done.append(batch["row_id"][reasons == ""])
            nodes.update(batch["node"].tolist())
            devices.update(batch["device"].tolist())
            bar.update(len(reasons))
            bar.set_postfix(skipped=sum(skipped.values()))
            if sum(skipped.values()) > max_bad:
                raise ValueError(
                    f"{sum(skipped.values())} of {total} images are unusable "
                    f"({dict(skipped)}), above extract.max_bad_fraction="
                    f"{ex.max_bad_fraction}: fix the data or raise that limit"
                )
    seconds = time.perf_counter() - start
    done_ids = np.sort(np.concatenate(done)) if done else np.zeros(0, np.int64)
    return {
        "done_ids": done_ids,
        "skipped": dict(skipped),
        "run": {
            "seconds": round(seconds, 3),
            "images_per_s": round(len(done_ids) / seconds, 2),
            "nodes": sorted(nodes),
            "devices": sorted(devices),
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
