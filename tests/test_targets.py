"""Tests for gpt2_iree.targets.

The compile tests use a tiny module shaped like the exported GPT-2 (a
parameter-backed mutable util.global and one function) whose two reductions
reproduce, in well under a second, the failures that shaped the flags:
a sum of a negated tensor (no reduction identity once canonicalized:
breaks plain metal-spirv, CUDA's default reduction pipeline and Vulkan
targets with subgroups) and a full sum (subgroup ops: SPIRV-Cross aborts on
iOS).  Each shipped target must compile it.
"""

from __future__ import annotations

import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from gpt2_iree import host_cpu, targets
from gpt2_iree.targets import TARGETS, Target, compile_command, get_target, log_name, vmfb_name

TINY_MODULE = """\
module @gpt2 {
  util.global private mutable @w = #flow.parameter.named<"model"::"w"> : tensor<64x320xf32>
  func.func @step(%x: tensor<64x320xf32>) -> (tensor<64xf32>, tensor<f32>) {
    %w = util.global.load @w : tensor<64x320xf32>
    %y = stablehlo.multiply %x, %w : tensor<64x320xf32>
    util.global.store %y, @w : tensor<64x320xf32>
    %zero = stablehlo.constant dense<0.0> : tensor<f32>
    %n = stablehlo.negate %y : tensor<64x320xf32>
    %rows = stablehlo.reduce(%n init: %zero) applies stablehlo.add across dimensions = [1] : (tensor<64x320xf32>, tensor<f32>) -> tensor<64xf32>
    %all = stablehlo.reduce(%y init: %zero) applies stablehlo.add across dimensions = [0, 1] : (tensor<64x320xf32>, tensor<f32>) -> tensor<f32>
    return %rows, %all : tensor<64xf32>, tensor<f32>
  }
}
"""

# The generation module's shape: a float32 parameter turned into a float16
# global once, at load, then read by an 8-row matmul (a prefill). The Vulkan
# baseline, without 16-bit storage, fails it: "failed to legalize operation
# 'vector.bitcast'".
TINY_GENERATION_MODULE = """\
module @gpt2_generate {
  util.global private @p = #flow.parameter.named<"model"::"p"> : tensor<64x320xf32>
  util.global private @w : tensor<64x320xf16>
  util.initializer {
    %p = util.global.load @p : tensor<64x320xf32>
    %w = stablehlo.convert %p : (tensor<64x320xf32>) -> tensor<64x320xf16>
    util.global.store %w, @w : tensor<64x320xf16>
    util.return
  }
  func.func @encode(%x: tensor<8x320xf32>) -> tensor<8x64xf32> {
    %w = util.global.load @w : tensor<64x320xf16>
    %w32 = stablehlo.convert %w : (tensor<64x320xf16>) -> tensor<64x320xf32>
    %y = stablehlo.dot_general %x, %w32, contracting_dims = [1] x [1]
        : (tensor<8x320xf32>, tensor<64x320xf32>) -> tensor<8x64xf32>
    return %y : tensor<8x64xf32>
  }
}
"""

# What an int8 generation module computes: int8 activations times int8
# weights, accumulated in int32.
TINY_INT8_MATMUL = """\
func.func @main(%x: tensor<8x320xi8>, %w: tensor<64x320xi8>) -> tensor<8x64xi32> {
  %y = stablehlo.dot_general %x, %w, contracting_dims = [1] x [1] : (tensor<8x320xi8>, tensor<64x320xi8>) -> tensor<8x64xi32>
  return %y : tensor<8x64xi32>
}
"""


@pytest.fixture(scope="module")
def iree_compile() -> str:
    try:
        from iree.compiler.tools.binaries import find_tool

        return find_tool("iree-compile")
    except ImportError:
        path = shutil.which("iree-compile")
        if path is None:
            pytest.skip("iree-compile is not installed")
        return path


def _run_compile(compiler: str, target: Target, tmp_path: Path, text: str, generation: bool = False,
                 int8: bool = False):
    source = tmp_path / f"{target.name}.mlir"
    source.write_text(text)
    vmfb = tmp_path / f"{target.name}.vmfb"
    cmd = compile_command(compiler, target, source, vmfb, generation, int8=int8)
    return vmfb, subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _compile(compiler: str, target: Target, tmp_path: Path) -> Path:
    vmfb, result = _run_compile(compiler, target, tmp_path, TINY_MODULE)
    assert result.returncode == 0, f"{target.name}: {result.stderr[-3000:]}"
    return vmfb


