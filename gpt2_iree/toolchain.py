"""Which IREE this build uses: the pip wheels' compiler and runtime.

`toolchain.json` records the versions and the compiler's target backends, so a
change of IREE rebuilds everything it compiled, and a target the compiler lacks
fails here, in seconds, instead of deep inside `compile`.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path

from gpt2_iree.errors import Gpt2IreeError

PACKAGES = ("iree-base-compiler", "iree-base-runtime", "jax", "jaxlib")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages every stage's output depends on."""
    return {name: importlib.metadata.version(name) for name in PACKAGES}


def iree_compile() -> str:
    """The path of the `iree-compile` binary that ships in the compiler wheel."""
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


def target_backends(compiler: str) -> list[str]:
    out = subprocess.run([compiler, "--iree-hal-list-target-backends"],
                         check=True, capture_output=True, text=True).stdout
    return [line.strip() for line in out.splitlines()[1:] if line.strip()]


def describe(required_backends: dict[str, str]) -> dict:
    """The toolchain record; `required_backends` maps target -> backend it needs."""
    compiler = iree_compile()
    backends = target_backends(compiler)
    missing = {t: b for t, b in required_backends.items() if b not in backends}
    if missing:
        wanted = ", ".join(f"{t} (needs {b})" for t, b in missing.items())
        raise Gpt2IreeError(f"iree-compile at {compiler} lacks targets {wanted}; "
                           f"it has {', '.join(backends)}")
    return {"kind": "wheel", "iree_compile": compiler, "versions": package_versions(),
            "target_backends": backends}


def write_record(path: Path, required_backends: dict[str, str]) -> None:
    """Write toolchain.json, but only when it changes: stages downstream
    depend on its content, and a rewrite of the same content must not look new."""
    text = json.dumps(describe(required_backends), indent=2, sort_keys=True) + "\n"
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_record(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def runtime_tool(name: str) -> str:
    """A tool of the runtime wheel (iree-dump-module, iree-benchmark-module...)."""
    import iree._runtime_libs

    return str(Path(iree._runtime_libs.__file__).parent / name)
