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

from gpt2_iree.host_cpu import is_avx2_without_avx512, is_intel_with_avx512


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "metal", "ios", "cpu", "vulkan", "cuda"
    description: str  # one line for humans
    backend: str  # as `iree-compile --iree-hal-list-target-backends` prints it
    executable_format: str  # as `iree-dump-module` shows it in .rodata
    runtime_driver: str  # iree.runtime driver that executes it
    flags: tuple[str, ...]
    # Added to `flags` for the generation module, each replacing a flag of the
    # same name; None: the target has none.
    generate_flags: tuple[str, ...] | None = ()
    # Added to `flags`, in the same way, for a LoRA build's one module: its
    # frozen base is float16 or int8 and constant, its adapters are trained.
    lora_flags: tuple[str, ...] = ()
    # Added to `flags` for the modules that fine-tune (the whole module and a
    # LoRA build's), never for the generation module.
    training_flags: tuple[str, ...] = ()
    # The `#iree_gpu.target` a SPIR-V target's kernels are tiled for, where
    # the target names it.
    gpu: str | None = None
    # The GPU description a module that generates on int8 weights (a
    # generation module's, a LoRA build's base) is compiled for
    # (`int8_flags`), where it differs from the target's.
    int8_gpu: str | None = None
    # Whether the module that reads constant float16 matrices (the generation
    # module, a LoRA build's one module) reads them packed into the kernels'
    # tiles (packed.py) where the build has them (`packs_weights`), compiled
    # with `packed_flags` after `generate_flags` or `lora_flags`.
    packed_weights: bool = False
    packed_flags: tuple[str, ...] = ()

    @property
    def has_generation_module(self) -> bool:
        return self.generate_flags is not None

    @property
    def int8_flags(self) -> tuple[str, ...]:
        """Added after `generate_flags` or `lora_flags`, in the same way, for a module on int8 weights."""
        if self.int8_gpu is None:
            return ()
        return ("--iree-hal-target-device=__device_0="
                + device_target(self.runtime_driver, self.backend, self.executable_format, self.int8_gpu),)


# IREE 3.13's default Apple GPU (what plain `metal-spirv` uses), except
# `subgroup = none` instead of `shuffle|arithmetic`: see "Subgroups" above.
APPLE_GPU_NO_SUBGROUPS = (
    '#iree_gpu.target<arch = "apple", features = "spirv:v1.3,cap:Shader", '
    "wgp = <compute = fp32|fp16|int64|int32|int16|int8, storage = b64|b32|b16|b8, "
    "subgroup = none, dot = dp4xi8toi32, subgroup_size_choices = [32], "
    "max_workgroup_sizes = [1024, 1024, 1024], max_thread_count_per_workgroup = 1024, "
    "max_workgroup_memory_bytes = 32768, max_workgroup_counts = [65535, 65535, 65535]>>"
)

# IREE 3.13's default Vulkan GPU, the portable `vp_android_baseline_2022`,
# with 16-bit storage and float16 arithmetic added: what float16 weights need
# (the baseline fails them: "failed to legalize operation 'vector.bitcast'").
# Desktop GPUs and Mesa's lavapipe have both (storageBuffer16BitAccess,
# shaderFloat16); no subgroups, as in the baseline.
VULKAN_GPU_16BIT = (
    '#iree_gpu.target<arch = "vp_android_baseline_2022", features = "spirv:v1.3,cap:Shader", '
    "wgp = <compute = fp32|fp16|int32, storage = b32|b16, subgroup = none, subgroup_size_choices = [64], "
    "max_workgroup_sizes = [128, 128, 64], max_thread_count_per_workgroup = 128, "
    "max_workgroup_memory_bytes = 16384, max_workgroup_counts = [65535, 65535, 65535]>>"
)


def with_int8_dot(gpu: str) -> str:
    """`gpu` with SPIR-V 1.6's integer dot product, for int8 weights. Without
    it IREE 3.13's SPIR-V int8 x int8 -> int32 matmul came out wrong on
    lavapipe (int8 compute and 8-bit storage alone); with it, exact. A Vulkan
    1.3 device has it (shaderIntegerDotProduct)."""
    gpu = gpu.replace("spirv:v1.3", "spirv:v1.6")
    return gpu if "dot = " in gpu else gpu.replace("subgroup = none,", "subgroup = none, dot = dp4xi8toi32,")


