"""IREE from a git ref: fetch the source, build it with CMake and Ninja.

Two steps, each leaving a small JSON record of what it made. A step is up to
date when its record matches what is asked for now, so it is decided from the
record and not from doit's state (which is kept per build configuration), and
a step that failed or was interrupted has no record that could look done:

  fetch_source  iree_repo at iree_ref -> <tree>/src with submodules -> source.json
  build         source.json's commit -> <tree>/install: iree-compile, the
                runtime and the Python bindings -> build.json

Standard library only at import time: the task graph imports this module to
decide what is up to date, and every `doit` call loads the graph.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import write_json

DEFAULT_REPO = "https://github.com/iree-org/iree.git"

# targets.py backend -> the IREE CMake option that builds it into iree-compile.
BACKEND_OPTIONS = {
    "llvm-cpu": "IREE_TARGET_BACKEND_LLVM_CPU",
    "metal-spirv": "IREE_TARGET_BACKEND_METAL_SPIRV",
    "vulkan-spirv": "IREE_TARGET_BACKEND_VULKAN_SPIRV",
    "cuda": "IREE_TARGET_BACKEND_CUDA",
}

# What IREE's Python bindings need installed before CMake can configure them.
PYTHON_REQUIREMENTS = Path("runtime/bindings/python/iree/runtime/build_requirements.txt")

LOG_TAIL_LINES = 40
FULL_SHA = re.compile(r"[0-9a-f]{40}")
NINJA_STEP = re.compile(r"\[(\d+)/(\d+)\]")
LS_REMOTE_TIMEOUT_S = 30


class SourceError(Gpt2IreeError):
    """A repository or ref that cannot be fetched, or a checkout we must not touch."""


class BuildError(Gpt2IreeError):
    """A missing build tool, or a CMake/Ninja step that failed."""


@dataclasses.dataclass(frozen=True)
class Tree:
    """Where toolchain=source keeps IREE: one tree, shared by every configuration."""

    root: Path

    @property
    def src(self) -> Path:
        return self.root / "src"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def install(self) -> Path:
        return self.root / "install"

    @property
    def source_record(self) -> Path:
        return self.root / "source.json"

    @property
    def build_record(self) -> Path:
        return self.root / "build.json"

    @property
    def log(self) -> Path:
        return self.root / "build.log"

    @property
    def runtime(self) -> Path:
        """The runtime cross-builds of the XCFramework, one directory per platform and architecture."""
        return self.root / "runtime"

    @property
    def xcframework(self) -> Path:
        return self.root / "iree.xcframework"

    @property
    def xcframework_record(self) -> Path:
        return self.root / "xcframework.json"


# --- what to fetch -----------------------------------------------------------


def default_ref(version: str) -> str:
    """The IREE git tag of an `iree-base-compiler` version, as IREE tags releases:
    3.13.0 -> v3.13.0 (a stable release), 3.13.1 -> iree-3.13.1 (a patch
    release), 3.13.0rc20261016 -> iree-3.13.0rc20261016 (a nightly)."""
    if re.fullmatch(r"\d+\.\d+\.0", version):
        return f"v{version}"
    if re.fullmatch(r"\d+\.\d+\.\d+(rc\d{8})?", version):
        return f"iree-{version}"
    raise ValueError(f"the installed iree-base-compiler {version} has no IREE release tag; "
                     f"name the IREE to build with iree_ref=<branch, tag or commit>")


def check_repo(repo: str) -> str:
    """`repo` as git will be given it: a URL as is, a local clone as an absolute path."""
    if "://" in repo or re.match(r"[\w.-]+@[\w.-]+:", repo):
        return repo
    if not Path(repo).is_dir():
        raise ValueError(f"iree_repo={repo!r} is neither a directory nor a git URL; "
                         f"valid: a URL (https://..., ssh://..., git@host:path) or a local clone")
    return str(Path(repo).resolve())


def check_ref(ref: str) -> str:
    # A ref starting with "-" would reach git as an option.
    if not ref or ref.startswith("-") or any(c.isspace() for c in ref):
        raise ValueError(f"iree_ref={ref!r} is invalid; valid: a branch, a tag or a full commit hash")
    # git prints hashes in lower case; the records compare them as text.
    return ref.lower() if re.fullmatch(r"[0-9a-fA-F]{40}", ref) else ref


# --- fetch -------------------------------------------------------------------


def _git(*args: str, cwd: Path | None = None, capture: bool = True, timeout: float | None = None
         ) -> subprocess.CompletedProcess:
    # Never wait on a password prompt: a build step has nobody to answer it.
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    return subprocess.run(["git", *args], cwd=cwd, env=env, text=True, timeout=timeout,
                          stdout=subprocess.PIPE if capture else None,
                          stderr=subprocess.PIPE if capture else None)


def _git_out(*args: str, cwd: Path | None = None) -> str:
    result = _git(*args, cwd=cwd)
    if result.returncode != 0:
        raise SourceError(f"git {shlex.join(args)} failed in {cwd}: {result.stderr.strip()}")
    return result.stdout.strip()


def read_json(path: Path) -> dict | None:
    """A record, or None if it is missing or unreadable (which means: not done)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def remote_commit(repo: str, ref: str) -> str | None:
    """The commit that branch or tag `ref` names in `repo` now (git ls-remote:
    one round trip, nothing downloaded); None if `repo` has no such ref."""
    names = ([ref] if ref.startswith("refs/") else []) + [f"refs/tags/{ref}^{{}}", f"refs/tags/{ref}",
                                                          f"refs/heads/{ref}"]
    try:
        result = _git("ls-remote", repo, *names, timeout=LS_REMOTE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SourceError(f"cannot reach iree_repo={repo}: no answer in {LS_REMOTE_TIMEOUT_S} s") from None
    if result.returncode != 0:
        raise SourceError(f"cannot reach iree_repo={repo}: {result.stderr.strip()}\n"
                          f"Check the URL (or path) and the network: `git ls-remote {repo}` must work")
    found = dict(reversed(line.split("\t")) for line in result.stdout.splitlines() if "\t" in line)
    # git's own order for a short name: a tag (peeled to its commit) before a branch.
    return next((found[name] for name in names if name in found), None)


def local_changes(src: Path, submodules: bool = True) -> list[str]:
    """Tracked files changed in the checkout (`git status`, not looking inside
    submodules), and submodules not at their recorded commit if `submodules`."""
    ignore = "--ignore-submodules=dirty" if submodules else "--ignore-submodules=all"
    return _git_out("status", "--porcelain", "--untracked-files=no", ignore, cwd=src).splitlines()


def source_current(tree: Tree, repo: str, ref: str) -> bool:
    """Up to date while the checkout is the recorded commit of `repo`/`ref`, is
    clean, and `ref` still names that commit in `repo`. That last check asks
    the remote (one `git ls-remote`, skipped for a full commit hash), so a
    moved branch re-fetches; an unreachable remote keeps the checkout, with a
    warning, so that an offline `doit` still builds."""
    record = read_json(tree.source_record)
    if not record or (record.get("repo"), record.get("ref")) != (repo, ref):
        return False
    try:
        if _git_out("rev-parse", "HEAD", cwd=tree.src) != record["commit"] or local_changes(tree.src):
            return False
    except (SourceError, OSError):  # no checkout there (any more)
        return False
    if FULL_SHA.fullmatch(ref):
        return True
    try:
        return remote_commit(repo, ref) == record["commit"]
    except SourceError as err:
        print(f"warning: could not ask where {ref} points now ({str(err).splitlines()[0]}); "
              f"building the checked-out {ref} ({record['commit'][:12]})", file=sys.stderr)
        return True


def fetch_source(tree: Tree, repo: str, ref: str) -> None:
    """The iree_source stage: check out `ref` of `repo` in tree.src with its
    submodules, shallow (IREE's history and LLVM's are gigabytes), and record
    the commit. Local changes in the checkout stop it: they are not ours to discard."""
    src = tree.src
    if not (src / ".git").exists():
        src.mkdir(parents=True, exist_ok=True)
        _git_out("init", "-q", cwd=src)
    # A submodule at another commit is not a change of the user's: an
    # interrupted run leaves it so, and the update below puts it right.
    elif changes := local_changes(src, submodules=False):
        listed = "\n  ".join(changes[:10])
        raise SourceError(f"{src} has local changes, which a checkout of {ref} would discard:\n  {listed}\n"
                          f"Keep them with `git -C {src} stash` or drop them with `git -C {src} checkout -- .`; "
                          f"to build your own changes, commit them in a clone and pass iree_repo=<that clone>")
    # Submodules with relative URLs resolve against origin.
    remote = "set-url" if _git("remote", "get-url", "origin", cwd=src).returncode == 0 else "add"
    _git_out("remote", remote, "origin", repo, cwd=src)
    # git's progress (when on a terminal) and its errors go to the console.
    if _git("fetch", "--depth", "1", "--no-tags", "origin", ref, cwd=src, capture=False).returncode != 0:
        if remote_commit(repo, ref):  # raises if the repository cannot be reached at all
            raise SourceError(f"fetching {ref} from {repo} failed (see git's message above)")
        hint = " (give a commit as its full 40-digit hash)" if re.fullmatch(r"[0-9a-fA-F]{4,39}", ref) else ""
        raise SourceError(f"iree_ref={ref!r} is not a branch, tag or commit of {repo}{hint}; "
                          f"list them with `git ls-remote --heads --tags {repo}`")
    commit = _git_out("rev-parse", "FETCH_HEAD^{commit}", cwd=src)
    _git_out("checkout", "-q", "--detach", commit, cwd=src)
    submodules = ["submodule", "update", "--init", "--jobs", "4"]
    # A server may refuse a shallow fetch of a submodule's commit: then fetch it whole.
    if _git(*submodules, "--depth", "1", cwd=src, capture=False).returncode != 0:
        if _git(*submodules, cwd=src, capture=False).returncode != 0:
            raise SourceError(f"updating the submodules of {repo} at {commit[:12]} failed (see git's message above); "
                              f"run doit again once the cause is fixed")
    write_json(tree.source_record, {"repo": repo, "ref": ref, "commit": commit})


# --- build -------------------------------------------------------------------


def find_tool(name: str) -> str | None:
    """`name` on PATH, or beside this Python (a venv's `pip install ninja` when the venv isn't activated)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def require_build_tools() -> dict[str, str | None]:
    """cmake, ninja and a C++ compiler, or an error saying how to get them; ccache if there is one."""
    missing = [name for name in ("cmake", "ninja") if not find_tool(name)]
    if missing:
        names = " ".join(missing)
        system = (f"`brew install {names}`" if platform.system() == "Darwin"
                  else f"`sudo apt-get install {names.replace('ninja', 'ninja-build')}` (Debian/Ubuntu)")
        raise BuildError(f"{' and '.join(missing)} not found: building IREE needs CMake and Ninja. Install them "
                         f"with {system} or `pip install {names}` into this environment, then run doit again")
    if not (os.environ.get("CXX") or any(shutil.which(c) for c in ("c++", "clang++", "g++"))):
        hint = ("`xcode-select --install`" if platform.system() == "Darwin"
                else "`sudo apt-get install clang lld` (Debian/Ubuntu)")
        raise BuildError(f"no C++ compiler found (c++, clang++ or g++ on PATH, or $CXX): install one with {hint}, "
                         f"then run doit again")
    return {"cmake": find_tool("cmake"), "ninja": find_tool("ninja"), "ccache": find_tool("ccache")}


def missing_python_requirements(requirements: Path) -> list[str]:
    """The packages of a pip requirements file that are not installed (names only, versions unchecked)."""
    if not requirements.is_file():
        return []
    missing = []
    for line in requirements.read_text().splitlines():
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#", 1)[0])
        if not name:
            continue
        try:
            importlib.metadata.version(name.group(1))
        except importlib.metadata.PackageNotFoundError:
            missing.append(name.group(1))
    return missing


def wanted_backends(required, record: dict | None) -> list[str]:
    """The backends to build: those asked for now and those already built, so
    that asking for fewer targets never rebuilds IREE without one."""
    return sorted(set(required) | set((record or {}).get("backends", ())))


def configure_options(backends, install: Path) -> dict[str, str]:
    """The CMake options that decide what the build makes (the build record keeps them)."""
    options = {
        "CMAKE_BUILD_TYPE": "Release",
        "CMAKE_INSTALL_PREFIX": str(Path(install).resolve()),
        "IREE_BUILD_TESTS": "OFF",
        "IREE_BUILD_SAMPLES": "OFF",
        "IREE_BUILD_PYTHON_BINDINGS": "ON",
        # The bindings are built for the Python that runs the graph.
        "Python3_EXECUTABLE": sys.executable,
        # Only the backends asked for: each one is minutes of compile time.
        "IREE_TARGET_BACKEND_DEFAULTS": "OFF",
        **{BACKEND_OPTIONS[b]: "ON" for b in backends},
    }
    if platform.system() == "Darwin":
        options["IREE_HAL_DRIVER_METAL"] = "ON"
    if "cuda" in backends:
        options["IREE_HAL_DRIVER_CUDA"] = "ON"
    return options


def build_current(tree: Tree, required) -> bool:
    """Up to date while the install was built from the checked-out commit with
    the options asked for now, and iree-compile is there."""
    record, source = read_json(tree.build_record), read_json(tree.source_record)
    return bool(record and source and record.get("commit") == source["commit"]
                and record.get("options") == configure_options(wanted_backends(required, record), tree.install)
                and (tree.install / "bin" / "iree-compile").is_file())


def _tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def run_logged(cmd: list, log, log_path: Path, step: str, progress: str | None = None) -> None:
    """Run `cmd` with its output appended to `log`; Ninja's `[n/m]` lines move a
    progress bar named `progress`. A failure raises with the log's tail."""
    from tqdm import tqdm

    cmd = [str(c) for c in cmd]
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    # Ninja's status line in the one format the bar reads.
    env = dict(os.environ, NINJA_STATUS="[%f/%t] ")
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             errors="replace")
    with tqdm(desc=progress, unit="step", disable=progress is None, file=sys.stderr) as bar:
        for line in child.stdout:
            log.write(line)
            # Ninja counts the steps finished when it starts one.
            if step_match := NINJA_STEP.match(line):
                bar.total = int(step_match[2])
                bar.n = int(step_match[1])
                bar.refresh()
        code = child.wait()
        if code == 0 and bar.total:
            bar.n = bar.total
    log.flush()
    if code != 0:
        raise BuildError(f"{step} failed (exit {code}); the full log is {log_path}; its end:\n{_tail(log_path)}\n"
                         f"Fix the cause and run doit again: the build resumes where it stopped")