def test_get_target_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as excinfo:
        get_target("webgpu")
    message = str(excinfo.value)
    assert "webgpu" in message
    for name in ("cpu", "metal", "ios", "vulkan", "cuda"):
        assert name in message


def test_table_is_consistent():
    assert set(TARGETS) == {"cpu", "metal", "ios", "vulkan", "cuda"}
    for name, target in TARGETS.items():
        assert target.name == name
        assert target.flags and all(f.startswith("--") for f in target.flags)
    assert "--iree-llvmcpu-target-cpu=host" in get_target("cpu").flags
    assert "--iree-metal-target-platform=ios" in get_target("ios").flags
    assert "--iree-metal-target-platform=ios" not in get_target("metal").flags
    for name in ("metal", "ios"):
        assert "--iree-metal-compile-to-metallib=false" in get_target(name).flags
    assert "subgroup = none" in targets.APPLE_GPU_NO_SUBGROUPS


def test_compile_command_shape():
    target = get_target("cuda")
    cmd = compile_command("/bin/iree-compile", target, Path("/in/gpt2.mlir"), Path("/out/gpt2.vmfb"))
    assert cmd == ["/bin/iree-compile", "/in/gpt2.mlir", *target.flags, "-o", "/out/gpt2.vmfb"]


def test_backends_exist_in_installed_compiler(iree_compile):
    out = subprocess.run([iree_compile, "--iree-hal-list-target-backends"],
                         capture_output=True, text=True, check=True).stdout
    available = {line.strip() for line in out.splitlines()[1:] if line.strip()}
    for target in TARGETS.values():
        assert target.backend in available, f"{target.name} needs {target.backend}; have {available}"


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_compiles_the_tricky_reductions(iree_compile, tmp_path, name):
    vmfb = _compile(iree_compile, get_target(name), tmp_path)
    assert zipfile.is_zipfile(vmfb)
    with zipfile.ZipFile(vmfb) as archive:
        entries = archive.namelist()
    fmt = get_target(name).executable_format.replace("-", "_")
    assert any(fmt in entry for entry in entries), (fmt, entries)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_float16_weights_compile_for_every_generation_module(iree_compile, tmp_path, name):
    _, result = _run_compile(iree_compile, get_target(name), tmp_path, TINY_GENERATION_MODULE, generation=True)
    assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"


@pytest.mark.parametrize("name", sorted(name for name, target in TARGETS.items() if target.has_generation_module))
def test_int8_weights_compile_for_every_generation_module(iree_compile, tmp_path, name):
    _, result = _run_compile(iree_compile, get_target(name), tmp_path, TINY_INT8_MATMUL, generation=True, int8=True)
    assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"


def test_an_int8_generation_module_is_built_for_the_integer_dot_product():
    for name in ("vulkan", "metal", "ios"):
        cmd = compile_command("iree-compile", get_target(name), Path("gpt2-generate.mlir"), Path("out.vmfb"),
                              generation=True, int8=True)
        devices = [flag for flag in cmd if flag.startswith("--iree-hal-target-device=")]
        assert len(devices) == 1 and "spirv:v1.6" in devices[0] and "dot = dp4xi8toi32" in devices[0], name
    cpu = get_target("cpu")
    assert compile_command("c", cpu, "in", "out", generation=True, int8=True) == \
        compile_command("c", cpu, "in", "out", generation=True)


def test_the_portable_vulkan_baseline_cannot_store_float16(iree_compile, tmp_path):
    # Why vulkan's generation module is built for a GPU with 16-bit storage; once
    # the baseline compiles it, that target can go.
    _, result = _run_compile(iree_compile, get_target("vulkan"), tmp_path, TINY_GENERATION_MODULE)
    assert result.returncode != 0 and "vector.bitcast" in result.stderr


def test_a_generation_flag_replaces_the_flag_of_its_name():
    vulkan = get_target("vulkan")
    cmd = compile_command("iree-compile", vulkan, Path("gpt2-generate.mlir"), Path("out.vmfb"), generation=True)
    devices = [flag for flag in cmd if flag.startswith("--iree-hal-target-device=")]
    assert devices == list(vulkan.generate_flags) and "storage = b32|b16" in devices[0]


