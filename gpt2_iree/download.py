"""Fetch files from a pinned Hugging Face Hub revision, verified and resumable.

Model weights are large (GPT-2 XL is ~6 GB) and networks fail, so this module
is built around three guarantees:

* Nothing unverified ever sits at a final path.  Bytes stream into
  ``<name>.part``; only after the hash matches what the Hub published for that
  revision is the file moved into place with ``os.replace`` (atomic).
* Interrupted transfers resume.  A retry (or a later run) continues the
  ``.part`` file with an HTTP ``Range`` request instead of starting over.
* Repeated runs are free.  ``assets.lock.json`` records the size and sha256 of
  every verified file; when all requested files still match it, no network
  request is made at all, so a populated directory works offline.

Only the standard library, ``requests`` and ``tqdm`` are used, so downloading
never pulls in the heavy compiler/runtime dependencies.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.parse
from pathlib import Path
from typing import Callable, TypeVar

import requests
from tqdm import tqdm

from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import write_json

HF_ENDPOINT_ENV = "GPT2_IREE_HF_ENDPOINT"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
LOCK_FILENAME = "assets.lock.json"

# Retry policy for transient failures: MAX_ATTEMPTS tries in total, waiting
# RETRY_BASE_DELAY_S, then twice that, and so on between them.  Tests set the
# delay to 0 to stay fast.
MAX_ATTEMPTS = 4
RETRY_BASE_DELAY_S = 0.5

# (connect, read) timeouts.  The read timeout applies per chunk, not to the
# whole transfer, so it does not limit how long a large file may take.
REQUEST_TIMEOUT_S = (10, 60)
# Bytes read per step.  When a connection drops, the chunk being read is lost
# and re-requested, so a resume repeats at most this much.
CHUNK_SIZE = 1 << 20
MIRROR_HINT = f"set {HF_ENDPOINT_ENV} to a mirror"

T = TypeVar("T")


class DownloadError(Gpt2IreeError):
    """A file could not be fetched or verified; the message says what to do next."""


class _TransientError(Exception):
    """A failure worth retrying (server overload, truncated body); internal only."""


# Statuses that mean "this will not work no matter how often we ask".
_NOT_FOUND_STATUSES = {401, 403, 404}
# Statuses that mean "the server is busy or broken right now; ask again later".
_TRANSIENT_STATUSES = {429, 500, 502, 503, 504}
_TRANSIENT_EXCEPTIONS = (
    _TransientError,
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,  # raised for a body cut short
)


def hub_endpoint(override: str | None = None) -> str:
    """Return the Hub base URL: ``override``, else $GPT2_IREE_HF_ENDPOINT, else
    huggingface.co; refused, naming where it came from, unless it is an http(s) URL."""
    endpoint = override or os.environ.get(HF_ENDPOINT_ENV) or DEFAULT_HF_ENDPOINT
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        given = "hf_endpoint" if override else HF_ENDPOINT_ENV
        raise DownloadError(f"{given}={endpoint!r} is not an http(s) URL; e.g. https://hf-mirror.com")
    return endpoint.rstrip("/")


def fetch_repo_files(
    repo_id: str,
    revision: str,
    filenames: list[str],
    dest_dir: Path,
    endpoint: str | None = None,
    progress: bool = True,
) -> dict:
    """Make ``dest_dir/<name>`` a verified copy of each file at ``repo_id@revision``.

    Files already recorded in ``dest_dir/assets.lock.json`` with a matching size
    and sha256 are kept as they are.  Returns the lock contents:
    ``{"repo_id", "revision", "commit", "files": {name: {"size", "sha256"}}}``.
    Raises ``DownloadError`` on any failure.
    """
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    lock_path = dest_dir / LOCK_FILENAME
    lock = _read_lock(lock_path, repo_id, revision)

    missing = [name for name in filenames if not _matches_lock(dest_dir / name, lock["files"].get(name))]
    if not missing:
        return lock

    base = hub_endpoint(endpoint)
    with requests.Session() as session:
        siblings = _fetch_revision_files(session, base, repo_id, revision, lock)
        absent = [name for name in missing if name not in siblings]
        if absent:
            raise DownloadError(
                f"{repo_id}@{revision} has no file(s) {absent}. "
                f"Files in that revision: {sorted(siblings)}. Check the requested file names."
            )
        for name in missing:
            url = f"{base}/{repo_id}/resolve/{revision}/{name}"
            lock["files"][name] = _download_verified(session, url, siblings[name], dest_dir / name, progress)
            # Record each file as soon as it is verified, so a failure on a
            # later file does not force this one to be fetched again.
            write_json(lock_path, lock)
    return lock


def _read_lock(lock_path: Path, repo_id: str, revision: str) -> dict:
    """Load the lock if it describes this repo and revision; otherwise start an empty one."""
    empty = {"repo_id": repo_id, "revision": revision, "commit": None, "files": {}}
    try:
        lock = json.loads(lock_path.read_text())
    except FileNotFoundError:
        return empty
    except (OSError, ValueError):
        # An unreadable lock only costs a re-download; never trust it.
        return empty
    if lock.get("repo_id") != repo_id or lock.get("revision") != revision:
        return empty
    return lock


def _matches_lock(path: Path, entry: dict | None) -> bool:
    """True if ``path`` exists with exactly the size and sha256 the lock recorded."""
    if entry is None or not path.is_file() or path.stat().st_size != entry["size"]:
        return False
    return _file_hashes(path)["sha256"] == entry["sha256"]


def _fetch_revision_files(
    session: requests.Session, base: str, repo_id: str, revision: str, lock: dict
) -> dict[str, dict]:
    """Ask the Hub which files exist at ``revision``; returns ``{rfilename: sibling}``.

    ``?blobs=true`` makes the API include each file's size, git blob id and,
    for LFS files, the sha256 of the real content, which is what we verify.
    Also stores the resolved commit sha in ``lock``.
    """
    url = f"{base}/api/models/{repo_id}/revision/{revision}?blobs=true"

    def attempt() -> dict:
        response = session.get(url, timeout=REQUEST_TIMEOUT_S)
        _raise_for_status(response, url, what=f"Model {repo_id} at revision {revision}")
        return response.json()

    try:
        info = _with_retries(attempt, url)
    except ValueError as error:  # the body was not JSON: not a Hub API
        raise DownloadError(
            f"The Hub API at {url} did not return JSON ({error}). "
            f"Check that {base} is a Hugging Face Hub endpoint, or {MIRROR_HINT}."
        ) from error
    lock["commit"] = info.get("sha")
    return {sibling["rfilename"]: sibling for sibling in info.get("siblings", [])}


def _download_verified(
    session: requests.Session, url: str, sibling: dict, final_path: Path, progress: bool
) -> dict:
    """Download ``url`` to ``final_path`` via a ``.part`` file; returns its lock entry."""
    part_path = final_path.with_name(final_path.name + ".part")
    final_path.parent.mkdir(parents=True, exist_ok=True)
    lfs = sibling.get("lfs")
    expected_size = lfs["size"] if lfs else sibling.get("size")

    # A .part longer than the file cannot be resumed; one of exactly the right
    # size (e.g. the process died before verifying) needs no more bytes.
    if part_path.exists() and expected_size is not None and part_path.stat().st_size > expected_size:
        part_path.unlink()
    if not (part_path.exists() and part_path.stat().st_size == expected_size):
        _with_retries(lambda: _stream_to_part(session, url, part_path, final_path.name, progress), url)

    hashes = _file_hashes(part_path)
    if lfs:
        algorithm, expected, actual = "sha256", lfs["sha256"], hashes["sha256"]
    else:
        algorithm, expected, actual = "git blob sha1", sibling.get("blobId"), hashes["git_sha1"]
    if actual != expected:
        part_path.unlink()
        raise DownloadError(
            f"Hash mismatch for {final_path.name} from {url}: expected {algorithm} {expected}, "
            f"got {actual}. The partial file was deleted; run again to re-download, "
            f"or {MIRROR_HINT} if this server serves altered files."
        )
    os.replace(part_path, final_path)
    return {"size": hashes["size"], "sha256": hashes["sha256"]}


def _stream_to_part(
    session: requests.Session, url: str, part_path: Path, label: str, progress: bool
) -> None:
    """One download attempt: continue ``part_path`` from its current length.

    Raises ``_TransientError`` (or a requests connection error) when a retry
    could succeed, ``DownloadError`` when it could not.
    """
    offset = part_path.stat().st_size if part_path.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with session.get(url, headers=headers, stream=True, timeout=REQUEST_TIMEOUT_S) as response:
        _raise_for_status(response, url, what=label)
        if response.status_code == 206:
            served_from = _content_range_start(response.headers.get("Content-Range", ""))
            if served_from != offset:
                part_path.unlink()
                raise _TransientError(f"server resumed at byte {served_from}, expected {offset}")
        else:
            offset = 0  # 200: the server sent the whole file, so start the .part over.

        body_length = response.headers.get("Content-Length")
        received = 0
        with open(part_path, "ab" if offset else "wb") as part, tqdm(
            total=offset + int(body_length) if body_length else None,
            initial=offset,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
        ) as bar:
            for chunk in response.iter_content(CHUNK_SIZE):
                part.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))

    # Some transports end a cut-off body quietly instead of raising; the
    # declared length is the only way to tell it was incomplete.
    if body_length is not None and received < int(body_length):
        raise _TransientError(f"connection closed after {received} of {body_length} bytes")


def _content_range_start(content_range: str) -> int | None:
    """First byte offset of a ``Content-Range: bytes START-END/TOTAL`` header."""
    try:
        return int(content_range.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _raise_for_status(response: requests.Response, url: str, what: str) -> None:
    """Turn an HTTP error status into a retryable or a final error."""
    status = response.status_code
    if status in _NOT_FOUND_STATUSES:
        raise DownloadError(
            f"{what} not found (HTTP {status}): {url}. "
            f"Check the model id and revision, or {MIRROR_HINT}."
        )
    if status in _TRANSIENT_STATUSES:
        raise _TransientError(f"HTTP {status}")
    if status >= 400:
        raise DownloadError(f"{what} failed (HTTP {status}): {url}. Check the URL, or {MIRROR_HINT}.")


def _with_retries(action: Callable[[], T], url: str) -> T:
    """Run ``action``, retrying transient failures with exponential backoff."""
    for attempt in range(MAX_ATTEMPTS):
        try:
            return action()
        except _TRANSIENT_EXCEPTIONS as error:
            last_error = error
            if attempt + 1 < MAX_ATTEMPTS:
                time.sleep(RETRY_BASE_DELAY_S * 2**attempt)
    raise DownloadError(
        f"Could not download {url} after {MAX_ATTEMPTS} attempts (last error: {last_error}). "
        f"Check your network connection, or {MIRROR_HINT}."
    )


def _file_hashes(path: Path) -> dict:
    """Size, sha256 and git blob sha1 of a file, in one pass over its bytes.

    The Hub identifies regular (non-LFS) files by their git blob id, which is
    sha1 over the header ``b"blob <size>\\0"`` followed by the content.
    """
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    git_sha1 = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_SIZE):
            sha256.update(chunk)
            git_sha1.update(chunk)
    return {"size": size, "sha256": sha256.hexdigest(), "git_sha1": git_sha1.hexdigest()}


def lock_local_files(src_dir: Path, filenames: list[str], lock_path: Path, source: str) -> dict:
    """Record the size and sha256 of files made or given locally (the `tiny`
    model, a user's model directory) in the same lock format as a download."""
    lock = {"source": source, "files": {}}
    for name in filenames:
        hashes = _file_hashes(Path(src_dir) / name)
        lock["files"][name] = {"size": hashes["size"], "sha256": hashes["sha256"]}
    Path(lock_path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(lock_path), lock)
    return lock
