"""Look inside a compiled module (`.vmfb`) or a parameter archive (`.irpa`).

`inspect_vmfb` reads the output of the runtime wheel's `iree-dump-module`:

* functions: the exported entry points with the tensor signature IREE's ABI
  records for each (`iree.abi.declaration`); the internal `__init` is left out.
* executable_formats: the HAL executable formats the module carries
  (`embedded-elf-x86_64`, `metal-msl-fb`, `vulkan-spirv-fb`, `cuda-nvptx-fb`...),
  i.e. which devices can run it.
* dispatches: the number of `hal.command_buffer.dispatch` call sites in the
  module's VM bytecode, over all its functions. Each is one kernel launch
  recorded into a command buffer; the model is fully unrolled (no loops in the
  host code), so a function's sites are the launches one call of it makes.
  Each function entry also carries its own count (`dispatches`), e.g. the
  launches of one decode step. Sites in no exported function run when the
  module loads (`dispatches_at_load`): IREE's initializers, which lay out
  constant weights (data tiling's packing), and those of the
  command buffers IREE records there once, for a call to replay (the
  generation module's `encode`, whose own count is then 0).
* waits: per function, the host's waits for the device in one call
  (`hal.fence.await` call sites). 1 is the wait for its results; more mean
  that the call stops midway, and a GPU idles while the host reads a value
  back and records the rest.
* kernels: the number of distinct executable entry points those sites launch,
  counted as the distinct names passed to `hal.executable.lookup.function`
  (e.g. `decode_dispatch_3_matvec_192x64_f32`). Several sites can launch one
  kernel (the same layer shape in every layer), so dispatches >= kernels. This
  works whatever the packaging: a CPU module links all kernels into one shared
  library, a Metal module holds one executable (one zip entry) per kernel.
* source_digest: the digest of the MLIR it was compiled from, which our
  exported functions carry in their reflection (SOURCE_DIGEST_KEY, written by
  stateful.build_module; the manifest holds the export's), or None.

`inspect_irpa` lists an archive's keys and sizes with `iree.runtime.ParameterIndex`.
Either raises `Gpt2IreeError` naming the file when it is missing or not of its kind.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from gpt2_iree.errors import Gpt2IreeError

# The reflection key under which each exported function of a compiled module
# carries the digest of the MLIR text it was compiled from.
SOURCE_DIGEST_KEY = "gpt2_iree_source"

# A HAL executable format string, as stored in the module's read-only data.
_FORMAT = re.compile(r"(?:embedded|system)-(?:elf|dll|dylib)-[a-z0-9_]+|[a-z]+-[a-z0-9]+-fb")
_DECLARATION = re.compile(r"iree\.abi\.declaration:\s*(?:\w+\s+)?func\s+@(\w+)\((.*?)\)\s*->\s*\((.*)\)\s*$")
_TENSOR_ARG = re.compile(r"%\w+:\s*((?:tensor|!hal\.\w+)(?:<[^>]*>)?|[a-z]\w*)")


class InspectError(Gpt2IreeError):
    """A file that cannot be inspected (missing, or not a module / archive)."""


def _check_file(path: Path, kind: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InspectError(f"{path} does not exist")
    if not path.is_file():
        raise InspectError(f"{path} is not a file (expected {kind})")
    return path


def _dump(path: Path) -> str:
    from gpt2_iree.toolchain import runtime_tool

    tool = runtime_tool("iree-dump-module")
    proc = subprocess.run([tool, str(path)], capture_output=True, text=True, errors="replace")
    if proc.returncode != 0 or "Exported Functions:" not in proc.stdout:
        reason = (proc.stderr.strip().splitlines() or ["no module found"])[-1]
        raise InspectError(f"{path} is not an IREE module (.vmfb), and a parameter archive is named .irpa: "
                           f"iree-dump-module says: {reason}")
    return proc.stdout


def _types(args: str) -> str:
    """`%input0: tensor<1x8xi32>, %input1: tensor<1xi32>` -> `tensor<1x8xi32>, tensor<1xi32>`."""
    return ", ".join(_TENSOR_ARG.findall(args))


def _functions(dump: str) -> list[dict]:
    section = dump.split("Exported Functions:", 1)[1].split("\n\n", 1)[0]
    functions, current = [], None
    for line in section.splitlines():
        head = re.match(r"^\s+\[\s*\d+\]\s+(\w+)\((.*)$", line)
        if head:
            current = {"name": head[1], "signature": f"{head[1]}({head[2]}"}
            if not head[1].startswith("__"):
                functions.append(current)
            continue
        decl = _DECLARATION.search(line)
        if decl and current is not None:
            results = _types(decl[3])
            if "," in results:
                results = f"({results})"
            current["signature"] = f"{decl[1]}({_types(decl[2])}) -> {results or '()'}"
    return functions


def _rodata(dump: str) -> dict[int, bytes]:
    """The module's read-only data from the disassembly (`vm.rodata[N] = HEX`)."""
    return {int(i): bytes.fromhex(h) for i, h in re.findall(r"^vm\.rodata\[(\d+)\] = ([0-9A-Fa-f]*)$", dump, re.M)}


