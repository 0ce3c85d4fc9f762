"""Run `iree-compile` for one target: atomic output, full log beside it."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.targets import Target, compile_command, get_target
from gpt2_iree.toolchain import read_record

LOG_TAIL_LINES = 40


class CompileError(Gpt2IreeError):
    pass


def compile_module(compiler: str, mlir: Path, target: Target, vmfb: Path, log: Path) -> None:
    """Compile `mlir` into `vmfb`; on failure raise with the log's tail.
    The unfinished output is removed whatever happens."""
    tmp = vmfb.with_name(vmfb.name + ".tmp")
    try:
        cmd = compile_command(compiler, target, mlir, tmp)
        with open(log, "w") as log_file:
            log_file.write(shlex.join(cmd) + "\n")
            log_file.flush()
            result = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-LOG_TAIL_LINES:])
            raise CompileError(f"iree-compile failed for target {target.name} "
                               f"(exit {result.returncode}); full log: {log}\n{tail}")
        os.replace(tmp, vmfb)
    finally:
        tmp.unlink(missing_ok=True)


def compile_for(toolchain_json: Path, mlir: Path, target_name: str, vmfb: Path, log: Path) -> None:
    """The compile stage: the toolchain's `iree-compile` for one named target."""
    compiler = read_record(toolchain_json)["iree_compile"]
    compile_module(compiler, Path(mlir), get_target(target_name), Path(vmfb), Path(log))
