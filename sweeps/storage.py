"""Sweep storage that is a local directory or a URI (s3://, gs://), as Tune's storage_path.

On several nodes it must be shared: an NFS mount every node sees, or an object store. URIs go
through pyarrow.fs, the filesystem layer Tune itself uses, so credentials come from the same
place (an instance profile, the usual environment variables).
"""

from __future__ import annotations

import io
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    # pathlib would fold "s3://b" into "s3:/b".
    return "/".join([base.rstrip("/"), *parts]) if is_uri(base) else str(Path(base, *parts))


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return pafs.FileSystem.from_uri(path) if is_uri(path) else (pafs.LocalFileSystem(), path)


def exists(path: str) -> bool:
    fs, inner = _filesystem(path)
    return fs.get_file_info(inner).type != pafs.FileType.NotFound


def write_dir(dest: str, write: Callable[[Path], object]) -> None:
    """`write(directory)` fills dest: in place when local, else in a temporary directory that
    is then uploaded."""
    if not is_uri(dest):
        write(Path(dest))
        return
    fs, inner = _filesystem(dest)
    fs.create_dir(inner)  # object stores need none, file:// (a local or NFS path) does
    with tempfile.TemporaryDirectory() as tmp:
        write(Path(tmp))
        pafs.copy_files(tmp, inner, destination_filesystem=fs)


def download_dir(src: str, dest: str | Path) -> None:
    pafs.copy_files(src, str(dest))


def local_dir(path: str) -> str:
    """A directory on this machine holding `path`'s files: `path` itself, or for a URI a
    temporary copy (left for the caller's lifetime)."""
    if not is_uri(path):
        return path
    local = Path(tempfile.mkdtemp(prefix="sweeps-")) / Path(path).name
    download_dir(path, local)
    return str(local)


def read_text(path: str) -> str | None:
    """A file's text, or None when it does not exist."""
    fs, inner = _filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def write_text(path: str, text: str) -> None:
    """Replace a small file whole: readers see the old text or the new, never a torn one (a
    local rename; object stores write whole objects)."""
    if not is_uri(path):
        tmp = Path(f"{path}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return
    fs, inner = _filesystem(path)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def delete_dir(path: str) -> None:
    fs, inner = _filesystem(path)
    fs.delete_dir(inner)


class _RenameOnClose(io.FileIO):
    """A file written beside its destination and renamed over it when closed."""

    def __init__(self, path: str):
        self.final = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # as LocalFileSystem does
        super().__init__(f"{path}.tmp-{uuid.uuid4().hex[:8]}", "wb")

    def close(self) -> None:
        if not self.closed:
            super().close()
            os.replace(self.name, self.final)


class _AtomicLocalHandler(pafs.FileSystemHandler):
    """The local filesystem, except that a written file appears whole or not at all."""

    def __init__(self):
        self.fs = pafs.LocalFileSystem()

    def __eq__(self, other):
        return isinstance(other, _AtomicLocalHandler)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return "atomic-local"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the root directory")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        with self.fs.open_input_stream(src) as f, self.open_output_stream(dest, None) as out:
            out.write(f.read())

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pa.PythonFile(_RenameOnClose(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def tune_filesystem(path: str) -> pafs.FileSystem | None:
    """The filesystem Tune should keep a sweep's state in: for a local (or NFS) directory, one
    whose files are renamed into place, so that a driver killed while Tune syncs its state
    leaves the previous file, not half of the new one (Tune's restore would then start over).
    Object stores write whole objects already: None, Tune's default."""
    return None if is_uri(path) else pafs.PyFileSystem(_AtomicLocalHandler())
