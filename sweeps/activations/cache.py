"""The content-addressed activation cache: keys, atomic publication, and the loader trials call.

Layout: `<cache_root>/<key>/part-*.parquet` + `manifest.json`. A run writes into a fresh
`<cache_root>/.tmp-<key>-<uuid>/`, writes its manifest there last, then renames the directory
into place, so a cache directory either is complete or does not exist, and two runs never
share files. Columns: `row_id` int64, `label` int64 (-1: none), `layer_<L>` fixed_shape_tensor.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
Split = Literal["train", "val", "all"]


def cache_key(inputs: dict) -> str:
    """Hash of everything that decides the cache's content (canonical JSON)."""
    blob = json.dumps({"format": FORMAT_VERSION, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def files_fingerprint(paths: list[Path], root: Path) -> str:
    """Cheap fingerprint of a file set: relative paths, sizes and modification times."""
    h = hashlib.sha256()
    for p in sorted(paths):
        # a dangling link is fingerprinted as the link: decoding counts it as missing
        st = p.stat() if p.exists() else p.lstat()
        h.update(f"{p.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def model_identity(name_or_path: str, revision: str | None) -> dict:
    """What pins a checkpoint's files: a content hash of a local directory's weights and JSON
    configs, else the hub commit the revision resolved to. What the cache derives from those
    files (preprocessing, width) is then pinned too, so a lookup never has to load them."""
    local = Path(name_or_path)
    if local.is_dir():
        h = hashlib.sha256()
        for p in sorted(
            [*local.glob("*.safetensors"), *local.glob("*.bin"), *local.glob("*.json")]
        ):
            h.update(f"{p.name}\0".encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        return {"name_or_path": str(local.resolve()), "files_sha256": h.hexdigest()}
    from transformers import AutoConfig

    commit = getattr(
        AutoConfig.from_pretrained(name_or_path, revision=revision), "_commit_hash", None
    )
    return {"name_or_path": name_or_path, "revision": revision, "commit": commit}


def unit_hash(row_ids: np.ndarray, seed: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per row id (splitmix64): splits that never depend on order."""
    with np.errstate(over="ignore"):
        z = np.asarray(row_ids, np.uint64) + np.uint64(seed + 1) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def start_run(cache_root: str | Path, key: str) -> Path:
    """A fresh private directory for one run; removes those of dead runs of the same key."""
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in cache_root.glob(f".tmp-{key}-*"):
        try:
            owner = json.loads((stale / "owner.json").read_text())
        except (OSError, ValueError):
            continue
        if owner["host"] == host and not _pid_alive(owner["pid"]):
            shutil.rmtree(stale, ignore_errors=True)
    run_dir = cache_root / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
    run_dir.mkdir()
    (run_dir / "owner.json").write_text(json.dumps({"host": host, "pid": os.getpid()}))
    return run_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_part(
    run_dir: str | Path, row_ids: np.ndarray, labels: np.ndarray, acts: dict[int, np.ndarray]
) -> str:
    """Write one Parquet part named by its first row id; a retried batch overwrites itself."""
    columns = {
        "row_id": pa.array(row_ids, pa.int64()),
        "label": pa.array(labels, pa.int64()),
    }
    for layer in sorted(acts):
        columns[f"layer_{layer}"] = pa.FixedShapeTensorArray.from_numpy_ndarray(acts[layer])
    name = f"part-{int(np.min(row_ids)):012d}.parquet"
    tmp = Path(run_dir) / f".{name}.{uuid.uuid4().hex[:8]}"
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, Path(run_dir) / name)
    return name


def read_columns(cache_dir: str | Path, parts: list[str], columns: list[str]) -> pa.Table:
    """Columns of the given parts, sorted by row id (Ray finishes parts in any order)."""
    table = pads.dataset([str(Path(cache_dir) / p) for p in parts], format="parquet").to_table(
        columns=sorted(set(columns) | {"row_id"})
    )
    return table.sort_by("row_id")


def finish_run(run_dir: Path, manifest: dict) -> tuple[Path, bool]:
    """Write the manifest last and atomically, with each part's size and SHA-256 added as
    `part_files`, then publish the directory under its key.

    Returns (cache_dir, published); published is False when an identical run got there first.
    """
    # What a later read checks the parts against: sizes on every hit, checksums on --verify.
    manifest["part_files"] = {
        part: {"bytes": (run_dir / part).stat().st_size, "sha256": file_sha256(run_dir / part)}
        for part in manifest["parts"]
    }
    tmp = run_dir / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, run_dir / "manifest.json")
    (run_dir / "owner.json").unlink()
    final = run_dir.parent / manifest["key"]
    if final.exists() and not (final / "manifest.json").exists():
        shutil.rmtree(final)  # debris from outside this protocol: never a cache
    try:
        os.rename(run_dir, final)
    except OSError:
        if not (final / "manifest.json").exists():
            raise
        shutil.rmtree(run_dir, ignore_errors=True)
        return final, False
    return final, True


def find_cache(cache_root: str | Path, key: str) -> Path | None:
    """The complete cache for key, if any."""
    cache_dir = Path(cache_root) / key
    return cache_dir if (cache_dir / "manifest.json").exists() else None


class DamagedCache(ValueError):
    """A cache whose manifest or parts are not what extraction wrote."""


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


#: Manifest keys every reader relies on.
MANIFEST_KEYS = ("key", "layers", "parts")


def read_manifest(cache_dir: str | Path, verify: bool = False) -> dict:
    """The cache's manifest, once its parts are checked against it: each one there with the
    size extraction wrote (cheap), and with verify its SHA-256 too (reads every byte).
    Caches written before the manifest recorded them are checked for presence only."""
    cache_dir = Path(cache_dir)
    path = cache_dir / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{cache_dir} is not a complete activation cache (no manifest.json): "
            "run `sae-sweep extract` again to rebuild it"
        )
    rebuild = "run `sae-sweep extract --rebuild` with its config to build it again"
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DamagedCache(f"{path} is not valid JSON ({e}): {rebuild}") from None
    missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DamagedCache(f"{path} lacks {', '.join(missing)}: {rebuild}")
    recorded = manifest.get("part_files", {})
    for part in manifest["parts"]:
        file = cache_dir / part
        if not file.is_file():
            raise DamagedCache(f"activation cache {cache_dir}: part {part} is missing: {rebuild}")
        want = recorded.get(part)
        if want is None:
            continue
        size = file.stat().st_size
        if size != want["bytes"]:
            raise DamagedCache(
                f"activation cache {cache_dir}: part {part} holds {size} bytes, not the "
                f"{want['bytes']} written: {rebuild}"
            )
        if verify and file_sha256(file) != want["sha256"]:
            raise DamagedCache(
                f"activation cache {cache_dir}: part {part} does not match its checksum: {rebuild}"
            )
    return manifest


def is_val(row_ids: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """The validation split, by image (hash of row id), never by token: the one rule that
    training and analysis both use."""
    return unit_hash(row_ids, seed) < val_fraction


def _check_split(split: Split) -> None:
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be train, val or all (got {split!r})")


def _split_table(cache_dir, columns: list[str], split: Split, val_fraction: float, seed: int):
    _check_split(split)
    manifest = read_manifest(cache_dir)
    table = read_columns(cache_dir, manifest["parts"], columns)
    if split == "all":
        return table
    val = is_val(table["row_id"].to_numpy(), val_fraction, seed)
    return table.filter(pa.array(val if split == "val" else ~val))


def _check_layer(cache_dir, layer: int, split: Split = "all") -> dict:
    """The cache's manifest, once layer and split are known to be valid."""
    _check_split(split)
    manifest = read_manifest(cache_dir)
    if layer not in manifest["layers"]:
        raise KeyError(f"layer {layer} is not in cache {cache_dir} (layers: {manifest['layers']})")
    return manifest


def layer_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A layer column's fixed-shape tensors as one (images, T, d) array in the cache dtype
    (T = 1 in `cls` mode): the one reader of the cache's layer columns."""
    shape = column.type.shape
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    flat = [c.storage.flatten().to_numpy(zero_copy_only=False) for c in chunks]
    if not flat:
        flat = [np.zeros(0, column.type.value_type.to_pandas_dtype())]
    values = np.concatenate(flat)
    if not np.isfinite(values).all():  # checked when written too: this is a damaged cache
        raise DamagedCache(
            "the activation cache holds non-finite values (NaN or inf), which extraction "
            "never writes: run `sae-sweep extract --rebuild` with its config"
        )
    return values.reshape(len(column), shape[0] if len(shape) == 2 else 1, shape[-1])


def load_layer(cache_dir, layer: int, split: Split = "train", val_fraction=0.05, seed=0):
    """One layer's activations in the cache dtype, rows ordered by row id: (N, d) in `cls`
    mode, (N * T, d) in `all` mode. The split is by image (is_val), never by token."""
    _check_layer(cache_dir, layer, split)
    column = f"layer_{layer}"
    values = layer_values(_split_table(cache_dir, [column], split, val_fraction, seed)[column])
    return values.reshape(-1, values.shape[-1])


def load_labels(cache_dir, split: Split = "train", val_fraction: float = 0.05, seed: int = 0):
    """Labels (int64, -1: none) per image, in load_layer's image order."""
    return _split_table(cache_dir, ["label"], split, val_fraction, seed)["label"].to_numpy()


def load_row_ids(cache_dir, split: Split = "train", val_fraction: float = 0.05, seed: int = 0):
    """Row ids (int64) per image, in load_layer's image order."""
    return _split_table(cache_dir, [], split, val_fraction, seed)["row_id"].to_numpy()


def iter_layer(
    cache_dir: str | Path, layer: int, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray, torch.Tensor]]:
    """(row_id_B, label_B, x_BTD float32) batches of one cached layer (every image), T = 1
    in `cls` mode.

    batch_size counts inputs: B * T <= batch_size, with at least one whole image per batch
    (an image's tokens are never split). Parts are read one at a time and regrouped (a part
    holds one extraction batch, often of another size)."""
    import torch  # here, not at the top: a cache lookup (`extract` on a hit) loads no torch

    manifest = _check_layer(cache_dir, layer)
    column = f"layer_{layer}"
    images = None
    pending, size = [], 0
    for part in manifest["parts"]:
        reader = pq.ParquetFile(Path(cache_dir) / part)
        if images is None:  # T from the column's shape
            shape = reader.schema_arrow.field(column).type.shape
            images = max(1, batch_size // (shape[0] if len(shape) == 2 else 1))
        for batch in reader.iter_batches(images, columns=["row_id", "label", column]):
            x = layer_values(batch.column(column)).astype(np.float32)
            pending.append((batch.column("row_id").to_numpy(), batch.column("label").to_numpy(), x))
            size += batch.num_rows
            while size >= images:
                row, label, x = (np.concatenate(a) for a in zip(*pending))
                yield row[:images], label[:images], torch.from_numpy(x[:images])
                pending = [(row[images:], label[images:], x[images:])]
                size -= images
    if size:
        row, label, x = (np.concatenate(a) for a in zip(*pending))
        yield row, label, torch.from_numpy(x)


ARRAY_DIR_ENV = "SAE_ARRAY_DIR"
"""Where each node keeps its uncompressed layer files (default: $XDG_CACHE_HOME, else
~/.cache, /clip-sae-arrays)."""


def private_dir(path: Path) -> Path:
    """`path` created 0700, and refused when it belongs to another user or others may write to
    it: trials map its files as activations, so whoever can write there chooses the data (the
    old default, a shared /tmp folder reused as found, let any local user do so)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to another user (uid {st.st_uid}): set {ARRAY_DIR_ENV} to a "
            "directory of your own"
        )
    if st.st_mode & 0o022:
        raise PermissionError(
            f"{path} is writable by others (mode {st.st_mode & 0o777:o}): chmod 700 it, or set "
            f"{ARRAY_DIR_ENV} to a private directory"
        )
    return path


def layer_file(
    cache_dir: str | Path,
    layer: int,
    split: Split = "train",
    val_fraction: float = 0.05,
    seed: int = 0,
    root: str | Path | None = None,
) -> Path:
    """An uncompressed .npy of load_layer's array, written once per node, part by part.

    It lives on the node (`root`, $SAE_ARRAY_DIR, or the user's cache directory), not beside the
    Parquet cache on shared storage: every trial on the node reads the same file, so the
    kernel's page cache holds its rows once for all of them. Writing holds one part in memory.
    """
    cache_dir = Path(cache_dir)
    manifest = _check_layer(cache_dir, layer, split)
    home_cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = Path(root or os.environ.get(ARRAY_DIR_ENV) or Path(home_cache) / "clip-sae-arrays")
    directory = private_dir(private_dir(root) / manifest["key"])
    path = directory / f"layer_{layer}-{split}-{val_fraction}-{seed}.npy"
    if path.exists():
        return path
    with open(directory / ".lock", "a") as lock:  # "a": opening never truncates it
        fcntl.flock(lock, fcntl.LOCK_EX)  # trials starting together: one writes, others wait
        if not path.exists():
            _write_layer_file(cache_dir, manifest, layer, split, val_fraction, seed, path)
    return path


def _write_layer_file(cache_dir, manifest, layer, split, val_fraction, seed, path: Path) -> None:
    column = f"layer_{layer}"
    ids = load_row_ids(cache_dir, split, val_fraction, seed)
    d, tokens = manifest["d_model"], manifest["tokens_per_image"]
    dtype = np.dtype(manifest["dtype"])
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    image_bytes = tokens * d * dtype.itemsize
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
    with open(tmp, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {**header, "shape": (len(ids) * tokens, d)})
        start = f.tell()
        # The full size as a sparse file: rows go in with positioned writes below, which pass
        # through the page cache instead of this process's memory.
        f.truncate(start + len(ids) * image_bytes)
    fd = os.open(tmp, os.O_WRONLY)
    try:
        for part in manifest["parts"]:
            table = pq.read_table(Path(cache_dir) / part, columns=["row_id", column])
            part_ids = table["row_id"].to_numpy()
            pos = np.searchsorted(ids, part_ids)
            mine = (pos < len(ids)) & (ids[np.minimum(pos, len(ids) - 1)] == part_ids)
            if not mine.any():
                continue
            values = layer_values(table[column]).reshape(len(part_ids), -1)
            order = np.flatnonzero(mine)[np.argsort(pos[mine])]
            # one write per run of consecutive images
            runs = np.split(order, np.flatnonzero(np.diff(pos[order]) != 1) + 1)
            for run in runs:
                os.pwrite(
                    fd,
                    values[run].astype(dtype, copy=False).tobytes(),
                    start + int(pos[run[0]]) * image_bytes,
                )
        os.close(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


class RowFile:
    """The rows of an .npy file for training: `rows[index]` reads just those rows into a new
    tensor with positioned reads, one per run of consecutive rows.

    The reads go through the node's page cache, shared by every trial reading the file, and
    nothing of the file stays in this process's memory: its peak is one batch. (A memory map
    would not bound it: a fault maps a whole large folio of the page cache, and a batch of
    random rows touched most of a 4 GB file's pages.) A drop-in for an (N, d) tensor where the
    trainer reads batches (shape, dtype, len, [ ]).
    """

    def __init__(self, path: str | Path):
        import torch

        self.path = Path(path)
        with open(self.path, "rb") as f:
            if np.lib.format.read_magic(f) == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            self._offset = f.tell()
        if fortran or len(shape) != 2:
            raise ValueError(f"{self.path}: expected a 2-D C-ordered array, got {shape}")
        self.np_dtype = dtype
        self.shape = torch.Size(shape)
        self.dtype = torch.from_numpy(np.empty(0, dtype)).dtype
        self._row_bytes = shape[1] * dtype.itemsize
        self._fd = os.open(self.path, os.O_RDONLY)
        weakref.finalize(self, os.close, self._fd)  # closed when this object goes

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, slice):
            index = np.arange(*index.indices(len(self)))
        index = np.asarray(index, np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows of {self.path}")
        order = np.argsort(index, kind="stable")  # read in file order
        wanted = index[order]
        rows = np.empty((len(index), self.shape[1]), self.np_dtype)
        runs = np.flatnonzero(np.diff(wanted) != 1) + 1
        for lo, hi in zip(np.r_[0, runs], np.r_[runs, len(wanted)]):
            want = (hi - lo) * self._row_bytes
            got = os.preadv(
                self._fd, [rows[lo:hi]], self._offset + int(wanted[lo]) * self._row_bytes
            )
            if got != want:
                raise OSError(f"{self.path}: short read ({got} of {want} bytes): file truncated?")
        if not np.array_equal(order, np.arange(len(order))):
            rows[order] = rows.copy()  # back to the asked order
        import torch

        return torch.from_numpy(rows)
