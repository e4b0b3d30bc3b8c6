"""Ray Data pipeline: images -> CLIP preprocessing (CPU tasks) -> CLIP actors -> activation cache.

The driver indexes the source (stable row ids), streams index blocks through decode tasks and
a pool of model actors that write Parquet parts into the run's private directory, and counts
what comes back. Only per-row outcomes travel back to the driver, never activations.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import os
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from sae.clip import Preprocessing
from sweeps import cache
from sweeps.config import Config, DataConfig

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Source:
    """A source indexed on the driver: one row per image, in row id order."""

    index: pa.Table
    """row_id plus what a decode task needs to fetch the image (path, or file and row)."""
    fingerprint: str
    label_names: list[str] | None


@dataclass
class ExtractResult:
    cache_dir: Path
    manifest: dict
    reused: bool


# ---- indexing (driver) ----


def index_source(data: DataConfig) -> Source:
    """Stable row ids: position in the HF split, in the sorted file list, or in the sorted
    Parquet files; then the fraction (by row id hash) and the limit (first rows) apply."""
    if data.source == "folder":
        source = _index_folder(Path(data.path))
    elif data.source == "parquet":
        source = _index_parquet(data)
    else:
        source = _index_hf(data)
    index = source.index
    if data.fraction < 1:
        keep = cache.unit_hash(index["row_id"].to_numpy(), data.seed) < data.fraction
        index = index.filter(pa.array(keep))
    if data.limit:
        index = index.slice(0, data.limit)
    if len(index) == 0:
        raise ValueError(f"data.path {data.path}: no images selected (check limit and fraction)")
    return dataclasses.replace(source, index=index)


def _index_folder(root: Path) -> Source:
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {root} is not a directory of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    rel = [p.relative_to(root) for p in paths]
    # ImageFolder convention: the first directory level is the class; files at the top: -1
    classes = sorted({r.parts[0] for r in rel if len(r.parts) > 1})
    label_of = {c: i for i, c in enumerate(classes)}
    labels = [label_of[r.parts[0]] if len(r.parts) > 1 else -1 for r in rel]
    index = pa.table(
        {
            "row_id": pa.array(np.arange(len(paths)), pa.int64()),
            "path": [str(p) for p in paths],
            "label": pa.array(labels, pa.int64()),
        }
    )
    return Source(index, cache.files_fingerprint(paths, root), classes or None)


def _parquet_files(path: str) -> list[Path]:
    p = Path(path)
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(p.rglob("*.parquet"))
    else:
        files = sorted(Path(f) for f in glob.glob(path, recursive=True))
    if not files:
        raise FileNotFoundError(f"data.path {path}: no Parquet files (give a file, dir or glob)")
    return [f.resolve() for f in files]


def _check_columns(data: DataConfig, names: list[str]) -> None:
    for field in ("image_column", "label_column"):
        column = getattr(data, field)
        if column and column not in names:
            hint = "; set data.label_column: null if it has no labels" if field[0] == "l" else ""
            raise ValueError(
                f"data.{field}: no column {column!r} in {data.path} (columns: {names}){hint}"
            )


def _index_parquet(data: DataConfig) -> Source:
    files = _parquet_files(data.path)
    _check_columns(data, pq.read_schema(files[0]).names)
    counts = [pq.ParquetFile(f).metadata.num_rows for f in files]
    index = pa.table(
        {
            "row_id": pa.array(np.arange(sum(counts)), pa.int64()),
            "file": np.repeat([str(f) for f in files], counts),
            "row": pa.array(np.concatenate([np.arange(c) for c in counts]), pa.int64()),
        }
    )
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    return Source(index, cache.files_fingerprint(files, root), None)


@functools.lru_cache(maxsize=4)
def _open_hf(path: str, config: str | None, split: str, image_column: str):
    """The split with undecoded images (bytes + path), opened once per worker process."""
    import datasets

    if Path(path).is_dir():
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data.split: {path} has splits {list(ds)}, not {split!r}")
            ds = ds[split]
    else:
        ds = datasets.load_dataset(path, config, split=split)
    if isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def _index_hf(data: DataConfig) -> Source:
    ds = _open_hf(data.path, data.config, data.split, data.image_column)
    _check_columns(data, ds.column_names)
    label = ds.features.get(data.label_column) if data.label_column else None
    index = pa.table({"row_id": pa.array(np.arange(len(ds)), pa.int64())})
    return Source(index, ds._fingerprint, getattr(label, "names", None))


def _columns(data: DataConfig) -> list[str]:
    return [data.image_column] + ([data.label_column] if data.label_column else [])


# ---- decode + preprocess (CPU tasks) ----


def _fetch(index: dict[str, np.ndarray], data: DataConfig) -> tuple[list, np.ndarray]:
    """Raw image values (bytes, HF dicts or paths) and labels for a block of index rows."""
    if data.source == "folder":
        return list(index["path"]), index["label"]  # read by decode_image: a row-level error
    if data.source == "hf":
        ds = _open_hf(data.path, data.config, data.split, data.image_column)
        rows = ds.select_columns(_columns(data))[index["row_id"].tolist()]
        labels = rows[data.label_column] if data.label_column else None
        return rows[data.image_column], _labels(labels, len(index["row_id"]))
    return _fetch_parquet(index, data)


def _fetch_parquet(index: dict[str, np.ndarray], data: DataConfig) -> tuple[list, np.ndarray]:
    """Read only the row groups holding the block's rows."""
    n = len(index["row_id"])
    images, labels = [None] * n, [None] * n
    for file in np.unique(index["file"]):
        at = np.flatnonzero(index["file"] == file)
        local = index["row"][at]
        starts = _row_group_starts(file)
        group_of = np.searchsorted(starts, local, side="right") - 1
        groups = np.unique(group_of)
        table = pq.ParquetFile(file).read_row_groups(groups.tolist(), columns=_columns(data))
        # read_row_groups concatenates the groups: where each group starts in `table`
        sizes = starts[groups + 1] - starts[groups]
        base = np.cumsum(sizes) - sizes
        pos = base[np.searchsorted(groups, group_of)] + local - starts[group_of]
        taken = table.take(pa.array(pos, pa.int64())).to_pydict()
        for i, j in enumerate(at):
            images[j] = taken[data.image_column][i]
            labels[j] = taken[data.label_column][i] if data.label_column else None
    return images, _labels(labels if data.label_column else None, n)


