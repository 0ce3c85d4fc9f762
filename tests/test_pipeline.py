"""The doit graph, driven in-process on the tiny model from a temporary directory.

One build is shared by the tests below, which run in file order: each asserts
what a user relies on — a second run does nothing, a change re-runs only the
stages downstream of it, `doit clean` leaves nothing behind.
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from doit_runner import doit, doit_main, ran

import tasks.export
from tasks.config import LIBRARY

# With Vulkan (CI installs Mesa's lavapipe), vulkan runs with parity, and so do
# the Metal build's kernels, compiled for Vulkan by verify:metal.
TINY = ["model=tiny", "targets=cpu,metal,vulkan"]
BUILD = Path("build/tiny/pretrained-b1-k64-c128-s128-adafactor")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory for the whole module; the export stage's code is a
    copy there, so that one test can edit it without touching the package."""
    path = tmp_path_factory.mktemp("pipeline")
    shutil.copy(LIBRARY / "model.py", path / "model_copy.py")
    return path


@pytest.fixture(autouse=True)
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    sources = [workdir / "model_copy.py" if p.name == "model.py" else p for p in tasks.export.SOURCES]
    monkeypatch.setattr(tasks.export, "SOURCES", sources)


def test_first_run_builds_and_verifies_everything():
    from gpt2_iree.devices import available_devices

    code, results, _ = doit(*TINY)
    assert code == 0, results
    assert ran(results) == {"assets", "toolchain", "export", "compile:cpu", "compile:metal", "compile:vulkan",
                            "verify:cpu", "verify:metal", "verify:vulkan"}
    for name in ("gpt2.mlir", "gpt2-generate.mlir", "gpt2.irpa", "manifest.json", "gpt2-cpu.vmfb",
                 "gpt2-generate-cpu.vmfb", "gpt2-metal.vmfb", "gpt2-generate-metal.vmfb", "gpt2-vulkan.vmfb",
                 "gpt2-generate-vulkan.vmfb"):
        assert (BUILD / name).is_file(), name
    cpu = json.loads((BUILD / "verify-cpu.json").read_text())
    assert cpu["kind"] == "parity" and cpu["passed"] and cpu["tokens_equal"] and cpu["generation"]["passed"]
    metal = json.loads((BUILD / "verify-metal.json").read_text())
    vulkan = json.loads((BUILD / "verify-vulkan.json").read_text())
    if "vulkan" in available_devices():
        assert metal["kind"] == "parity-on-vulkan" and metal["tokens_equal"]
        assert metal["structure"]["checks"]["msl_source"]
        assert vulkan["kind"] == "parity" and vulkan["device"] == "vulkan" and vulkan["tokens_equal"]
        assert vulkan["generation"]["kind"] == "parity" and vulkan["generation"]["weights_dtype"] == "float16"
    else:
        assert metal["kind"] == "structure" and metal["checks"]["msl_source"]
        assert vulkan["kind"] == "structure"
    for report in (cpu, metal, vulkan):
        assert report["passed"] and report["generation"]["passed"]


def test_second_run_is_all_up_to_date():
    code, results, _ = doit(*TINY)
    assert code == 0
    assert ran(results) == set(), results


def test_a_new_target_compiles_only_that_target_by_the_command_the_runtime_names():
    from gpt2_iree.module import BuildError, Module

    with pytest.raises(BuildError, match="gpt2-ios.vmfb is missing") as missing:
        Module(BUILD, device="local-task", target="ios")
    command = re.search(r"build it with `doit (.*)`", str(missing.value)).group(1)
    assert "model=tiny" in command  # not the default model, which would download GPT-2
    code, results, _ = doit(*shlex.split(command))
    assert code == 0
    assert ran(results) == {"compile:ios", "verify:ios"}


def test_editing_export_code_reexports_but_not_assets():
    with open("model_copy.py", "a") as f:
        f.write("\n# an edit\n")
    code, results, _ = doit(*TINY)
    assert code == 0
    assert ran(results) == {"export"}
    # The module it wrote is the same text, so nothing downstream recompiles.
    assert results["compile:cpu"] == "up-to-date"


def test_a_new_shape_rebuilds_downstream_of_assets_only():
    code, results, _ = doit("model=tiny", "targets=cpu", "seq_len=32")
    assert code == 0
    assert ran(results) == {"export", "compile:cpu", "verify:cpu"}
    assert Path("build/tiny/pretrained-b1-k64-c128-s32-adafactor/verify-cpu.json").is_file()
    # Switching back finds the old outputs still up to date.
    code, results, _ = doit(*TINY)
    assert ran(results) == set(), results


def test_bad_var_fails_before_any_work(capsys):
    code = doit_main("model=tiny", "targets=cpu,tpu")
    assert code == 3
    assert "targets='tpu' is invalid; valid: cpu, metal, ios, vulkan, cuda" in capsys.readouterr().err


def test_clean_leaves_no_build_output():
    for args in (["model=tiny", "targets=cpu", "seq_len=32"], ["model=tiny", "targets=cpu,metal,vulkan,ios"]):
        assert not doit_main("clean", *args)  # doit returns None on a clean without errors
    leftovers = [str(p) for top in ("build", "assets") for p in Path(top).rglob("*")]
    assert leftovers == [] and not Path("build").exists()
