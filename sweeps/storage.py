"""Sweep storage that is a local directory or a URI (s3://, gs://), as Tune's storage_path.

On several nodes it must be shared: an NFS mount every node sees, or an object store. URIs go
through pyarrow.fs, the filesystem layer Tune itself uses, so credentials come from the same
place (an instance profile, the usual environment variables).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

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


def read_text(path: str) -> str | None:
    """A file's text, or None when it does not exist."""
    fs, inner = _filesystem(path)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(inner) as f:
        return f.read().decode()


def delete_dir(path: str) -> None:
    fs, inner = _filesystem(path)
    fs.delete_dir(inner)
