"""toolchain: the IREE compiler and runtime every later stage uses."""

import json
from pathlib import Path

from gpt2_iree.targets import TARGETS
from gpt2_iree.toolchain import SOURCE_PACKAGES, package_versions
from tasks.actions import call
from tasks.config import IREE, load_config


def _read(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def recorded(record_path, required: dict[str, str]) -> bool:
    """Up to date while the record names the installed wheels and every
    backend asked for. It reads the record itself, not doit's state, which is
    per build configuration (see dodo.py): switching configs must not re-run it.
    A new target the compiler lacks re-runs the stage, which then fails saying so."""
    record = _read(record_path)
    return bool(record and record.get("versions") == package_versions()
                and set(required.values()) <= set(record.get("target_backends", ())))


def recorded_source(record_path, required: dict[str, str]) -> bool:
    """Up to date while the record names the installed source build (its
    commit and install) with every backend asked for, and the installed JAX."""
    record, build = _read(record_path), _read(IREE.build_record)
    return bool(record and build and record.get("kind") == "source"
                and record.get("commit") == build["commit"]
                and record.get("iree_compile") == str(Path(build["install"]) / "bin" / "iree-compile")
                and record.get("versions") == package_versions(SOURCE_PACKAGES)
                and set(required.values()) <= set(record.get("target_backends", ())))


def task_toolchain():
    """IREE compiler + runtime: the pip wheels, or toolchain=source's build -> build/toolchain*.json"""
    cfg = load_config()
    required = {t: TARGETS[t].backend for t in cfg.targets}
    if cfg.toolchain == "source":
        return {
            "actions": [call("gpt2_iree.toolchain:write_record", cfg.toolchain_json, required, IREE.build_record)],
            "task_dep": ["iree_build"],
            "targets": [cfg.toolchain_json],
            "uptodate": [(recorded_source, [cfg.toolchain_json, required])],
            "clean": True,
        }
    return {
        "actions": [call("gpt2_iree.toolchain:write_record", cfg.toolchain_json, required)],
        "targets": [cfg.toolchain_json],
        "uptodate": [(recorded, [cfg.toolchain_json, required])],
        "clean": True,
    }