@functools.lru_cache(maxsize=64)
def _row_group_starts(file: str) -> np.ndarray:
    meta = pq.ParquetFile(file).metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    return np.cumsum([0] + sizes)


def _labels(values, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, -1, np.int64)
    return np.array([-1 if v is None else int(v) for v in values], np.int64)


def _raw_bytes(value) -> bytes | None:
    """Bytes of an image value: bytes, an HF {"bytes", "path"} dict, or a file path."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, str):
        return Path(value).read_bytes()
    return value


def decode_image(value, pre: Preprocessing, max_pixels: int) -> tuple[np.ndarray | None, str]:
    """(pixels (3, H, W) uint8, "") for a usable image, else (None, skip reason)."""
    from PIL import Image, UnidentifiedImageError

    try:
        raw = _raw_bytes(value)
    except OSError:
        return None, "missing"
    if raw is None:
        return None, "missing"
    if len(raw) == 0:
        return None, "empty"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(raw))
        except Image.DecompressionBombError:
            return None, "too_large"
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            return None, "truncated" if "truncated" in str(e).lower() else "not_an_image"
        h, w = pre.output_hw(image.height, image.width)
        if image.width * image.height > max_pixels or h * w > max_pixels:
            return None, "too_large"  # judged from the header, before decoding
        try:
            image.load()
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on bad data
            return None, "truncated" if "truncated" in str(e).lower() else "corrupt"
        try:
            return pre.to_uint8(image), ""
        except Exception:
            return None, "unconvertible"


def decode_batch(
    index: dict[str, np.ndarray],
    data: DataConfig,
    pre: Preprocessing,
    max_pixels: int,
    threads: int = 1,
) -> dict[str, np.ndarray]:
    """Fetch, decode and preprocess a block; bad rows keep their row id and get a reason.

    With threads > 1, images decode in parallel: PIL releases the GIL to decode and resize."""
    images, labels = _fetch(index, data)
    crop_h, crop_w = pre.crop_hw or pre.size_hw
    pixels_BCHW = np.zeros((len(images), 3, crop_h, crop_w), np.uint8)
    reasons = []

    def decode(value):
        return decode_image(value, pre, max_pixels)

    if threads > 1 and len(images) > 1:
        with ThreadPoolExecutor(threads) as pool:
            decoded = list(pool.map(decode, images))
    else:
        decoded = map(decode, images)
    for i, (pixels, reason) in enumerate(decoded):
        if pixels is not None:
            pixels_BCHW[i] = pixels
        reasons.append(reason)
    return {
        "row_id": index["row_id"],
        "label": labels,
        "pixels": pixels_BCHW,
        "reason": np.array(reasons, dtype=object),
    }


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