# What int8 weights need besides: 8-bit storage and int8 arithmetic
# (storageBuffer8BitAccess, shaderInt8; Mesa's lavapipe and desktop GPUs have both).
VULKAN_GPU_INT8 = with_int8_dot(
    VULKAN_GPU_16BIT.replace("compute = fp32|fp16|int32,", "compute = fp32|fp16|int32|int16|int8,")
    .replace("storage = b32|b16,", "storage = b32|b16|b8,"))


def device_target(driver: str, backend: str, executable_format: str, gpu: str) -> str:
    """A `#hal.device.target` whose one executable target is tiled for `gpu`.
    As the value of `--iree-hal-target-device=__device_0=` it compiles exactly
    as if the module carried `attributes {hal.device.targets = [<this>]}`, so
    the exported gpt2.mlir stays the same for every target. The `__device_0=`
    prefix names the device: without it IREE names the device global after the
    whole attribute text (the vmfb's __init grows by ~68 KB)."""
    return (f'#hal.device.target<"{driver}", [#hal.executable.target<"{backend}", "{executable_format}", '
            f"{{iree_codegen.target_info = {gpu}}}>]> : !hal.device")


# The flag that compiles for a Vulkan device with VULKAN_GPU_16BIT.
VULKAN_16BIT_DEVICE = ("--iree-hal-target-device=__device_0="
                       + device_target("vulkan", "vulkan-spirv", "vulkan-spirv-fb", VULKAN_GPU_16BIT))

_METAL_FLAGS = (
    # `--iree-hal-target-device` accepts a full `#hal.device.target<...>`, which
    # is how the subgroup-free Apple GPU is chosen without editing the module:
    # there is no flag for the Metal GPU's target info.
    "--iree-hal-target-device=__device_0="
    + device_target("metal", "metal-spirv", "metal-msl-fb", APPLE_GPU_NO_SUBGROUPS),
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


# The fine-tuning step's float32 matmuls get tiles of their own where one was
# measured faster (each spec says which and why). AVX2: a 124M step 2.69 ->
# 2.40 s on an AMD Zen 3. Intel with AVX-512: 1.76-1.96 -> 1.27-1.29 s
# (iree-benchmark-module, alternating). On AMD's Zen 4 IREE's defaults ran
# the step as fast as JAX, and the AVX-512 spec is unmeasured there. The
# generation module's matmuls are data-tiled, which a spec would annotate
# before the tiling.
AVX2_MATMUL_TUNING = Path(__file__).with_name("avx2_matmul_tuning.mlir")
AVX512_MATMUL_TUNING = Path(__file__).with_name("avx512_matmul_tuning.mlir")


def _cpu_training_flags() -> tuple[str, ...]:
    spec = (AVX2_MATMUL_TUNING if is_avx2_without_avx512() else
            AVX512_MATMUL_TUNING if is_intel_with_avx512() else None)
    return (f"--iree-codegen-tuning-spec-path={spec}",) if spec else ()


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
            # The generation module's weights are constant, so the export
            # stores them packed in the tiles of the ukernels' matrix-vector
            # products (`packed_weights`, packed.py): float16 and int8. Data
            # tiling packed them at load before, a second copy (124M
            # generation peaked at 608 MB, now 336); with the products tiled
            # by hand it would tile only attention, and pack each step's K/V
            # window for it: 10.5 ms of a 124M decode step at position 900
            # (33.6 ms against 24.6 untiled).
            generate_flags=("--iree-llvmcpu-enable-ukernels=all",),
            # A LoRA build decodes on its packed float16 base in 18.5 ms
            # instead of 30. Split reduction would cut the products' long
            # reductions (the MLP's 3072) into 128 pieces: 815 us for one
            # that takes 277. A LoRA step's gradient multiplies by the base
            # transposed back to (out, in); hoisted, those transposes of
            # constants are made at load, a second copy of the base (+231
            # MB); in the step they are transients, made one product at a time.
            packed_weights=True,
            packed_flags=("--iree-dispatch-creation-enable-split-reduction=false",
                          "--iree-opt-const-expr-hoisting=false"),
            training_flags=_cpu_training_flags(),
            # A LoRA module is not data-tiled. With split reduction too, the
            # 124M module fails to compile ("operand #1 does not dominate this
            # use", in the LM head's gradient); without split reduction it
            # compiles, but packs its float16 base into more layouts beside the
            # archive: a 124M fine-tuning step's peak RSS 658 -> 1127 MB, for
            # decode 33 -> 14 ms a token and a step 0.52 -> 0.39 s.
        ),
        Target(
            name="metal",
            description="Apple GPU on macOS 13+ (Metal, MSL embedded)",
            backend="metal-spirv",
            executable_format="metal-msl-fb",
            runtime_driver="metal",
            flags=_METAL_FLAGS,
            gpu=APPLE_GPU_NO_SUBGROUPS,
            int8_gpu=with_int8_dot(APPLE_GPU_NO_SUBGROUPS),
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
            gpu=APPLE_GPU_NO_SUBGROUPS,
            int8_gpu=with_int8_dot(APPLE_GPU_NO_SUBGROUPS),
        ),
        Target(
            name="vulkan",
            description="Any Vulkan 1.1 GPU (portable SPIR-V baseline; float16 generation: 16-bit storage)",
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
            # The generation module's float16 weights need 16-bit storage, as
            # does a LoRA module's float16 base.
            generate_flags=(VULKAN_16BIT_DEVICE,),
            int8_gpu=VULKAN_GPU_INT8,
            lora_flags=(VULKAN_16BIT_DEVICE,),
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


def on_vulkan(target: Target) -> Target:
    """A Vulkan target whose kernels are `target`'s: the same GPU description
    (workgroup limits, workgroup memory, no subgroups), so the same tiling and
    workgroup choices, through the SPIR-V codegen that the Metal backend turns
    into MSL. It runs `target`'s kernels on a Vulkan device, where the target's
    own device (Metal) is missing."""
    if target.gpu is None:
        raise ValueError(f"target {target.name!r} names no GPU description to compile for Vulkan")
    flag = "--iree-hal-target-device=__device_0=" + device_target("vulkan", "vulkan-spirv", "vulkan-spirv-fb",
                                                                   target.gpu)
    return Target(name=f"{target.name}-on-vulkan", description=f"{target.name}'s kernels on a Vulkan device",
                  backend="vulkan-spirv", executable_format="vulkan-spirv-fb", runtime_driver="vulkan",
                  flags=(flag,), generate_flags=() if target.has_generation_module else None, gpu=target.gpu,
                  int8_gpu=target.int8_gpu)


def packs_weights(weights_format: str, lora: bool) -> bool:
    """Whether a build also exports, for the targets with `packed_weights`,
    the module that reads its constant weights (the generation module, a
    LoRA build's one module) on them packed: the generation module's, and
    a LoRA build's float16 base (an int8 base is not packed: x's gradient
    through it, `model._int8_times_backward`, reads it plain)."""
    return weights_format == "float16" or not lora


def packed_name(name: str) -> str:
    """The file name of the packed variant of a module's MLIR or archive `name`
    (`packs_weights`): gpt2.mlir -> gpt2-packed.mlir, base.irpa -> base-packed.irpa."""
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}-packed.{suffix}"


