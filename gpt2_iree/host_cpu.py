"""This machine's CPU: its model and the SIMD features that decide which kernels run.

Benchmarks record it beside every figure (IREE's kernels, llama.cpp's and
JAX's differ by ISA: an AVX2 CPU and an AVX-512 one rank them differently),
and the cpu target picks its flags by it. Stdlib only: targets.py imports it.
"""

from __future__ import annotations

import platform
from pathlib import Path

# x86 /proc/cpuinfo "flags" and Arm "Features" that change what IREE and the
# engines we compare with compile for.
SIMD_FEATURES = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                 "avx512_fp16", "amx_tile", "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2")


def describe_cpu() -> dict:
    """{"model": ..., "vendor": ..., "simd": [...]}: the CPU's model (on x86
    with its family and model numbers, which name the microarchitecture: AMD
    25/1 is Zen 3), its vendor ("GenuineIntel", "AuthenticAMD"; "" where
    /proc/cpuinfo does not say) and, where /proc/cpuinfo says (Linux), its
    features among SIMD_FEATURES."""
    fields = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    features = set((fields.get("flags") or fields.get("Features") or "").split())
    return {"model": name, "vendor": fields.get("vendor_id", ""),
            "simd": [f for f in SIMD_FEATURES if f in features]}


def is_avx2_without_avx512() -> bool:
    """An x86 CPU whose widest vectors are AVX2's 8 floats."""
    simd = describe_cpu()["simd"]
    return "avx2" in simd and "avx512f" not in simd


def is_intel_with_avx512() -> bool:
    """An Intel CPU with AVX-512's 16-float vectors. AMD's Zen 4 has them too,
    on 256-bit units that run each instruction in two halves; the AVX-512
    tuning spec has been measured on Intel only (targets.py)."""
    cpu = describe_cpu()
    return cpu["vendor"] == "GenuineIntel" and "avx512f" in cpu["simd"]