def test_the_metal_kernels_compile_for_vulkan_with_the_apple_gpu(iree_compile, tmp_path):
    stand_in = targets.on_vulkan(get_target("metal"))
    assert stand_in.runtime_driver == "vulkan" and stand_in.has_generation_module
    (device,) = stand_in.flags
    assert '"vulkan-spirv"' in device and targets.APPLE_GPU_NO_SUBGROUPS in device
    vmfb = _compile(iree_compile, stand_in, tmp_path)
    with zipfile.ZipFile(vmfb) as archive:
        assert any("vulkan_spirv_fb" in entry for entry in archive.namelist())
    with pytest.raises(ValueError, match="names no GPU description"):
        targets.on_vulkan(get_target("cpu"))


# The three matmuls of a fine-tuning step on output-major weights w (out, in):
# the forward pass x.w^T, the input gradient g.w and the weight gradient g^T.x.
MATMULS_MODULE = """\
func.func @step(%x: tensor<128x768xf32>, %w: tensor<3072x768xf32>, %g: tensor<128x3072xf32>)
    -> (tensor<128x3072xf32>, tensor<128x768xf32>, tensor<3072x768xf32>) {
  %y = stablehlo.dot_general %x, %w, contracting_dims = [1] x [1]
      : (tensor<128x768xf32>, tensor<3072x768xf32>) -> tensor<128x3072xf32>
  %dx = stablehlo.dot_general %g, %w, contracting_dims = [1] x [0]
      : (tensor<128x3072xf32>, tensor<3072x768xf32>) -> tensor<128x768xf32>
  %dw = stablehlo.dot_general %g, %x, contracting_dims = [0] x [0]
      : (tensor<128x3072xf32>, tensor<128x768xf32>) -> tensor<3072x768xf32>
  return %y, %dx, %dw : tensor<128x3072xf32>, tensor<128x768xf32>, tensor<3072x768xf32>
}
"""


# The LM head's input gradient: a contraction over the 50304-token vocabulary,
# which split reduction cuts into 16.
LM_HEAD_GRADIENT_MODULE = """\
func.func @step(%g: tensor<128x50304xf32>, %wte: tensor<50304x768xf32>) -> tensor<128x768xf32> {
  %dx = stablehlo.dot_general %g, %wte, contracting_dims = [1] x [0]
      : (tensor<128x50304xf32>, tensor<50304x768xf32>) -> tensor<128x768xf32>
  return %dx : tensor<128x768xf32>
}
"""


# A LoRA step's products through its frozen float16 base w: the forward x.w^T and the input gradient g.w.
FLOAT16_BASE_MODULE = """\
func.func @step(%x: tensor<128x768xf32>, %w16: tensor<3072x768xf16>, %g: tensor<128x3072xf32>)
    -> (tensor<128x3072xf32>, tensor<128x768xf32>) {
  %w = stablehlo.convert %w16 : (tensor<3072x768xf16>) -> tensor<3072x768xf32>
  %y = stablehlo.dot_general %x, %w, contracting_dims = [1] x [1]
      : (tensor<128x768xf32>, tensor<3072x768xf32>) -> tensor<128x3072xf32>
  %dx = stablehlo.dot_general %g, %w, contracting_dims = [1] x [0]
      : (tensor<128x3072xf32>, tensor<3072x768xf32>) -> tensor<128x768xf32>
  return %y, %dx : tensor<128x3072xf32>, tensor<128x768xf32>
}
"""


