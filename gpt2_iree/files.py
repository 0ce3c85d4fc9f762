"""Outputs written whole or not at all: every file goes to a temporary name
beside its destination and is renamed into place, so an interrupted run
never leaves a half-written file that looks finished."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Callable


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
    try:
        write(tmp)
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
