"""toolchain: the IREE compiler and runtime every later stage uses."""

import json

from gpt2_iree.targets import TARGETS
from gpt2_iree.toolchain import package_versions
from tasks.actions import call
from tasks.config import TOOLCHAIN_JSON, load_config


def recorded(required: dict[str, str]) -> bool:
    """Up to date while toolchain.json records the installed versions and every
    backend asked for. It reads the record itself, not doit's state, which is
    per build configuration (see dodo.py): switching configs must not re-run it.
    A new target the compiler lacks re-runs the stage, which then fails saying so."""
    try:
        record = json.loads(TOOLCHAIN_JSON.read_text())
    except (OSError, ValueError):
        return False
    return (record.get("versions") == package_versions()
            and set(required.values()) <= set(record.get("target_backends", ())))


def task_toolchain():
    """IREE compiler + runtime (pip wheels): versions and target backends -> build/toolchain.json"""
    cfg = load_config()
    required = {t: TARGETS[t].backend for t in cfg.targets}
    return {
        "actions": [call("gpt2_iree.toolchain:write_record", TOOLCHAIN_JSON, required)],
        "targets": [TOOLCHAIN_JSON],
        "uptodate": [(recorded, [required])],
        "clean": True,
    }
