"""toolchain=source, driven through doit on the tiny model.

The real IREE cannot be cloned or built here (no GitHub; hours on two cores),
so the repository is a stand-in made by the test: a real git repository with
a submodule, holding a small CMake project (tests/iree_standin/) that real
CMake and Ninja build. Its iree-compile logs each call and runs the pip
wheel's; its Python packages log each import and load the wheel's code through
the install tree. So every step the graph takes is real (git fetch, ls-remote,
submodules, cmake, ninja, the subprocess with the build's PYTHONPATH), and the
logs show that export, compile and verify went through the build.

The tests share one working directory and run in file order, like
test_pipeline.py. The real IREE is built by the network-marked test at the end.
"""

import importlib.metadata
import importlib.util
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from doit_runner import doit, doit_main, ran

from gpt2_iree import source_build
from tasks.config import parse_config

STANDIN = Path(__file__).resolve().parent / "iree_standin"
INSTALL = Path("build/iree/install")
SOURCE_BUILD = Path("build/tiny/pretrained-b1-k64-c128-s128-adafactor-source")
WHEEL_BUILD = Path("build/tiny/pretrained-b1-k64-c128-s128-adafactor")
WHEEL = ["model=tiny", "targets=cpu"]
PIPELINE = {"toolchain", "export", "compile:cpu", "verify:cpu"}


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def commit_file(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    git("commit", "-qam", f"edit {name}", cwd=repo)
    return git("rev-parse", "HEAD", cwd=repo)


@pytest.fixture(scope="module")
def git_env():
    with pytest.MonkeyPatch.context() as patch:
        # git refuses local-path submodules unless told (CVE-2022-39253); the
        # stand-in's submodule is a local path, IREE's are https.
        for key, value in {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "protocol.file.allow",
                           "GIT_CONFIG_VALUE_0": "always", "GIT_AUTHOR_NAME": "test",
                           "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
                           "GIT_COMMITTER_EMAIL": "test@example.com"}.items():
            patch.setenv(key, value)
        yield


@pytest.fixture(scope="module")
def standin(tmp_path_factory, git_env) -> Path:
    """The stand-in IREE repository: branch main, one commit, one submodule."""
    root = tmp_path_factory.mktemp("repos")
    marker = root / "marker"
    marker.mkdir()
    git("init", "-q", "-b", "main", cwd=marker)
    (marker / "VERSION").write_text("1\n")
    git("add", "VERSION", cwd=marker)
    git("commit", "-qm", "marker", cwd=marker)
    repo = root / "iree"
    shutil.copytree(STANDIN, repo)
    git("init", "-q", "-b", "main", cwd=repo)
    git("submodule", "-q", "add", str(marker), "third_party/marker", cwd=repo)
    git("add", "-A", cwd=repo)
    git("commit", "-qm", "stand-in IREE", cwd=repo)
    return repo


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("source")


@pytest.fixture(autouse=True)
def in_workdir(workdir, monkeypatch):
    monkeypatch.chdir(workdir)


def source(repo: Path, ref: str = "main") -> list[str]:
    return ["toolchain=source", f"iree_repo={repo}", f"iree_ref={ref}", *WHEEL]


def compile_calls() -> list[str]:
    """The stand-in iree-compile's calls that compiled a module (not the backend query)."""
    return [line for line in (INSTALL / "iree-compile.log").read_text().splitlines() if "gpt2.mlir" in line]


def test_first_run_fetches_builds_and_verifies_through_the_build(standin, capfd):
    code, results, errors = doit(*source(standin))
    assert code == 0, errors
    assert ran(results) == {"iree_source", "iree_build", "assets", *PIPELINE}

    record = json.loads(Path("build/toolchain-source.json").read_text())
    assert record["kind"] == "source" and record["commit"] == git("rev-parse", "HEAD", cwd=standin)
    assert record["iree_compile"] == str((INSTALL / "bin" / "iree-compile").resolve())
    # compile ran the build's iree-compile, into the source build's directory ...
    assert [call.split()[0] for call in compile_calls()] == [f"{SOURCE_BUILD}/gpt2.mlir"]
    # ... and export and verify imported the build's Python packages.
    imported = (INSTALL / "imports.log").read_text()
    assert str(INSTALL.resolve() / "python_packages/iree_compiler/iree/compiler") in imported
    assert str(INSTALL.resolve() / "python_packages/iree_runtime/iree/runtime") in imported
    assert json.loads((SOURCE_BUILD / "verify-cpu.json").read_text())["passed"]

    # CMake got the options for targets=cpu, and Ninja's steps moved the bar.
    options = (INSTALL / "options.txt").read_text().splitlines()
    for option in ("CMAKE_BUILD_TYPE=Release", "IREE_BUILD_PYTHON_BINDINGS=ON", "IREE_TARGET_BACKEND_DEFAULTS=OFF",
                   "IREE_TARGET_BACKEND_LLVM_CPU=ON", "IREE_BUILD_TESTS=OFF"):
        assert option in options
    assert not [o for o in options if o.startswith("IREE_TARGET_BACKEND_METAL_SPIRV")]
    assert "Building C object" in Path("build/iree/build.log").read_text()
    assert "iree_build: 100%" in capfd.readouterr().err


def test_second_run_is_a_no_op(standin):
    code, results, _ = doit(*source(standin))
    assert code == 0 and ran(results) == set(), results


def test_an_unknown_ref_fails_and_changes_nothing(standin):
    code, results, errors = doit(*source(standin, "no-such-branch"))
    assert code != 0 and ran(results) == set()
    assert f"iree_ref='no-such-branch' is not a branch, tag or commit of {standin}" in errors["iree_source"]
    # The checkout and every record are as they were.
    code, results, _ = doit(*source(standin))
    assert code == 0 and ran(results) == set(), results


def test_an_unreachable_or_missing_repo_fails_clearly(standin, tmp_path, capsys):
    code, results, errors = doit(*source(f"file://{tmp_path}/gone.git"))
    assert code != 0 and ran(results) == set()
    assert f"cannot reach iree_repo=file://{tmp_path}/gone.git" in errors["iree_source"]
    # A local path that is not there is refused before any work.
    assert doit_main(*source(tmp_path / "gone")) == 3
    assert "is neither a directory nor a git URL" in capsys.readouterr().err


def test_a_failed_build_shows_the_log_tail_and_is_not_done(standin):
    commit_file(standin, "version.c", "int main(void) { return undeclared; }\n")
    code, results, errors = doit(*source(standin))
    assert code != 0
    assert ran(results) == {"iree_source"} and results["iree_build"] == "fail"
    assert "The IREE build failed" in errors["iree_build"] and "build/iree/build.log" in errors["iree_build"]
    assert "undeclared" in errors["iree_build"]  # the compiler's error, from the log's tail
    assert not Path("build/iree/build.json").exists()
    assert len(compile_calls()) == 1


def test_a_new_commit_on_the_branch_rebuilds_iree_and_downstream(standin):
    head = commit_file(standin, "version.c", (STANDIN / "version.c").read_text())
    code, results, errors = doit(*source(standin))
    assert code == 0, errors
    assert ran(results) == {"iree_source", "iree_build", *PIPELINE}
    assert json.loads(Path("build/toolchain-source.json").read_text())["commit"] == head
    assert len(compile_calls()) == 2


def test_switching_to_the_wheel_rebuilds_nothing_of_iree(standin):
    code, results, errors = doit(*WHEEL)
    assert code == 0, errors
    assert ran(results) == PIPELINE  # in the wheel's own build directory; assets are shared
    from iree.compiler.tools.binaries import find_tool

    assert json.loads(Path("build/toolchain.json").read_text())["kind"] == "wheel"
    assert (WHEEL_BUILD / "gpt2-cpu.compile.log").read_text().split()[0] == find_tool("iree-compile")
    assert len(compile_calls()) == 2  # the build's iree-compile was not called
    code, results, _ = doit(*WHEEL)
    assert code == 0 and ran(results) == set(), results


def test_switching_back_to_the_source_build_is_a_no_op(standin):
    code, results, _ = doit(*source(standin))
    assert code == 0 and ran(results) == set(), results


def test_source_stages_explain_themselves_where_they_cannot_run():
    code, _, errors = doit("iree_build", *WHEEL)
    assert code != 0 and "run `doit toolchain=source iree_build`" in errors["iree_build"]
    if platform.system() != "Darwin":
        code, _, errors = doit("xcframework", *WHEEL)
        assert code != 0 and "xcframework needs macOS with Xcode" in errors["xcframework"]


# --- the pieces, on their own ------------------------------------------------


@pytest.mark.parametrize("version, tag", [
    ("3.13.0", "v3.13.0"),  # a stable release
    ("3.13.1", "iree-3.13.1"),  # a patch release
    ("3.13.0rc20261016", "iree-3.13.0rc20261016"),  # a nightly
])
def test_default_ref_is_the_wheels_release_tag(version, tag):
    assert source_build.default_ref(version) == tag


def test_a_dev_wheel_has_no_default_ref():
    with pytest.raises(ValueError, match="has no IREE release tag; name the IREE to build with iree_ref="):
        source_build.default_ref("3.14.0.dev0+6d55a11")


def test_source_config():
    cfg = parse_config({"toolchain": "source", "model": "tiny"})
    wheel_tag = source_build.default_ref(importlib.metadata.version("iree-base-compiler"))
    assert (cfg.iree_repo, cfg.iree_ref) == (source_build.DEFAULT_REPO, wheel_tag)
    wheel = parse_config({"model": "tiny"})
    # Every output and the doit state are keyed by toolchain: switching never mixes them.
    assert cfg.build_dir != wheel.build_dir and cfg.state_file != wheel.state_file
    assert cfg.toolchain_json != wheel.toolchain_json
    # A commit is compared as git prints it.
    assert parse_config({"toolchain": "source", "iree_ref": "89ECE87B89852100C0A4AC3D515E14842D090967"}
                        ).iree_ref == "89ece87b89852100c0a4ac3d515e14842d090967"


@pytest.mark.parametrize("raw, message", [
    ({"toolchain": "cmake"}, "toolchain='cmake' is invalid; valid: wheel, source"),
    ({"iree_ref": "main"}, "iree_ref=main applies to toolchain=source only"),
    ({"toolchain": "source", "iree_ref": "--upload-pack=x"}, "iree_ref='--upload-pack=x' is invalid"),
])
def test_bad_source_vars(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_config(raw)


def test_missing_build_tools_say_how_to_install_them(tmp_path, monkeypatch):
    if shutil.which("cmake", path=str(Path(sys.executable).parent)):
        pytest.skip("this environment has its own cmake")
    tools = {name: source_build.find_tool(name) for name in ("cmake", "ninja")}
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(source_build.BuildError, match=r"cmake not found.*install.*cmake"):
        source_build.require_build_tools()
    # With CMake and Ninja but no C++ compiler:
    for name, path in tools.items():
        (tmp_path / name).symlink_to(path)
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(source_build.BuildError, match="no C.. compiler found"):
        source_build.require_build_tools()


def test_missing_python_requirements(tmp_path):
    requirements = tmp_path / "build_requirements.txt"
    requirements.write_text("# IREE's\nnumpy>=2  # installed\n\n-r other.txt\nno-such-package-gpt2-iree==1.0\n")
    assert source_build.missing_python_requirements(requirements) == ["no-such-package-gpt2-iree"]
    assert source_build.missing_python_requirements(tmp_path / "absent.txt") == []


@pytest.mark.network
def test_real_iree_from_the_wheels_release_tag(tmp_path, monkeypatch):
    """Clones IREE at the installed wheel's tag and builds it: hours, and tens of GB."""
    monkeypatch.chdir(tmp_path)
    code, results, errors = doit("toolchain=source", *WHEEL)
    assert code == 0, errors
    assert json.loads(Path("build/tiny/pretrained-b1-k64-c128-s128-adafactor-source/verify-cpu.json").read_text())["passed"]
