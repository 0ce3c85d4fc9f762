"""verify:<target>: the compiled module against the JAX reference, on the same weights."""

from gpt2_iree.targets import TARGETS, on_vulkan
from tasks.actions import call_with_toolchain, remove_outputs
from tasks.compile import outputs as compile_outputs
from tasks.config import load_config
from tasks.sources import library_sources

# The function the action calls, and the library code it runs.
ENTRY = "gpt2_iree.verify:verify_build"
SOURCES = library_sources(ENTRY)


def task_verify():
    """Parity with JAX where this host runs the target (cpu, vulkan here), or its kernels on Vulkan, and structure"""
    cfg = load_config()
    lora = cfg.lora is not None
    for name in cfg.targets:
        report = cfg.build_dir / f"verify-{name}.json"
        yield {
            "name": name,
            "doc": f"verify gpt2-{name}.vmfb (and its generation module) -> verify-{name}.json",
            # Runs the module with the toolchain's iree.runtime: a new runtime verifies again.
            "actions": [call_with_toolchain(cfg.toolchain_json, ENTRY, cfg.build_dir, name, report,
                                            cfg.toolchain_json)],
            "file_dep": [*(cfg.build_dir / f for f in compile_outputs(TARGETS[name], lora) if f.endswith(".vmfb")),
                         cfg.build_dir / "manifest.json", cfg.toolchain_json, *SOURCES],
            "targets": [report],
            # Where the host lacks Metal, the check compiles the Metal build's kernels for Vulkan.
            "clean": [(remove_outputs, [cfg.build_dir, [report.name, *(
                compile_outputs(on_vulkan(TARGETS[name]), lora) if TARGETS[name].gpu else [])]])],
            "verbosity": 2,  # the parity summary
        }
