"""A stage's code: the files of gpt2_iree that the function its action calls imports.

A stage must re-run when the library code it runs changes, and a list of that
code kept by hand goes stale as the imports change. So each stage derives it
from the import statements of its action's module, followed through the
package, those inside functions included (the library imports jax and iree
lazily, and some of its own modules too).

The sources are parsed with `ast`, never imported: every `doit` call loads the
graph, which must stay fast and must not import jax or iree.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from tasks.config import LIBRARY

PACKAGE = LIBRARY.name


def library_sources(target: str) -> list[Path]:
    """The .py files of gpt2_iree that `target` ("module:function", or a module)
    runs: its module, every package module it imports directly or through
    others, and their packages' __init__.py, sorted. Imports from outside the
    package (third-party, standard library) are not followed."""
    files, seen = [], set()
    pending = [target.partition(":")[0]]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if path := _module_file(name):
            files.append(path)
            # Importing a.b runs a/__init__.py first.
            pending += [name.rpartition(".")[0], *_imported_names(name, path)]
    return sorted(files)


def _module_file(name: str) -> Path | None:
    """The file of the package's module `name`; None for a name outside the
    package or one that is no module (`from gpt2_iree.x import function`)."""
    package, *parts = name.split(".")
    if package != PACKAGE:
        return None
    path = LIBRARY.joinpath(*parts)
    for candidate in (path.with_name(path.name + ".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


# Parsed once per process: the graph is loaded once per `doit` call, and the
# stages share most of their modules.
@functools.cache
def _imported_names(module: str, path: Path) -> tuple[str, ...]:
    """The package names that `module` (at `path`) imports anywhere in its
    body: modules, and for `from m import x` both m and m.x, as x may be a
    submodule; `_module_file` drops the names that are not modules."""
    names = []
    for node in _statements(ast.parse(path.read_bytes(), str(path)).body):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package=path.name == "__init__.py")
            names += [base, *(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")]
    return tuple(name for name in names if name.split(".")[0] == PACKAGE)


def _statements(body: list[ast.stmt]):
    """Every statement in `body`, and in the functions, classes and blocks it
    holds. An import is a statement, and skipping the expressions makes this
    8x faster than `ast.walk`."""
    for node in body:
        yield node
        for block in ("body", "orelse", "finalbody", "handlers", "cases"):
            yield from _statements(getattr(node, block, ()))


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` names: `from ..x import y` in a.b.c is a.x."""
    if not node.level:
        return node.module
    parts = module.split(".")
    package = parts if is_package else parts[:-1]  # what level 1 names
    base = package[:len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))
