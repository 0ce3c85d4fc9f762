"""Run `iree-compile` for one target: atomic outputs, full logs beside them."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gpt2_iree import generate_weights
from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import replace_atomically
from gpt2_iree.targets import Target, compile_command, get_target, log_name, vmfb_name
from gpt2_iree.toolchain import read_record

LOG_TAIL_LINES = 40
# IREE 3.13's iree-compile now and then deadlocks when it is given a tuning
# spec (the cpu target's on Intel and AVX2 CPUs, targets.py): a worker thread
# parses the spec under IREECodegenDialect's library lock, the parser verifies
# it on the thread pool, and while it waits the worker takes another
# executable's task, which wants the same lock (gdb on one hung compile of
# five seen in this project's runs). Every thread then waits, no CPU is used;
# it happens early, and a rerun goes through. A compile whose CPU time, its
# children's included, stands still this long is stopped and run once more:
# a working compile never idles this long.
STALL_S = 60


class CompileError(Gpt2IreeError):
    pass


def compile_module(compiler: str, mlir: Path, target: Target, vmfb: Path, log: Path, generation: bool = False,
                   lora: bool = False, int8: bool = False, packed: bool = False, stall_s: float = STALL_S) -> None:
    """Compile `mlir` into `vmfb` (with `generation`, as the target's generation
    module, `packed` the one on packed weights; with `lora`, as a LoRA build's
    module; `int8`: one that generates on int8 weights); on failure raise with
    the log's tail. A compile that stalls
    (no CPU time for `stall_s`) is stopped and run once more. The unfinished
    output is removed whatever happens."""
    def compile_to(tmp: Path) -> None:
        cmd = compile_command(compiler, target, mlir, tmp, generation, lora, int8, packed)
        for attempt in (1, 2):
            with open(log, "w") as log_file:
                log_file.write(shlex.join(cmd) + "\n")
                log_file.flush()
                returncode = _run_watched(cmd, log_file, stall_s)
            if returncode is not None:
                break
            stalled = f"iree-compile for target {target.name} used no CPU for {stall_s} s"
            if attempt == 2:
                raise CompileError(f"{stalled}, twice, and was stopped; full log: {log}")
            print(f"gpt2-iree: {stalled} (IREE 3.13 hangs now and then); stopped it, running it once more",
                  file=sys.stderr)
        if returncode != 0:
            tail = "\n".join(log.read_text().splitlines()[-LOG_TAIL_LINES:])
            raise CompileError(f"iree-compile failed for target {target.name} "
                               f"(exit {returncode}); full log: {log}\n{tail}")

    replace_atomically(vmfb, compile_to)


def compile_target(compiler: str, build_dir: Path, target: Target) -> None:
    """`compiler` (an iree-compile) builds the target's whole module from
    gpt2.mlir and, where the target has one, its generation module from
    gpt2-generate.mlir (for a target with `packed_weights`, the manifest's
    module on packed weights where it has one, as for a LoRA build's
    gpt2.mlir), side by side: one iree-compile keeps about one of this
    machine's two cores busy. A LoRA build (its manifest names a frozen
    `base`) has one module, compiled with the target's `lora_flags`; a
    module that generates on int8 weights gets the target's `int8_flags` too."""
    build_dir = Path(build_dir)
    manifest = json.loads((build_dir / "manifest.json").read_text())
    lora = "base" in manifest
    int8 = generate_weights.of_build(manifest) == "int8"
    # The module that reads the weights as constants, as this target reads it: plain or packed.
    constant = generate_weights.as_read_by(manifest["base" if lora else "generate"], target.packed_weights)
    whole = constant["mlir"] if lora and constant["packed"] else "gpt2.mlir"

    def build(mlir: str, generation: bool) -> None:
        vmfb = vmfb_name(target.name, generation)
        compile_module(compiler, build_dir / mlir, target, build_dir / vmfb, build_dir / log_name(vmfb), generation,
                       lora, int8, (generation or lora) and constant["packed"])

    jobs = [(whole, False)] + \
        ([(constant["mlir"], True)] if target.has_generation_module and not lora else [])
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(build, *job) for job in jobs]
    for future in futures:
        future.result()


def compile_for(toolchain_json: Path, build_dir: Path, target_name: str) -> None:
    """The compile stage: `compile_target` with the toolchain's iree-compile."""
    compile_target(read_record(toolchain_json)["iree_compile"], build_dir, get_target(target_name))


def _run_watched(cmd: list[str], log_file, stall_s: float) -> int | None:
    """Run `cmd`, its output into `log_file`: its exit status, or None if it
    stalled (alive, its CPU time unchanged for `stall_s`), when it is stopped.
    Where /proc is missing (macOS) nothing watches it. It runs in a session of
    its own, so stopping it, on a stall or Ctrl-C, stops its children too."""
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        ticks, since = None, time.monotonic()
        while True:
            try:
                return proc.wait(timeout=min(5.0, stall_s / 4))
            except subprocess.TimeoutExpired:
                pass
            now, previous, ticks = time.monotonic(), ticks, _cpu_ticks(proc.pid)
            if ticks is None or ticks != previous:
                since = now
            elif now - since >= stall_s:
                return None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _cpu_ticks(pid: int) -> int | None:
    """CPU time (clock ticks) of process `pid` and of its children, running or
    ended (iree-compile runs lld to link CPU code); None without /proc."""
    def times(process) -> list[int]:
        # After the command's name, in parentheses: state, ppid, ...; utime is
        # the 14th field, then stime and the ended children's two.
        try:
            fields = Path(f"/proc/{process}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # gone since it was listed
            return []
        return [int(f) for f in fields[11:15]]

    own = times(pid)
    if not own:
        return None
    running = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            running += (task / "children").read_text().split()
        except FileNotFoundError:  # a thread that ended, or a kernel without the list
            pass
    return sum(own) + sum(sum(times(child)[:2]) for child in running)
