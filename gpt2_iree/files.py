"""Outputs written whole or not at all: every file goes to a temporary name
beside its destination and is renamed into place, so an interrupted run
never leaves a half-written file that looks finished. And output paths
checked before the work that makes their content, so none of it is lost to
a typo in a directory name."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Callable

from gpt2_iree.errors import Gpt2IreeError


class OutputError(Gpt2IreeError):
    """An output path that cannot be written, found before any work is done."""


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it to `path`.

    The temporary name is unique (two writers of one file never share it), and
    the data is on disk (fsync) before the rename, so a crash leaves the old
    file or the new one, never a renamed file whose blocks were not written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # Created exclusively, with the mode the umask gives (mkstemp's would be 0600).
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = tmp.stat().st_mode & 0o777
    try:
        write(tmp)
        # A writer that makes the file anew keeps that mode too (safetensors'
        # save_file creates it 0600).
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_output_file(option: str, path: Path) -> Path:
    """Refuse, before any work, an output file that could not be written: its
    directory must exist and be writable, and the path must not be a directory.
    `option` names it in the message (`--out`)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a directory; give a file name")
    _check_writable_dir(option, path, path.resolve().parent)
    return path


def check_output_dir(option: str, path: Path) -> Path:
    """Refuse, before any work, an output directory that could not be written:
    it must be a writable directory, or not exist in a writable one."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file; give a directory")
    _check_writable_dir(option, path, path.resolve() if path.is_dir() else path.resolve().parent)
    return path


def _check_writable_dir(option: str, path: Path, directory: Path) -> None:
    """Create and remove a file in `directory`: permissions alone do not tell
    (root passes every check, and a read-only file system fails none)."""
    if not directory.is_dir():
        raise OutputError(f"{option} {path}: the directory {directory} does not exist")
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise OutputError(f"{option} {path}: cannot write in {directory} ({err.strerror})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