def _bytecode(dump: str, rodata: dict[int, bytes]) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """Dispatch call sites and wait call sites per VM function, and the kernel names the dispatches look up."""
    per_function: dict[str, int] = {}
    waits: dict[str, int] = {}
    kernels: set[str] = set()
    registers: dict[str, int] = {}  # ref register -> rodata index last loaded into it
    function = None
    for line in dump.splitlines():
        if m := re.match(r"^vm\.func\s+@(\w+)\(", line):
            function, registers = m[1], {}
            # Not reset: a recorded command buffer's function can print as a second `__init`.
            per_function.setdefault(function, 0)
            waits.setdefault(function, 0)
        elif m := re.match(r"^\s*%[rR](\d+) = vm\.const\.ref\.rodata (\d+)\b", line):
            registers[m[1]] = int(m[2])
        elif m := re.search(r"vm\.call @hal\.executable\.lookup\.function\(%[rR]\d+, %[rR](\d+)\)", line):
            index = registers.get(m[1])
            if index is not None:
                kernels.add(rodata.get(index, str(index).encode()).decode("utf-8", "replace"))
        elif "@hal.command_buffer.dispatch" in line and "vm.call" in line and function:
            per_function[function] += 1
        elif "@hal.fence.await" in line and "vm.call" in line and function:
            waits[function] += 1
    return per_function, waits, kernels


def inspect_vmfb(path: Path) -> dict:
    """What a compiled module holds; see the module docstring for each field."""
    path = _check_file(path, "an IREE module (.vmfb) or a parameter archive (.irpa)")
    dump = _dump(path)
    functions = _functions(dump)
    rodata = _rodata(dump)
    strings = [v.decode("ascii", "replace") for v in rodata.values() if len(v) < 64]
    # Without a disassembly, fall back to the (possibly truncated) strings of the sections table.
    strings += re.findall(r"^\s+\.rodata\[\s*\d+\] embedded\s+\d+ bytes `([^`]*)`", dump, re.M)
    formats = sorted({s for s in strings if _FORMAT.fullmatch(s)})
    per_function, waits, kernels = _bytecode(dump, rodata)
    digest = re.search(rf"^\s+{SOURCE_DIGEST_KEY}: (\w+)$", dump, re.M)
    for f in functions:
        f["dispatches"] = per_function.get(f["name"], 0)
        f["waits"] = waits.get(f["name"], 0)
    return {
        "path": str(path),
        "functions": functions,
        "executable_formats": formats,
        "dispatches": sum(per_function.values()),
        "dispatches_at_load": sum(per_function.values()) - sum(f["dispatches"] for f in functions),
        "kernels": len(kernels),
        "source_digest": digest and digest[1],
        "size_bytes": path.stat().st_size,
    }


def inspect_irpa(path: Path) -> dict:
    """An archive's parameters (key and size in bytes, in archive order) and their total."""
    from gpt2_iree.archive import load_index

    path = _check_file(path, "an IREE parameter archive (.irpa)")
    parameters = [{"key": key, "bytes": int(entry.length)} for key, entry in load_index(path).items()]
    return {"path": str(path), "parameters": parameters,
            "total_bytes": sum(p["bytes"] for p in parameters)}


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _short(signature: str, limit: int = 100) -> str:
    """A long signature as tensor counts, e.g. `get_params() -> (28 tensors)`."""
    if len(signature) <= limit:
        return signature
    m = re.match(r"^(\w+)\((.*?)\) -> \(?(.*?)\)?$", signature)
    if not m:
        return signature[: limit - 3] + "..."

    def side(types: str) -> str:
        n = types.count("tensor<")
        return f"{n} tensors" if len(types) > 40 and n > 1 else types

    return f"{m[1]}({side(m[2])}) -> ({side(m[3])})"


def format_vmfb(info: dict) -> str:
    lines = []
    if "path" in info:
        lines.append(f"{info['path']}  ({_size(info['size_bytes'])})")
    else:
        lines.append(f"module ({_size(info['size_bytes'])})")
    lines.append(f"executable formats: {', '.join(info['executable_formats']) or '(none)'}")
    lines.append(f"source digest: {info['source_digest'] or '(none)'}")
    lines.append(f"dispatches: {info['dispatches']} call sites launching {info['kernels']} distinct kernels; "
                 f"{info['dispatches_at_load']} of the sites run at load (laying out constant weights, and command "
                 f"buffers recorded once for calls to replay)")
    lines.append("functions:")
    width = max((len(f["name"]) for f in info["functions"]), default=0)
    for f in info["functions"]:
        waits = f"{f['waits']} wait{'' if f['waits'] == 1 else 's'}"
        lines.append(f"  {f['name']:<{width}}  {f['dispatches']:>5} dispatches  {waits:<7}  {_short(f['signature'])}")
    return "\n".join(lines)


def format_irpa(info: dict) -> str:
    params = info["parameters"]
    width = max((len(p["key"]) for p in params), default=3)
    digits = max((len(f"{p['bytes']:,}") for p in params), default=1)
    lines = [f"{info['path']}" if "path" in info else "parameter archive"]
    lines += [f"  {p['key']:<{width}}  {p['bytes']:>{digits},} B" for p in params]
    lines.append(f"{len(params)} parameters, {info['total_bytes']:,} bytes ({_size(info['total_bytes'])})")
    return "\n".join(lines)
