"""xcframework: IREE's runtime for iOS, the iOS simulator and macOS (a Mac with Xcode, toolchain=source)."""

import platform

from gpt2_iree import xcframework
from tasks.actions import call, fail
from tasks.config import IREE, load_config
from tasks.sources import library_sources

# The function the action calls, and the library code it runs. The stage is
# shared by every configuration, so its record names that code (a file_dep
# would be doit's per-configuration state: a new model or shape would build
# the runtimes again).
ENTRY = "gpt2_iree.xcframework:build"
SOURCES = library_sources(ENTRY)


def is_default(cfg) -> bool:
    """Part of a plain `doit` where it can run: on a Mac, building from source."""
    return platform.system() == "Darwin" and cfg.toolchain == "source"


def task_xcframework():
    """macOS, toolchain=source: the IREE runtime for iOS, the simulator and macOS -> build/iree/iree.xcframework"""
    cfg = load_config()
    if platform.system() != "Darwin":
        return {"actions": [fail(f"xcframework needs macOS with Xcode; this is {platform.system()}")]}
    if cfg.toolchain != "source":
        # The runtime is cross-built from the same checkout as the compiler,
        # with the host tools that build installs.
        return {"actions": [fail("xcframework builds IREE's runtime from source: "
                                 "run `doit toolchain=source xcframework` (iree_ref=... picks the IREE)")]}
    return {
        "actions": [call(ENTRY, IREE, SOURCES)],
        "task_dep": ["iree_build"],
        "targets": [IREE.xcframework_record],
        "uptodate": [(xcframework.current, [IREE, SOURCES])],
    }
