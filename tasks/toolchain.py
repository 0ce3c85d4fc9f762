"""toolchain: the IREE compiler and runtime every later stage uses."""

from doit.tools import config_changed

from gpt2_iree.targets import TARGETS
from gpt2_iree.toolchain import package_versions
from tasks.actions import call
from tasks.config import TOOLCHAIN_JSON, load_config


def task_toolchain():
    """IREE compiler + runtime (pip wheels): versions and target backends -> build/toolchain.json"""
    cfg = load_config()
    required = {t: TARGETS[t].backend for t in cfg.targets}
    return {
        "actions": [call("gpt2_iree.toolchain:write_record", TOOLCHAIN_JSON, required)],
        "targets": [TOOLCHAIN_JSON],
        "uptodate": [config_changed({"versions": package_versions(), "backends": sorted(set(required.values()))})],
        "clean": True,
    }
