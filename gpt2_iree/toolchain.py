"""Which IREE this build uses: the pip wheels, or IREE built from source.

The toolchain record (`toolchain.json`, or `toolchain-source.json` for a source
build) names the `iree-compile` to run and the Python path of the bindings, and
records versions (the wheels', or the source's commit) and the compiler's
target backends, so a change of IREE rebuilds everything it compiled, and a
target the compiler lacks fails here, in seconds, instead of deep inside `compile`.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import write_text

PACKAGES = ("iree-base-compiler", "iree-base-runtime", "jax", "jaxlib")
# With IREE built from source, only JAX comes from pip.
SOURCE_PACKAGES = ("jax", "jaxlib")


def package_versions(names=PACKAGES) -> dict[str, str]:
    """Installed versions of the packages every stage's output depends on."""
    return {name: importlib.metadata.version(name) for name in names}


def iree_compile() -> str:
    """The path of the `iree-compile` binary that ships in the compiler wheel."""
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


def target_backends(compiler: str) -> list[str]:
    if not Path(compiler).is_file():
        raise Gpt2IreeError(f"no iree-compile at {compiler}")
    out = subprocess.run([compiler, "--iree-hal-list-target-backends"],
                         check=True, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]


def checked_backends(compiler: str, required_backends: dict[str, str]) -> list[str]:
    """The compiler's target backends; an error if it lacks one that
    `required_backends` (target -> backend) needs."""
    backends = target_backends(compiler)
    missing = {t: b for t, b in required_backends.items() if b not in backends}
    if missing:
        wanted = ", ".join(f"{t} (needs {b})" for t, b in missing.items())
        raise Gpt2IreeError(f"iree-compile at {compiler} lacks targets {wanted}; "
                            f"it has {', '.join(backends)}")
    return backends


def describe(required_backends: dict[str, str]) -> dict:
    """The record of the pip wheels; `required_backends` maps target -> backend it needs."""
    compiler = iree_compile()
    return {"kind": "wheel", "iree_compile": compiler, "versions": package_versions(),
            "target_backends": checked_backends(compiler, required_backends)}


def describe_source(build_record: Path, required_backends: dict[str, str]) -> dict:
    """The record of IREE built from source, from the build's own record
    (gpt2_iree.source_build): its commit, its iree-compile, its Python bindings."""
    from gpt2_iree.source_build import python_packages

    build = read_record(build_record)
    install = Path(build["install"])
    compiler = str(install / "bin" / "iree-compile")
    record = {"kind": "source", "repo": build["repo"], "ref": build["ref"], "commit": build["commit"],
              "iree_compile": compiler, "python_path": [str(p) for p in python_packages(install)],
              "versions": package_versions(SOURCE_PACKAGES),
              "target_backends": checked_backends(compiler, required_backends)}
    _check_bindings(record)
    return record


def python_env(record: dict, extra_path=()) -> dict[str, str]:
    """The environment of a Python that imports `iree` from the toolchain's
    bindings: its python_path first, then `extra_path`, then any PYTHONPATH set."""
    path = [*record.get("python_path", ()), *map(str, extra_path), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))


def _check_bindings(record: dict) -> None:
    """The source build's `iree.compiler` and `iree.runtime` must import from its
    python_path: a broken install fails here, not in export."""
    probe = "import iree.compiler, iree.runtime; print(iree.compiler.__file__); print(iree.runtime.__file__)"
    result = subprocess.run([sys.executable, "-c", probe], env=python_env(record), capture_output=True, text=True)
    files = result.stdout.splitlines()
    if result.returncode != 0 or len(files) != 2 or not all(
            any(f.startswith(p) for p in record["python_path"]) for f in files):
        raise Gpt2IreeError(f"the Python bindings of the IREE build at {record['python_path']} do not import "
                            f"from there: {result.stderr.strip()[-2000:] or files}")


def write_record(path: Path, required_backends: dict[str, str], build_record: Path | None = None) -> None:
    """Write the toolchain record (of the wheels, or of the source build that
    `build_record` describes), but only when it changes: stages downstream
    depend on its content, and a rewrite of the same content must not look new."""
    record = describe_source(build_record, required_backends) if build_record else describe(required_backends)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text)


def read_record(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def runtime_tool(name: str) -> str:
    """A tool of the imported IREE runtime (iree-dump-module, iree-benchmark-module...):
    the wheel's, or a source build's where its bindings come first on the path."""
    import iree._runtime_libs

    return str(Path(iree._runtime_libs.__file__).parent / name)
