"""The peak memory of a fine-tuning step and of generation, each in a process of its own.

A process's peak resident set only grows, so one process cannot measure two
things: each is measured in a fresh Python (`python -m gpt2_iree.peak_memory
WHAT BUILD_DIR DEVICE`) that opens the build and does that one thing as the
CLI does it, then reports its peak resident set, the runtime, the modules and
every buffer they allocated included:

* finetune: the whole module, FINETUNE_STEPS steps on one batch of seq_len tokens;
* generate: what `Session.generate` opens, the build's generation module for
  the device (or, without one, the whole module), then a prefill chunk of
  prompt_len tokens and DECODE_STEPS decode steps.
"""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpt2_iree.errors import Gpt2IreeError

FINETUNE_STEPS = 3
DECODE_STEPS = 20
MEASURES = ("finetune", "generate")


def _finetune(build_dir: Path, device: str) -> None:
    from gpt2_iree.module import Module

    module = Module(build_dir, device)
    shapes = module.manifest["shapes"]
    B, S = shapes["batch"], shapes["seq_len"]
    text = np.random.default_rng(0).integers(0, module.manifest["config"]["vocab_size"], (B, S), dtype=np.int32)
    for _ in range(FINETUNE_STEPS):
        module.finetune(text, np.roll(text, -1, axis=1), np.full((B,), S - 1, np.int32), 1e-4)


def _generate(build_dir: Path, device: str) -> None:
    from gpt2_iree.devices import DRIVER_TARGETS
    from gpt2_iree.generation import Rows
    from gpt2_iree.module import Module, has_generation_module, read_manifest
    from gpt2_iree.sampling import Sampling

    manifest = read_manifest(build_dir)
    generator = Module(build_dir, device, generation=has_generation_module(build_dir, manifest, DRIVER_TARGETS[device]))
    rows = Rows(generator)
    rows.start(0, Sampling())
    rows.feed({0: list(range(manifest["shapes"]["prompt_len"]))})
    for _ in range(DECODE_STEPS):
        rows.step({0})


def own_peak_mb() -> float:
    """This process's peak RSS since it started. On Linux ru_maxrss would not
    do: exec keeps the high-water mark of the process it replaced, a fork of
    the caller with all of the caller's memory. VmHWM is the new image's."""
    status = Path("/proc/self/status")
    if status.exists():
        kib = next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(kib) / 2**10
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if platform.system() == "Darwin" else peak / 2**10  # bytes on macOS, KiB elsewhere


def resident_bytes() -> int:
    """This process's resident memory now (Linux); elsewhere its peak, which
    grows whenever the process takes memory beyond all it held before."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * resource.getpagesize()
    return int(own_peak_mb() * 2**20)


def measure(build_dir: Path, device: str, what: str) -> float:
    """Peak RSS in MB of a fresh process doing `what` (one of MEASURES) on the build."""
    if what not in MEASURES:
        raise ValueError(f"unknown measure {what!r}; valid: {', '.join(MEASURES)}")
    child = subprocess.run([sys.executable, "-m", "gpt2_iree.peak_memory", what, str(build_dir), device],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise Gpt2IreeError(f"measuring the peak memory of {what} on {build_dir} failed:\n{child.stderr.strip()}")
    return json.loads(child.stdout.splitlines()[-1])["peak_rss_mb"]


def peak_rss_mb(build_dir: Path, device: str) -> dict[str, float]:
    """{"finetune": MB, "generate": MB}, each measured in its own process."""
    return {what: measure(build_dir, device, what) for what in MEASURES}


def main(argv: list[str]) -> None:
    what, build_dir, device = argv
    try:
        {"finetune": _finetune, "generate": _generate}[what](Path(build_dir), device)
    except Gpt2IreeError as err:
        sys.exit(str(err))  # the message alone, on stderr, for `measure` to pass on
    print(json.dumps({"peak_rss_mb": own_peak_mb()}))


if __name__ == "__main__":
    main(sys.argv[1:])
