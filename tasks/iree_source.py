"""iree_source, iree_build: IREE from a git ref, for toolchain=source.

Both are shared by every configuration, so each decides from its own record
(build/iree/source.json, build/iree/build.json), not from doit's state, which
is per configuration: a new model or shape never refetches or rebuilds IREE.
"""

from gpt2_iree import source_build
from gpt2_iree.targets import TARGETS
from tasks.actions import call, fail
from tasks.config import IREE, load_config


def _source_only(task: str) -> dict:
    return {"actions": [fail(f"{task} is a stage of toolchain=source; run `doit toolchain=source {task}`")]}


def task_iree_source():
    """toolchain=source: iree_repo at iree_ref, with submodules -> build/iree/src"""
    cfg = load_config()
    if cfg.toolchain != "source":
        return _source_only("iree_source")
    return {
        "actions": [call("gpt2_iree.source_build:fetch_source", IREE, cfg.iree_repo, cfg.iree_ref)],
        "targets": [IREE.source_record],
        # Asks the remote where iree_ref points now (one `git ls-remote`, none
        # for a full commit hash): a moved branch is fetched again.
        "uptodate": [(source_build.source_current, [IREE, cfg.iree_repo, cfg.iree_ref])],
    }


def task_iree_build():
    """toolchain=source: IREE compiler, runtime, Python bindings (CMake + Ninja) -> build/iree/install"""
    cfg = load_config()
    if cfg.toolchain != "source":
        return _source_only("iree_build")
    backends = sorted({TARGETS[t].backend for t in cfg.targets})
    return {
        "actions": [call("gpt2_iree.source_build:build", IREE, backends)],
        "task_dep": ["iree_source"],
        "targets": [IREE.build_record],
        "uptodate": [(source_build.build_current, [IREE, backends])],
    }
