"""iree-compile as the compile stage runs it: atomic output, a log, a clear failure."""

import os
import sys
from pathlib import Path

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


# A stand-in for iree-compile, which can't be made to hang on demand: it writes
# its pid to `runs` (one line per run), then does what `script` says, and
# writes the module. It is a real process that really stalls or really works.
STANDIN = '''#!{python}
import os, subprocess, sys, time
runs = {runs!r}
with open(runs, "a") as f:
    print(os.getpid(), file=f)
run = len(open(runs).read().split())
{script}
open(sys.argv[sys.argv.index("-o") + 1], "wb").write(b"module")
'''


def standin_compiler(tmp_path, script: str) -> tuple[str, Path]:
    runs = tmp_path / "runs.txt"
    path = tmp_path / "iree-compile"
    path.write_text(STANDIN.format(python=sys.executable, runs=str(runs), script=script))
    path.chmod(0o755)
    return str(path), runs


def compile_with(compiler_path: str, tmp_path, stall_s: float):
    mlir, vmfb, log = tmp_path / "gpt2.mlir", tmp_path / "gpt2-cpu.vmfb", tmp_path / "gpt2-cpu.compile.log"
    mlir.write_text("module {}\n")
    compiler.compile_module(compiler_path, mlir, get_target("cpu"), vmfb, log, stall_s=stall_s)
    return vmfb


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_compile_that_stalls_is_stopped_and_run_again(tmp_path, capsys):
    # The first run waits without using CPU, as IREE 3.13's hang does.
    path, runs = standin_compiler(tmp_path, "if run == 1:\n    time.sleep(600)")
    vmfb = compile_with(path, tmp_path, stall_s=1.0)
    assert vmfb.read_bytes() == b"module"
    first, second = map(int, runs.read_text().split())
    assert not is_running(first)
    assert "used no CPU for 1.0 s" in capsys.readouterr().err


def test_a_compile_that_stalls_twice_fails_and_leaves_no_output(tmp_path):
    path, runs = standin_compiler(tmp_path, "time.sleep(600)")
    with pytest.raises(compiler.CompileError, match="used no CPU for 1.0 s, twice"):
        compile_with(path, tmp_path, stall_s=1.0)
    assert not any(map(is_running, map(int, runs.read_text().split())))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpt2-cpu.compile.log", "gpt2.mlir", "iree-compile", "runs.txt"]


@pytest.mark.parametrize("where", ["itself", "in a child"])
def test_a_compile_that_works_longer_than_the_stall_limit_is_left_alone(tmp_path, where):
    # iree-compile runs lld as a child to link CPU code: the child's CPU time counts.
    busy = "import time\nend = time.time() + 3\nwhile time.time() < end:\n    pass"
    script = busy if where == "itself" else f"subprocess.run([sys.executable, '-c', {busy!r}], check=True)"
    path, runs = standin_compiler(tmp_path, script)
    assert compile_with(path, tmp_path, stall_s=1.0).read_bytes() == b"module"
    assert len(runs.read_text().split()) == 1
