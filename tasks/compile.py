"""compile:<target>: gpt2.mlir -> gpt2-<target>.vmfb, and gpt2-generate.mlir ->
gpt2-generate-<target>.vmfb where the target has a generation module."""

from doit.tools import config_changed

from gpt2_iree.targets import TARGETS, Target, flag_files, log_name, vmfb_name
from tasks.actions import call, remove_outputs
from tasks.config import load_config
from tasks.export import mlir_outputs
from tasks.sources import library_sources

# The function the action calls, and the library code it runs.
ENTRY = "gpt2_iree.compiler:compile_for"
SOURCES = library_sources(ENTRY)


def outputs(target: Target, lora: bool = False) -> list[str]:
    """The files compiling `target` writes: each module and its compile log
    (a LoRA build has one module)."""
    modules = [False] + ([True] if target.has_generation_module and not lora else [])
    names = [vmfb_name(target.name, generation) for generation in modules]
    return names + [log_name(name) for name in names]


def task_compile():
    """gpt2-<target>.vmfb (and gpt2-generate-<target>.vmfb) for each of targets= (iree-compile; logs beside)"""
    cfg = load_config()
    lora = cfg.lora is not None
    for name in cfg.targets:
        target = TARGETS[name]
        yield {
            "name": name,
            "doc": f"gpt2-{name}.vmfb: {target.description}",
            "actions": [call(ENTRY, cfg.toolchain_json, cfg.build_dir, name)],
            "file_dep": [*(cfg.build_dir / mlir for mlir in mlir_outputs(lora, cfg.generate_weights)),
                         cfg.toolchain_json, *SOURCES,
                         *flag_files(target)],
            "targets": [cfg.build_dir / f for f in outputs(target, lora) if f.endswith(".vmfb")],
            "uptodate": [config_changed({"flags": target.flags, "training_flags": target.training_flags,
                                         **({"lora_flags": target.lora_flags} if lora else
                                            {"generate_flags": target.generate_flags,
                                             **({"int8_flags": target.int8_flags}
                                                if cfg.generate_weights == "int8" else {}),
                                             **({"packed_flags": target.packed_flags}
                                                if target.packed_weights else {})})})],
            "clean": [(remove_outputs, [cfg.build_dir, outputs(target, lora)])],
        }