def _retiled_matmuls(iree_compile, tmp_path, module: str, spec: Path, cpu: str, tile: str) -> dict[str, bool]:
    """{a matmul's operand types: whether `spec` gave it the vector tile `tile`}
    in `module` compiled for `cpu`, as the cpu target compiles a whole module.
    Any x86 host: the spec is read and matched whatever CPU compiles it."""
    source = tmp_path / "matmuls.mlir"
    source.write_text(module)
    configs = subprocess.run(
        [iree_compile, str(source), "--iree-hal-target-backends=llvm-cpu", f"--iree-llvmcpu-target-cpu={cpu}",
         "--iree-dispatch-creation-enable-split-reduction", f"--iree-codegen-tuning-spec-path={spec}",
         "--compile-to=executable-configurations"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    return {line.split("ins(")[1].split(")")[0].split(":")[1].strip(): f"vector_common_parallel = {tile}" in line
            for line in configs.splitlines() if "linalg.matmul" in line and "lowering_config" in line}


def _passed_on_this_host(spec: Path) -> bool:
    """Whether the cpu target's whole module gets `spec` here; its generation module never does."""
    cpu = get_target("cpu")
    whole = compile_command("iree-compile", cpu, Path("gpt2.mlir"), Path("out.vmfb"))
    generation = compile_command("iree-compile", cpu, Path("gpt2-generate.mlir"), Path("out.vmfb"), generation=True)
    flag = f"--iree-codegen-tuning-spec-path={spec}"
    assert flag not in generation
    return flag in whole


def test_the_avx2_tuning_spec_retiles_the_gradient_matmuls_only(iree_compile, tmp_path):
    tiles = _retiled_matmuls(iree_compile, tmp_path, MATMULS_MODULE, targets.AVX2_MATMUL_TUNING, "haswell",
                             "[6, 16, 0]")
    assert tiles == {"tensor<128x768xf32>, tensor<3072x768xf32>": False,   # forward: IREE's own tile
                     "tensor<128x3072xf32>, tensor<3072x768xf32>": True,   # input gradient
                     "tensor<128x3072xf32>, tensor<128x768xf32>": True}    # weight gradient
    assert _passed_on_this_host(targets.AVX2_MATMUL_TUNING) == host_cpu.is_avx2_without_avx512()


def test_the_avx512_tuning_spec_retiles_the_gradients_the_split_lm_head_and_a_float16_base(iree_compile, tmp_path):
    spec, tile = targets.AVX512_MATMUL_TUNING, "[8, 32, 0]"
    assert _retiled_matmuls(iree_compile, tmp_path, MATMULS_MODULE, spec, "sapphirerapids", tile) == {
        "tensor<128x768xf32>, tensor<3072x768xf32>": False,   # forward: IREE's own tile
        "tensor<128x3072xf32>, tensor<3072x768xf32>": True,   # input gradient
        "tensor<128x3072xf32>, tensor<128x768xf32>": True}    # weight gradient
    # One of 16 slices of the vocabulary each.
    assert _retiled_matmuls(iree_compile, tmp_path, LM_HEAD_GRADIENT_MODULE, spec, "sapphirerapids", tile) == {
        "tensor<128x3144xf32>, tensor<3144x768xf32>": True}
    # A LoRA step's input gradient through its float16 base; its forward keeps IREE's tile.
    assert _retiled_matmuls(iree_compile, tmp_path, FLOAT16_BASE_MODULE, spec, "sapphirerapids", tile) == {
        "tensor<128x768xf32>, tensor<3072x768xf16>": False,
        "tensor<128x3072xf32>, tensor<3072x768xf16>": True}
    assert _passed_on_this_host(spec) == host_cpu.is_intel_with_avx512()


def test_compile_command_adds_the_generation_flags():
    cpu = get_target("cpu")
    cmd = compile_command("/bin/iree-compile", cpu, Path("gpt2-generate.mlir"), Path("out.vmfb"), generation=True)
    assert cmd == ["/bin/iree-compile", "gpt2-generate.mlir", *cpu.flags, *cpu.generate_flags, "-o", "out.vmfb"]
    assert "--iree-llvmcpu-enable-ukernels=all" in cpu.generate_flags
    assert vmfb_name("cpu") == "gpt2-cpu.vmfb" and vmfb_name("cpu", generation=True) == "gpt2-generate-cpu.vmfb"
    assert log_name("gpt2-generate-cpu.vmfb") == "gpt2-generate-cpu.compile.log"


@pytest.mark.parametrize("target", [get_target("metal"), get_target("ios")], ids=["metal", "ios"])
def test_metal_vmfb_embeds_msl_source(iree_compile, tmp_path, target):
    vmfb = _compile(iree_compile, target, tmp_path)
    with zipfile.ZipFile(vmfb) as archive:
        blobs = {name: archive.read(name) for name in archive.namelist()}
    msl = [name for name, data in blobs.items() if b"kernel void" in data]
    assert msl, f"no MSL kernels in {sorted(blobs)}"
    assert all("metal_msl_fb" in name for name in msl)
    assert b"metal-msl-fb" in blobs["module.fb"]  # the executable format the runtime matches
