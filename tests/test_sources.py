"""A stage's code dependencies, derived from its action's imports: editing any
library file that a stage's code imports re-runs that stage, and only those
stages whose code imports it."""

import modulefinder
import shutil
from pathlib import Path

from doit_runner import doit, ran

import tasks.actions
import tasks.compile
import tasks.export
import tasks.sources
import tasks.verify
from tasks.config import LIBRARY
from tasks.sources import library_sources

# The stages that depend on their code through doit's file_dep, and their modules in tasks/.
STAGES = {"export": tasks.export, "compile:cpu": tasks.compile, "verify:cpu": tasks.verify}
CPU = ["model=tiny", "targets=cpu"]


class PackageFinder(modulefinder.ModuleFinder):
    """The standard library's own reading of what a module imports (from its
    compiled code, imports inside functions included), kept to one package."""

    def __init__(self, library: Path):
        super().__init__(path=[str(library.parent)])
        self.package = library.name

    def import_hook(self, name, caller=None, fromlist=None, level=-1):
        if level <= 0 and name.partition(".")[0] != self.package:
            return None  # third-party or standard library
        return super().import_hook(name, caller, fromlist, level)


def imported_files(target: str, library: Path = LIBRARY) -> set[Path]:
    """The package's files that `target`'s module runs when imported and called."""
    finder = PackageFinder(library)
    finder.import_hook(target.partition(":")[0])
    return {Path(module.__file__) for module in finder.modules.values() if module.__file__}


def test_each_stage_depends_on_every_library_file_its_action_imports():
    for stage, module in STAGES.items():
        assert set(module.SOURCES) == imported_files(module.ENTRY), stage
    # verify_build imports module, toolchain and compiler inside the function, and generation and the
    # reference further in.
    assert {"module.py", "device_memory.py", "toolchain.py", "compiler.py", "generation.py", "reference.py"} <= {
        p.name for p in tasks.verify.SOURCES}


def test_every_form_of_import_is_followed(tmp_path, monkeypatch):
    files = {
        "__init__.py": "",
        "entry.py": "import os\nimport gpt2_iree.plain\nfrom . import relative\n"
                    "def later():\n    from gpt2_iree import sub, attribute\n    import numpy\n",
        "plain.py": "attribute = 1\n",
        "relative.py": "class Lazy:\n    try:\n        from gpt2_iree.helper import function\n"
                       "    except ImportError:\n        pass\n",
        "helper.py": "def function(): pass\n",
        "sub/__init__.py": "from .inner import thing\n",
        "sub/inner.py": "from .. import leaf\nthing = leaf\n",
        "leaf.py": "",
        "unused.py": "",
    }
    library = tmp_path / "gpt2_iree"
    for name, text in files.items():
        (library / name).parent.mkdir(parents=True, exist_ok=True)
        (library / name).write_text(text)
    monkeypatch.setattr(tasks.sources, "LIBRARY", library)
    found = library_sources("gpt2_iree.entry:later")
    assert found == sorted(library / name for name in files if name != "unused.py")
    assert set(found) == imported_files("gpt2_iree.entry", library)


def touch_targets(*_, targets):
    """A stage stand-in: writes the (empty) outputs doit expects of the stage."""
    for target in targets:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).touch()


def test_editing_a_library_file_reruns_exactly_the_stages_that_import_it(tmp_path, monkeypatch):
    # The stages depend on a copy of the library, which the test edits, and
    # run stand-in actions: what is checked is doit's choice of what to re-run.
    library = tmp_path / "gpt2_iree"
    shutil.copytree(LIBRARY, library, ignore=shutil.ignore_patterns("__pycache__"))
    for module in STAGES.values():
        monkeypatch.setattr(module, "SOURCES", [library / p.relative_to(LIBRARY) for p in module.SOURCES])
    monkeypatch.setattr(tasks.actions, "_run", touch_targets)
    monkeypatch.setattr(tasks.actions, "_run_with_toolchain", touch_targets)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    imports = {stage: imported_files(module.ENTRY, library) for stage, module in STAGES.items()}

    code, results, _ = doit(*CPU)
    assert code == 0 and set(STAGES) <= ran(results), results
    for source in sorted(library.glob("*.py")):
        with open(source, "a") as f:
            f.write("\n# an edit\n")
        code, results, _ = doit(*CPU)
        assert code == 0
        assert ran(results) & set(STAGES) == {stage for stage in STAGES if source in imports[stage]}, source.name
