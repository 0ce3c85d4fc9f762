"""Tests for gpt2_iree.download against a loopback fake of the Hugging Face Hub.

The fake hub is a real HTTP server on 127.0.0.1, so these tests exercise the
actual requests/streaming code paths (Range requests, dropped sockets, status
codes) without touching the internet.
"""

from __future__ import annotations

import hashlib
import json
import socket

import pytest
from fake_hub import FakeHub, serve

from gpt2_iree import download
from gpt2_iree.download import DownloadError, fetch_repo_files

REPO = "test-org/tiny-gpt2"
REVISION = "0123456789abcdef0123456789abcdef01234567"
COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def hub():
    with serve(FakeHub(REPO, REVISION, COMMIT)) as state:
        yield state


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch):
    monkeypatch.setattr(download, "RETRY_BASE_DELAY_S", 0.0)


def _fetch(hub: FakeHub, dest, names: list[str], **kwargs) -> dict:
    kwargs.setdefault("endpoint", hub.url)
    return fetch_repo_files(REPO, REVISION, names, dest, progress=False, **kwargs)


def _leftovers(dest) -> list[str]:
    return sorted(p.name for p in dest.iterdir() if p.name.endswith(".part"))


def test_downloads_verifies_and_writes_lock(hub, tmp_path):
    config = b'{"n_layer": 2}\n'
    weights = bytes(range(256)) * 1000
    hub.add("config.json", config)
    hub.add("model.safetensors", weights, lfs=True)

    lock = _fetch(hub, tmp_path, ["config.json", "model.safetensors"])

    assert (tmp_path / "config.json").read_bytes() == config
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    assert _leftovers(tmp_path) == []
    expected_files = {
        "config.json": {"size": len(config), "sha256": hashlib.sha256(config).hexdigest()},
        "model.safetensors": {"size": len(weights), "sha256": hashlib.sha256(weights).hexdigest()},
    }
    assert lock == {"repo_id": REPO, "revision": REVISION, "commit": COMMIT, "files": expected_files}
    assert json.loads((tmp_path / download.LOCK_FILENAME).read_text()) == lock


def test_resumes_after_dropped_connection(hub, tmp_path, monkeypatch):
    # Small chunks so that most of the bytes sent before the drop reach the
    # .part file; the chunk in flight when the socket closes is lost.
    monkeypatch.setattr(download, "CHUNK_SIZE", 4096)
    weights = bytes(range(256)) * 4000
    hub.add("model.safetensors", weights, lfs=True)
    hub.drop_after_first["model.safetensors"] = 300_000

    _fetch(hub, tmp_path, ["model.safetensors"])

    first, second = hub.file_requests("model.safetensors")
    assert "Range" not in first
    resumed_from = int(second["Range"].removeprefix("bytes=").removesuffix("-"))
    assert 300_000 - 4096 < resumed_from <= 300_000
    assert (tmp_path / "model.safetensors").read_bytes() == weights


def test_hash_mismatch_raises_and_leaves_nothing_behind(hub, tmp_path):
    weights = b"genuine weights" * 100
    hub.add("model.safetensors", weights, lfs=True)
    hub.served_instead["model.safetensors"] = b"tampered weight" * 100  # same length

    with pytest.raises(DownloadError) as excinfo:
        _fetch(hub, tmp_path, ["model.safetensors"])

    message = str(excinfo.value)
    assert "model.safetensors" in message
    assert hashlib.sha256(weights).hexdigest() in message
    assert not (tmp_path / "model.safetensors").exists()
    assert _leftovers(tmp_path) == []


def test_plain_file_is_verified_by_git_blob_sha1(hub, tmp_path):
    hub.add("vocab.json", b'{"a": 0}')
    hub.served_instead["vocab.json"] = b'{"b": 0}'

    with pytest.raises(DownloadError, match="git blob sha1"):
        _fetch(hub, tmp_path, ["vocab.json"])
    assert not (tmp_path / "vocab.json").exists()