def build(tree: Tree, required) -> None:
    """The iree_build stage: configure, build and install the checked-out IREE."""
    tools = require_build_tools()
    source = read_json(tree.source_record)
    if not source:
        raise BuildError(f"no IREE checkout recorded at {tree.source_record}: run `doit toolchain=source iree_source`")
    requirements = tree.src / PYTHON_REQUIREMENTS
    if missing := missing_python_requirements(requirements):
        raise BuildError(f"IREE's Python bindings need {', '.join(missing)} to build: "
                         f"`{sys.executable} -m pip install -r {requirements}`, then run doit again")
    backends = wanted_backends(required, read_json(tree.build_record))
    tree.build_record.unlink(missing_ok=True)  # a failed build must not look done
    options = configure_options(backends, tree.install)
    # Not part of the record: neither changes what is built, and a new one must
    # not rebuild everything.
    extra = {"CMAKE_MAKE_PROGRAM": tools["ninja"]}
    if tools["ccache"]:
        extra |= {"CMAKE_C_COMPILER_LAUNCHER": tools["ccache"], "CMAKE_CXX_COMPILER_LAUNCHER": tools["ccache"]}
    tree.build.mkdir(parents=True, exist_ok=True)
    print(f"iree_build: IREE {source['commit'][:12]} ({source['ref']}); the full log is {tree.log}", file=sys.stderr)
    with open(tree.log, "w") as log:
        run_logged([tools["cmake"], "-G", "Ninja", "-S", tree.src, "-B", tree.build,
                    *(f"-D{k}={v}" for k, v in {**options, **extra}.items())], log, tree.log, "CMake configure")
        run_logged([tools["cmake"], "--build", tree.build, "--target", "install"], log, tree.log,
                   "The IREE build", progress="iree_build")
    for path in (tree.install / "bin" / "iree-compile", *python_packages(tree.install)):
        if not path.exists():
            raise BuildError(f"the build installed no {path}; see {tree.log}")
    write_json(tree.build_record, {**{k: source[k] for k in ("repo", "ref", "commit")},
                                    "backends": backends, "options": options,
                                    "install": str(tree.install.resolve())})


def python_packages(install: Path) -> list[Path]:
    """Where IREE installs its Python bindings: put both on PYTHONPATH."""
    return [Path(install) / "python_packages" / name for name in ("iree_compiler", "iree_runtime")]
