"""The assets stage of a Hub model, through doit, against a loopback fake Hub.

The fake serves the tiny model's files as `openai-community/gpt2` at the
pinned revision, so the whole graph runs on real downloads in seconds.
"""

import json
from pathlib import Path

import pytest
from doit_runner import doit, ran
from fake_hub import FakeHub, serve

from gpt2_iree import download, models

GPT2 = models.HUB_MODELS["gpt2"]
# The stand-in has tiny's 128 positions, not GPT-2's 1024: the context says so.
GPT2_AS_TINY = ("model=gpt2", "targets=cpu", "context=128")
ASSETS = Path("assets/gpt2")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    files = tmp_path_factory.mktemp("tiny-files")
    models.write_tiny_model(files)
    with serve(FakeHub(GPT2.repo_id, GPT2.revision)) as fake:
        for name in models.MODEL_FILES:
            fake.add(name, (files / name).read_bytes(), lfs=name.endswith(".safetensors"))
        yield fake


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


@pytest.fixture(autouse=True)
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(download, "RETRY_BASE_DELAY_S", 0.0)


def test_downloads_the_pinned_revision_and_builds_through_it(hub):
    code, results, errors = doit(*GPT2_AS_TINY, f"hf_endpoint={hub.url}")
    assert code == 0, errors
    assert ran(results) == {"assets", "toolchain", "export", "compile:cpu", "verify:cpu"}
    lock = json.loads((ASSETS / "assets.lock.json").read_text())
    assert (lock["repo_id"], lock["revision"]) == (GPT2.repo_id, GPT2.revision)
    assert sorted(lock["files"]) == sorted(models.MODEL_FILES)
    assert json.loads(Path("build/gpt2/pretrained-b1-k64-c128-s128-adafactor/verify-cpu.json").read_text())["passed"]


def test_second_run_asks_the_hub_nothing(hub):
    before = len(hub.requests)
    code, results, _ = doit(*GPT2_AS_TINY, f"hf_endpoint={hub.url}")
    assert code == 0 and ran(results) == set()
    assert len(hub.requests) == before


def test_a_deleted_file_is_fetched_again_alone(hub):
    (ASSETS / "tokenizer.json").unlink()
    before = len(hub.requests)
    code, results, _ = doit(*GPT2_AS_TINY, f"hf_endpoint={hub.url}")
    assert code == 0
    assert ran(results) == {"assets"}  # the same bytes again: nothing downstream changes
    fetched = [path for path, _ in hub.requests[before:] if "/resolve/" in path]
    assert fetched == [f"/{GPT2.repo_id}/resolve/{GPT2.revision}/tokenizer.json"]


def test_a_missing_file_fails_the_stage_with_the_url(hub):
    (ASSETS / "config.json").unlink()
    hub.not_found.add("config.json")
    try:
        code, results, errors = doit(*GPT2_AS_TINY, f"hf_endpoint={hub.url}")
    finally:
        hub.not_found.discard("config.json")
    assert code != 0 and results["assets"] == "fail"
    assert "404" in errors["assets"] and f"{hub.url}/{GPT2.repo_id}/resolve/" in errors["assets"]
    assert not (ASSETS / "config.json").exists() and not list(ASSETS.glob("*.part"))
