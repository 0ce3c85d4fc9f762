"""export: GPT-2 in JAX -> one stateful module (gpt2.mlir) + its weights (gpt2.irpa)."""

from doit.tools import config_changed

from gpt2_iree.targets import packed_name, packs_weights
from tasks.actions import call_with_toolchain, remove_outputs
from tasks.config import load_config
from tasks.sources import library_sources

# The function the action calls, and the library code it runs (whose output
# this stage writes): a change re-exports.
ENTRY = "gpt2_iree.export:build"
SOURCES = library_sources(ENTRY)


def mlir_outputs(lora: bool, generate_weights: str) -> tuple[str, ...]:
    """The modules' MLIR an export writes: a LoRA build has one module, a full
    build a generation module too; and the one that reads its weights as
    constants (the LoRA module, the generation module) again on them packed,
    for the targets that read them so (the CPU), where `packs_weights`."""
    constant = "gpt2.mlir" if lora else "gpt2-generate.mlir"
    packed = (packed_name(constant),) if packs_weights(generate_weights, lora) else ()
    return ("gpt2.mlir", *(() if lora else (constant,)), *packed)


def outputs(lora: bool, generate_weights: str) -> tuple[str, ...]:
    """Everything an export writes but the tokenizer; a LoRA build's frozen
    weights, and a full build's generation weights, have their own archive
    (two where `packs_weights`: plain and packed)."""
    constant = "base.irpa" if lora else "gpt2-generate.irpa"
    packed = (packed_name(constant),) if packs_weights(generate_weights, lora) else ()
    return (*mlir_outputs(lora, generate_weights), constant, *packed, "gpt2.irpa", "manifest.json")


def task_export():
    """gpt2.mlir (encode, decode, finetune, eval_loss, get/set_params, get/set_opt_state) + gpt2.irpa + manifest.json"""
    cfg = load_config()
    written = outputs(cfg.lora is not None, cfg.generate_weights)
    return {
        # The module is built with iree.compiler and the archive written with
        # iree.runtime: the toolchain's, so a source build exports with its own.
        "actions": [call_with_toolchain(cfg.toolchain_json, ENTRY, cfg.build_dir, cfg.model,
                                        cfg.model_dir if cfg.needs_assets else None, cfg.weights,
                                        cfg.hub.shape() if cfg.hub else None, cfg.shapes(), cfg.optimizer, cfg.lora,
                                        cfg.generate_weights, cfg.doit_vars())],
        "file_dep": [*SOURCES, cfg.toolchain_json, *([cfg.assets_lock] if cfg.needs_assets else [])],
        "targets": [cfg.build_dir / f for f in written],
        "uptodate": [config_changed({"model": cfg.model, "revision": cfg.hub and cfg.hub.revision,
                                     "weights": cfg.weights, "shapes": cfg.shapes(), "optimizer": cfg.optimizer,
                                     "generate_weights": cfg.generate_weights,
                                     **({"lora": cfg.lora} if cfg.lora else {})})],
        "clean": [(remove_outputs, [cfg.build_dir, [*written, "tokenizer.json"]])],
    }
