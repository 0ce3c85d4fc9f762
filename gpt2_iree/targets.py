"""What `iree-compile` (IREE 3.13, pip wheel) is told for each deployment target.

Every target compiles the whole stateful module (encode, decode, finetune,
get/set_params, get_state) and, where it can store float16, the generation
module (encode, decode, get_state on float16 weights); the weights stay
outside, in the parameter archive.

Two IREE codegen problems shape the GPU rows below; both show up in `finetune`:

* Reduction identity.  Backprop through log_softmax sums a negated tensor;
  arith canonicalization folds `acc + (-x)` into `acc - x`, a reduction body
  that has no identity value.  Every pipeline that tiles or splits the
  reduction across threads then dies with "'linalg.generic' op Failed to get
  an identity value for the reduction operation" (CUDA adds "tiling of level
  PartialReduction failed").
* Subgroups.  The SPIR-V targets with subgroup ops (IREE's default Apple
  target, desktop Vulkan targets such as `ampere`/`rdna3`) pick the
  subgroup-reduce pipeline, which hits the identity error above and also fails
  with "failed to legalize operation 'memref.alloc'" (a workgroup-memory
  memref<64xindex>).  On iOS SPIRV-Cross additionally aborts with "Subgroup ops
  beyond broadcast, ballot, and shuffle on iOS require Metal 2.3 and up".
  A target whose `#iree_gpu.target` says `subgroup = none` avoids all three.

Stdlib only: importing this module must not pull in jax or IREE.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "metal", "ios", "cpu", "vulkan", "cuda"
    description: str  # one line for humans
    backend: str  # as `iree-compile --iree-hal-list-target-backends` prints it
    executable_format: str  # as `iree-dump-module` shows it in .rodata
    runtime_driver: str  # iree.runtime driver that executes it
    flags: tuple[str, ...]
    # Added to `flags` for the generation module; None: the target has none.
    generate_flags: tuple[str, ...] | None = ()

    @property
    def has_generation_module(self) -> bool:
        return self.generate_flags is not None


# IREE 3.13's default Apple GPU (what plain `metal-spirv` uses), except
# `subgroup = none` instead of `shuffle|arithmetic`: see "Subgroups" above.
APPLE_GPU_NO_SUBGROUPS = (
    '#iree_gpu.target<arch = "apple", features = "spirv:v1.3,cap:Shader", '
    "wgp = <compute = fp32|fp16|int64|int32|int16|int8, storage = b64|b32|b16|b8, "
    "subgroup = none, dot = dp4xi8toi32, subgroup_size_choices = [32], "
    "max_workgroup_sizes = [1024, 1024, 1024], max_thread_count_per_workgroup = 1024, "
    "max_workgroup_memory_bytes = 32768, max_workgroup_counts = [65535, 65535, 65535]>>"
)

# The Metal device with that GPU.  As a flag value (below) it compiles exactly
# as if the module carried `attributes {hal.device.targets = [<this>]}`, so
# the exported gpt2.mlir stays the same for every target.
METAL_DEVICE_TARGET = (
    '#hal.device.target<"metal", [#hal.executable.target<"metal-spirv", "metal-msl-fb", '
    "{iree_codegen.target_info = " + APPLE_GPU_NO_SUBGROUPS + "}>]> : !hal.device"
)

_METAL_FLAGS = (
    # `--iree-hal-target-device` accepts a full `#hal.device.target<...>`, which
    # is how the subgroup-free Apple GPU is chosen without editing the module:
    # there is no flag for the Metal GPU's target info.  The `__device_0=`
    # prefix names the device: without it IREE names the device global after
    # the whole attribute text (the vmfb's __init grows by ~68 KB); with it
    # the output equals that of the module attribute.
    f"--iree-hal-target-device=__device_0={METAL_DEVICE_TARGET}",
    # Embed MSL source instead of a .metallib: no Xcode/`metal` toolchain is
    # needed to build, and the Metal driver compiles the MSL when the module
    # loads.  The MSL is language version 3.0, so macOS 13+ / iOS 16+.
    "--iree-metal-compile-to-metallib=false",
)


def _host_elf_format() -> str:
    """`embedded-elf-<arch>` for the machine compiling with target-cpu=host."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "arm_64", "aarch64": "arm_64"}
    return "embedded-elf-" + arch.get(machine, machine)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            name="cpu",
            description="This machine's CPU (llvm-cpu, tuned for the host)",
            backend="llvm-cpu",
            executable_format=_host_elf_format(),
            runtime_driver="local-task",
            flags=(
                "--iree-hal-target-backends=llvm-cpu",
                # The build machine's ISA: the vmfb is for running here, not for shipping.
                "--iree-llvmcpu-target-cpu=host",
                # With output-major weights, no weight is transposed at run time.
                "--iree-opt-aggressively-propagate-transposes",
                # Spreads long reductions (the argmax over 50k logits, the
                # optimizer's norms over whole weights) over threads; without it
                # each ran on one core. 124M, 2 cores: decode 36.4 -> 23.1 ms,
                # finetune step 2.21 -> 1.55 s (iree-benchmark-module).
                "--iree-dispatch-creation-enable-split-reduction",
            ),
            # The generation module's weights are constant, so data tiling
            # packs them once, at load, into the layout of the ukernels'
            # matrix-vector products: a 124M decode step 25 -> 9.5 ms (the
            # same module untiled; the float32 module's step is 20 ms). The
            # whole module can't: its weights change every step and would be
            # packed in every call, and `finetune` fails to compile tiled.
            generate_flags=("--iree-opt-data-tiling", "--iree-llvmcpu-enable-ukernels=all"),
        ),
        Target(
            name="metal",
            description="Apple GPU on macOS 13+ (Metal, MSL embedded)",
            backend="metal-spirv",
            executable_format="metal-msl-fb",
            runtime_driver="metal",
            flags=_METAL_FLAGS,
        ),
        Target(
            name="ios",
            description="Apple GPU on iOS 16+ (Metal, MSL embedded)",
            backend="metal-spirv",
            executable_format="metal-msl-fb",
            runtime_driver="metal",
            flags=_METAL_FLAGS
            + (
                # SPIRV-Cross emits MSL for iOS and enforces iOS's limits (it is
                # what rejects subgroup ops there).  With the subgroup-free GPU
                # the MSL happens to equal the macOS build's.  `ios-simulator`
                # only differs when compiling to .metallib.
                "--iree-metal-target-platform=ios",
            ),
        ),
        Target(
            name="vulkan",
            description="Any Vulkan 1.1 GPU (portable SPIR-V baseline)",
            backend="vulkan-spirv",
            executable_format="vulkan-spirv-fb",
            runtime_driver="vulkan",
            flags=(
                # No --iree-vulkan-target: the default, vp_android_baseline_2022
                # (fp32/int32, subgroup = none), compiles everything and runs on
                # any Vulkan GPU.  Named GPUs (`ampere`, `rdna3`, ...) have
                # subgroups and fail `finetune` (see "Subgroups" above).
                "--iree-hal-target-device=vulkan",
            ),
            # The baseline has no 16-bit storage: float16 weights fail to
            # compile ("failed to legalize operation 'vector.bitcast'").
            generate_flags=None,
        ),
        Target(
            name="cuda",
            description="NVIDIA GPU, Ampere (sm_80) or newer (CUDA, PTX embedded)",
            backend="cuda",
            executable_format="cuda-nvptx-fb",
            runtime_driver="cuda",
            flags=(
                "--iree-hal-target-device=cuda",
                # PTX for sm_80; the driver JITs it for sm_80 and newer GPUs.
                "--iree-cuda-target=sm_80",
                # The default reduction vector-distribution pipeline splits
                # finetune's negated-sum reduction and fails: "Failed to get an
                # identity value for the reduction operation" / "tiling of level
                # PartialReduction failed".  The fallback pipeline compiles it.
                "--iree-codegen-llvmgpu-use-reduction-vector-distribution=false",
            ),
        ),
    )
}


def get_target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}") from None


def vmfb_name(target: str, generation: bool = False) -> str:
    """The file name of `target`'s whole module, or with `generation` its generation module."""
    return f"gpt2-generate-{target}.vmfb" if generation else f"gpt2-{target}.vmfb"


def log_name(vmfb: str) -> str:
    """The file name of the compile log beside the module named `vmfb`."""
    return vmfb.removesuffix(".vmfb") + ".compile.log"


def compile_command(compiler: str, target: Target, input_path: str | Path, output_path: str | Path,
                    generation: bool = False) -> list[str]:
    """argv of `compiler` (an iree-compile binary) building `target`'s whole
    module from `input_path`, or with `generation` its generation module."""
    extra = target.generate_flags if generation else ()
    return [compiler, str(input_path), *target.flags, *extra, "-o", str(output_path)]
