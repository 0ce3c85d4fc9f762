"""compile:<target>: gpt2.mlir -> gpt2-<target>.vmfb with that target's iree-compile flags."""

from doit.tools import config_changed

from gpt2_iree.targets import TARGETS
from tasks.actions import call, remove_outputs
from tasks.config import LIBRARY, load_config

SOURCES = [LIBRARY / "targets.py", LIBRARY / "compiler.py"]


def outputs(target: str) -> list[str]:
    return [f"gpt2-{target}.vmfb", f"gpt2-{target}.compile.log"]


def task_compile():
    """gpt2-<target>.vmfb for each of targets= (iree-compile; log beside the vmfb)"""
    cfg = load_config()
    for name in cfg.targets:
        target = TARGETS[name]
        vmfb, log = (cfg.build_dir / f for f in outputs(name))
        yield {
            "name": name,
            "doc": f"gpt2-{name}.vmfb: {target.description}",
            "actions": [call("gpt2_iree.compiler:compile_for", cfg.toolchain_json, cfg.build_dir / "gpt2.mlir",
                             name, vmfb, log)],
            "file_dep": [cfg.build_dir / "gpt2.mlir", cfg.toolchain_json, *SOURCES],
            "targets": [vmfb],
            "uptodate": [config_changed({"flags": target.flags})],
            "clean": [(remove_outputs, [cfg.build_dir, outputs(name)])],
        }