def flag_files(target: Target) -> list[Path]:
    """The files `target`'s flags name (its tuning spec): a compile depends on
    them as on its sources."""
    flags = (*target.flags, *(target.generate_flags or ()), *target.int8_flags, *target.lora_flags,
             *target.training_flags)
    return [Path(flag.split("=", 1)[1]) for flag in flags if flag.startswith("--iree-codegen-tuning-spec-path=")]


def vmfb_name(target: str, generation: bool = False) -> str:
    """The file name of `target`'s whole module, or with `generation` its generation module."""
    return f"gpt2-generate-{target}.vmfb" if generation else f"gpt2-{target}.vmfb"


def log_name(vmfb: str) -> str:
    """The file name of the compile log beside the module named `vmfb`."""
    return vmfb.removesuffix(".vmfb") + ".compile.log"


def compile_command(compiler: str, target: Target, input_path: str | Path, output_path: str | Path,
                    generation: bool = False, lora: bool = False, int8: bool = False,
                    packed: bool = False) -> list[str]:
    """argv of `compiler` (an iree-compile binary) building `target`'s whole
    module from `input_path`, with `generation` its generation module, with
    `lora` a LoRA build's module (`int8`: either one generating on int8
    weights; `packed`: either one on packed weights)."""
    flags = list(target.flags)
    for extra in (target.lora_flags if lora else target.generate_flags if generation else (),
                  target.int8_flags if (generation or lora) and int8 else (),
                  target.packed_flags if (generation or lora) and packed else ()):
        replaced = {flag.split("=", 1)[0] for flag in extra}
        flags = [flag for flag in flags if flag.split("=", 1)[0] not in replaced] + list(extra)
    training = () if generation else target.training_flags
    return [compiler, str(input_path), *flags, *training, "-o", str(output_path)]