def test_404_fails_immediately_with_url(hub, tmp_path):
    hub.add("config.json", b"{}")
    hub.not_found.add("config.json")

    with pytest.raises(DownloadError) as excinfo:
        _fetch(hub, tmp_path, ["config.json"])

    message = str(excinfo.value)
    assert "404" in message
    assert f"{hub.url}/{REPO}/resolve/{REVISION}/config.json" in message
    assert download.HF_ENDPOINT_ENV in message
    assert len(hub.file_requests("config.json")) == 1  # no retries


def test_retries_after_503(hub, tmp_path):
    hub.add("config.json", b'{"n_layer": 2}')
    hub.fail_once_503.add("config.json")

    _fetch(hub, tmp_path, ["config.json"])

    assert len(hub.file_requests("config.json")) == 2
    assert (tmp_path / "config.json").read_bytes() == b'{"n_layer": 2}'


def test_second_call_makes_no_request(hub, tmp_path):
    hub.add("config.json", b"{}")
    hub.add("model.safetensors", b"\x00" * 1000, lfs=True)
    names = ["config.json", "model.safetensors"]
    first_lock = _fetch(hub, tmp_path, names)
    requests_after_first_call = len(hub.requests)

    second_lock = _fetch(hub, tmp_path, names)

    assert len(hub.requests) == requests_after_first_call
    assert second_lock == first_lock


def test_changed_local_file_is_downloaded_again(hub, tmp_path):
    hub.add("config.json", b'{"n_layer": 2}')
    _fetch(hub, tmp_path, ["config.json"])
    (tmp_path / "config.json").write_bytes(b'{"n_layer": 9}')

    _fetch(hub, tmp_path, ["config.json"])

    assert len(hub.file_requests("config.json")) == 2
    assert (tmp_path / "config.json").read_bytes() == b'{"n_layer": 2}'


def test_unknown_file_lists_available_files(hub, tmp_path):
    hub.add("config.json", b"{}")
    hub.add("vocab.json", b"{}")

    with pytest.raises(DownloadError) as excinfo:
        _fetch(hub, tmp_path, ["config.json", "pytorch_model.bin"])

    message = str(excinfo.value)
    assert "pytorch_model.bin" in message
    assert "config.json" in message and "vocab.json" in message
    assert hub.file_requests("config.json") == []  # fails before downloading anything


def test_endpoint_from_environment(hub, tmp_path, monkeypatch):
    monkeypatch.setenv(download.HF_ENDPOINT_ENV, hub.url + "/")
    hub.add("config.json", b"{}")

    _fetch(hub, tmp_path, ["config.json"], endpoint=None)

    assert len(hub.file_requests("config.json")) == 1
    assert (tmp_path / "config.json").read_bytes() == b"{}"


def test_hub_endpoint_precedence(monkeypatch):
    monkeypatch.delenv(download.HF_ENDPOINT_ENV, raising=False)
    assert download.hub_endpoint() == "https://huggingface.co"
    monkeypatch.setenv(download.HF_ENDPOINT_ENV, "https://mirror.example/")
    assert download.hub_endpoint() == "https://mirror.example"
    assert download.hub_endpoint("http://override.example/") == "http://override.example"
    with pytest.raises(download.DownloadError, match="hf_endpoint='notaurl' is not an http\\(s\\) URL"):
        download.hub_endpoint("notaurl")
    monkeypatch.setenv("GPT2_IREE_HF_ENDPOINT", "mirror.example")
    with pytest.raises(download.DownloadError, match="GPT2_IREE_HF_ENDPOINT='mirror.example' is not an http"):
        download.hub_endpoint()


def test_unreachable_endpoint_names_url_and_mirror_variable(tmp_path):
    # Bind then close a loopback port so nothing is listening on it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"

    with pytest.raises(DownloadError) as excinfo:
        fetch_repo_files(REPO, REVISION, ["config.json"], tmp_path, endpoint=dead_endpoint, progress=False)

    message = str(excinfo.value)
    assert dead_endpoint in message
    assert download.HF_ENDPOINT_ENV in message


@pytest.mark.network
def test_real_hub_config(tmp_path):
    gpt2_main = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
    lock = fetch_repo_files("openai-community/gpt2", gpt2_main, ["config.json"], tmp_path, progress=False)

    assert json.loads((tmp_path / "config.json").read_text())["n_layer"] == 12
    assert lock["commit"] == gpt2_main
