"""Image sources without Ray: index a folder, a Hugging Face dataset or Parquet files (stable
row ids), then fetch, decode and preprocess blocks of them. The extraction pipeline and the
analysis both read images through this module."""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import multiprocessing
import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from sweeps.activations import cache
from sweeps.config import DataConfig

if TYPE_CHECKING:
    from sweeps.activations.clip import Preprocessing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Source:
    """A source indexed on the driver: one row per image, in row id order."""

    index: pa.Table
    """row_id plus what a decode task needs to fetch the image (path, or file and row)."""
    fingerprint: str
    label_names: list[str] | None


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


def _check_image_type(data: DataConfig, schema: pa.Schema) -> None:
    """An image column holds bytes, file paths, or HF's {bytes, path} struct."""
    kind = schema.field(data.image_column).type
    ok = pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_string(kind)
    ok |= pa.types.is_large_string(kind)
    if pa.types.is_struct(kind):
        ok = {kind.field(i).name for i in range(kind.num_fields)} & {"bytes", "path"} != set()
    if not ok:
        raise ValueError(
            f"data.image_column: column {data.image_column!r} of {data.path} holds {kind}, not "
            "images (encoded bytes, file paths, or a struct of bytes and path): name the image "
            "column"
        )


def _index_parquet(data: DataConfig) -> Source:
    files = _parquet_files(data.path)
    schema = pq.read_schema(files[0])
    _check_columns(data, schema.names)
    _check_image_type(data, schema)
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


def fetch_images(index: dict[str, np.ndarray], data: DataConfig) -> tuple[list, np.ndarray]:
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


def raw_bytes(value) -> bytes | None:
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
        raw = raw_bytes(value)
    except OSError:
        return None, "missing"
    if raw is None:
        return None, "missing"
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        return None, "not_an_image"  # a number or a list where an image belongs
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
    processes: int = 1,
) -> dict[str, np.ndarray]:
    """Fetch, decode and preprocess a block; bad rows keep their row id and get a reason.

    With processes > 1 the images decode in that many worker processes (one pool per
    process, kept): threads stop scaling at a few cores, since PIL holds the GIL between its
    decode and resize calls."""
    images, labels = fetch_images(index, data)
    crop_h, crop_w = pre.crop_hw or pre.size_hw
    pixels_BCHW = np.zeros((len(images), 3, crop_h, crop_w), np.uint8)
    if processes > 1 and len(images) > 1:
        chunks = [images[i::processes] for i in range(processes)]
        n = len(chunks)
        done = _pool(processes).map(_decode_all, chunks, [pre] * n, [max_pixels] * n)
        decoded = [None] * len(images)
        for i, chunk in enumerate(done):
            decoded[i::processes] = chunk
    else:
        decoded = _decode_all(images, pre, max_pixels)
    reasons = []
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


def _decode_all(values: list, pre: Preprocessing, max_pixels: int) -> list:
    return [decode_image(value, pre, max_pixels) for value in values]


@functools.cache
def _pool(processes: int) -> ProcessPoolExecutor:
    # spawn: this process may hold torch's threads or be a Ray worker, neither safe to fork
    return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"))
