"""Run `iree-compile` for one target: atomic outputs, full logs beside them."""

from __future__ import annotations

import json
import shlex
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpt2_iree import generate_weights
from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import replace_atomically
from gpt2_iree.targets import Target, compile_command, get_target, log_name, vmfb_name
from gpt2_iree.toolchain import read_record

LOG_TAIL_LINES = 40


class CompileError(Gpt2IreeError):
    pass


def compile_module(compiler: str, mlir: Path, target: Target, vmfb: Path, log: Path, generation: bool = False,
                   lora: bool = False, int8: bool = False) -> None:
    """Compile `mlir` into `vmfb` (with `generation`, as the target's generation
    module; with `lora`, as a LoRA build's module; `int8`: one that generates on int8 weights); on failure raise with the
    log's tail. The unfinished output is removed whatever happens."""
    def compile_to(tmp: Path) -> None:
        cmd = compile_command(compiler, target, mlir, tmp, generation, lora, int8)
        with open(log, "w") as log_file:
            log_file.write(shlex.join(cmd) + "\n")
            log_file.flush()
            result = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-LOG_TAIL_LINES:])
            raise CompileError(f"iree-compile failed for target {target.name} "
                               f"(exit {result.returncode}); full log: {log}\n{tail}")

    replace_atomically(vmfb, compile_to)


def compile_target(compiler: str, build_dir: Path, target: Target) -> None:
    """`compiler` (an iree-compile) builds the target's whole module from
    gpt2.mlir and, where the target has one, its generation module from
    gpt2-generate.mlir, side by side: one iree-compile keeps about one of this
    machine's two cores busy. A LoRA build (its manifest names a frozen
    `base`) has one module, compiled with the target's `lora_flags`; a
    module that generates on int8 weights gets the target's `int8_flags` too."""
    build_dir = Path(build_dir)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    lora = "base" in manifest
    int8 = generate_weights.of_build(manifest) == "int8"

    def build(mlir: str, generation: bool) -> None:
        vmfb = vmfb_name(target.name, generation)
        compile_module(compiler, build_dir / mlir, target, build_dir / vmfb, build_dir / log_name(vmfb), generation,
                       lora, int8)

    jobs = [("gpt2.mlir", False)] + \
        ([("gpt2-generate.mlir", True)] if target.has_generation_module and not lora else [])
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(build, *job) for job in jobs]
    for future in futures:
        future.result()


def compile_for(toolchain_json: Path, build_dir: Path, target_name: str) -> None:
    """The compile stage: `compile_target` with the toolchain's iree-compile."""
    compile_target(read_record(toolchain_json)["iree_compile"], build_dir, get_target(target_name))
