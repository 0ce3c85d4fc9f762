"""iree-compile as the compile stage runs it: atomic output, a log, a clear failure."""

import pytest

from gpt2_iree import compiler, toolchain
from gpt2_iree.targets import get_target


def test_a_failed_compile_shows_the_log_tail_and_leaves_no_output(tmp_path):
    mlir = tmp_path / "gpt2.mlir"
    mlir.write_text("module @gpt2 {\n  func.func @f() -> tensor<2xf32> {\n    %0 = no.such_op\n  }\n}\n")
    vmfb, log = tmp_path / "gpt2-cpu.vmfb", tmp_path / "gpt2-cpu.compile.log"
    with pytest.raises(compiler.CompileError) as err:
        compiler.compile_module(toolchain.iree_compile(), mlir, get_target("cpu"), vmfb, log)
    message = str(err.value)
    assert "iree-compile failed for target cpu" in message and str(log) in message
    assert "no.such_op" in message  # the tail of the log, where the error is
    assert log.read_text().startswith(toolchain.iree_compile())  # the command, for re-running by hand
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2-cpu.compile.log", "gpt2.mlir"]
