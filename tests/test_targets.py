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

from gpt2_iree import targets
from gpt2_iree.targets import TARGETS, Target, compile_command, get_target

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


def _compile(compiler: str, target: Target, tmp_path: Path) -> Path:
    source = tmp_path / f"{target.name}.mlir"
    source.write_text(TINY_MODULE)
    vmfb = tmp_path / f"{target.name}.vmfb"
    cmd = compile_command(compiler, target, source, vmfb)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
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
    assert "subgroup = none" in targets.METAL_DEVICE_TARGET


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


@pytest.mark.parametrize("target", [get_target("metal"), get_target("ios")], ids=["metal", "ios"])
def test_metal_vmfb_embeds_msl_source(iree_compile, tmp_path, target):
    vmfb = _compile(iree_compile, target, tmp_path)
    with zipfile.ZipFile(vmfb) as archive:
        blobs = {name: archive.read(name) for name in archive.namelist()}
    msl = [name for name, data in blobs.items() if b"kernel void" in data]
    assert msl, f"no MSL kernels in {sorted(blobs)}"
    assert all("metal_msl_fb" in name for name in msl)
    assert b"metal-msl-fb" in blobs["module.fb"]  # the executable format the runtime matches
