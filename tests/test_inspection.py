"""Inspecting the real tiny modules and archive; and refusing what is neither."""

import json
import math

import pytest

from gpt2_iree import inspection
from gpt2_iree.errors import Gpt2IreeError

# tiny's defaults: a context of 128 in chunks of 64, so decode windows of 64 and 128.
DECODE = ["decode_64", "decode_128", "decode_greedy_64", "decode_greedy_128"]
FUNCTIONS = ["prefill", *DECODE, "seed", "finetune", "eval_loss", "get_params", "set_params", "get_opt_state",
             "set_opt_state", "get_state"]


@pytest.fixture(scope="module")
def cpu(tiny_build):
    return inspection.inspect_vmfb(tiny_build / "gpt2-cpu.vmfb")


@pytest.fixture(scope="module")
def metal(tiny_build):
    return inspection.inspect_vmfb(tiny_build / "gpt2-metal.vmfb")


def test_cpu_functions_and_signatures(cpu, tiny_build):
    assert [f["name"] for f in cpu["functions"]] == FUNCTIONS
    sig = {f["name"]: f["signature"] for f in cpu["functions"]}
    sampling = "tensor<1xf32>, tensor<1xi32>, tensor<1xf32>"
    # Each row's position (B = 1) is a host scalar, passed by value.
    assert sig["prefill"] == f"prefill(tensor<1x64xi32>, tensor<1xi32>, i32, {sampling}) -> tensor<1x1xi32>"
    assert sig["decode_64"] == f"decode_64(tensor<1xi32>, i32, {sampling}) -> tensor<1x1xi32>"
    assert sig["decode_greedy_64"] == "decode_greedy_64(tensor<1xi32>, i32) -> tensor<1x1xi32>"
    assert sig["seed"] == "seed(tensor<1xi32>, tensor<1xi32>) -> ()"
    assert sig["finetune"] == ("finetune(tensor<1x128xi32>, tensor<1x128xi32>, tensor<1xi32>, tensor<f32>) "
                               "-> tensor<f32>")
    assert sig["eval_loss"] == "eval_loss(tensor<1x128xi32>, tensor<1x128xi32>, tensor<1xi32>) -> tensor<f32>"
    assert sig["get_params"].count("tensor<") == len(json.loads((tiny_build / "manifest.json").read_text())["params"])
    assert cpu["size_bytes"] == (tiny_build / "gpt2-cpu.vmfb").stat().st_size


def test_executable_formats(cpu, metal):
    assert len(cpu["executable_formats"]) == 1 and cpu["executable_formats"][0].startswith("embedded-elf")
    assert metal["executable_formats"] == ["metal-msl-fb"]


def test_dispatch_and_kernel_counts(cpu, metal):
    for info in (cpu, metal):
        assert info["dispatches"] >= info["kernels"] >= 1
        per_function = {f["name"]: f["dispatches"] for f in info["functions"]}
        assert per_function["prefill"] >= 1 and per_function["decode_64"] >= 1
        assert per_function["finetune"] > per_function["decode_64"]  # forward + backward + optimizer
        assert per_function["decode_64"] > per_function["decode_greedy_64"] >= 1  # the sampler left out
        assert sum(per_function.values()) <= info["dispatches"]


def test_the_cpu_generation_module_lays_out_no_weight_at_load(tiny_build):
    info = inspection.inspect_vmfb(tiny_build / "gpt2-generate-cpu.vmfb")
    assert [f["name"] for f in info["functions"]] == ["prefill", *DECODE, "seed", "get_state"]
    per_function = {f["name"]: f["dispatches"] for f in info["functions"]}
    assert per_function["decode_64"] >= 1
    assert info["dispatches_at_load"] == info["dispatches"] - sum(per_function.values())
    assert f"{info['dispatches_at_load']} of the sites run at load" in inspection.format_vmfb(info)
    # Its matrices come packed (packed.py). Data tiling packed each at load, a
    # launch at least per matrix, into a second copy beside the mapped archive.
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    assert info["dispatches_at_load"] < sum(name.endswith("_w") for name, _ in manifest["params"])


def test_no_call_waits_for_the_device_before_its_end(cpu, metal, tiny_build):
    # A wait midway idles a GPU while the host reads a value back: a row's
    # position kept on the device did that, as did JAX's threefry (a loop IREE
    # runs on the host) and an optimization barrier in the sampler.
    generation = [inspection.inspect_vmfb(tiny_build / f"gpt2-generate-{name}.vmfb") for name in ("cpu", "metal")]
    for info in (cpu, metal, *generation):
        waits = {f["name"]: f["waits"] for f in info["functions"]}
        assert max(waits.values()) == 1, waits
        assert all(waits[name] == 1 for name in ("prefill", *DECODE)), waits
    assert "dispatches  1 wait " in inspection.format_vmfb(cpu) and "dispatches  0 waits " in inspection.format_vmfb(cpu)


def test_each_module_carries_the_digest_of_the_export_it_was_compiled_from(cpu, metal, tiny_build):
    # What the runtime compares with the manifest's, to refuse a stale module.
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    generation = {name: inspection.inspect_vmfb(tiny_build / f"gpt2-generate-{name}.vmfb")["source_digest"]
                  for name in ("cpu", "metal")}
    assert cpu["source_digest"] == metal["source_digest"] == manifest["source_digest"]
    assert generation["metal"] == manifest["generate"]["source_digest"] != manifest["source_digest"]
    # The CPU's is the export on packed weights.
    assert generation["cpu"] == manifest["generate"]["packed"]["source_digest"] != generation["metal"]
    assert f"source digest: {manifest['source_digest']}" in inspection.format_vmfb(cpu)


def test_metal_kernels_are_its_executables(metal, tiny_build):
    # A Metal module holds one executable, one zip entry, per kernel.
    import zipfile

    with zipfile.ZipFile(tiny_build / "gpt2-metal.vmfb") as archive:
        executables = [n for n in archive.namelist() if n.endswith("_metal_msl_fb.fb")]
    assert metal["kernels"] == len(executables)


def test_irpa_matches_manifest(tiny_build):
    info = inspection.inspect_irpa(tiny_build / "gpt2.irpa")
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    assert sorted(p["key"] for p in info["parameters"]) == sorted(name for name, _ in manifest["params"])
    sizes = {name: 4 * math.prod(shape) for name, shape in manifest["params"]}
    assert {p["key"]: p["bytes"] for p in info["parameters"]} == sizes
    assert info["total_bytes"] == sum(sizes.values())


def test_formats_are_readable(cpu, tiny_build):
    text = inspection.format_vmfb(cpu)
    for name in FUNCTIONS:
        assert name in text
    assert "decode_128(tensor<1xi32>, i32, tensor<1xf32>, tensor<1xi32>, tensor<1xf32>) -> tensor<1x1xi32>" in text
    assert str(cpu["dispatches"]) in text and str(cpu["kernels"]) in text
    text = inspection.format_irpa(inspection.inspect_irpa(tiny_build / "gpt2.irpa"))
    assert "wte" in text and "h.0.mlp.in_w" in text
    rows = [line for line in text.splitlines() if line.endswith(" B") and line.startswith("  ")]
    assert len({len(row) for row in rows}) == 1  # aligned


@pytest.mark.parametrize("inspect", [inspection.inspect_vmfb, inspection.inspect_irpa])
def test_missing_file(inspect, tmp_path):
    path = tmp_path / "nothing.here"
    with pytest.raises(Gpt2IreeError, match="nothing.here"):
        inspect(path)


@pytest.mark.parametrize("inspect, name", [(inspection.inspect_vmfb, "junk.vmfb"), (inspection.inspect_irpa, "junk.irpa")])
def test_garbage_file(inspect, name, tmp_path):
    path = tmp_path / name
    path.write_bytes(b"this is not what it claims to be\n" * 100)
    with pytest.raises(Gpt2IreeError, match=name):
        inspect(path)


def test_wrong_kind_of_file(tiny_build, tmp_path):
    with pytest.raises(Gpt2IreeError, match="gpt2.irpa"):
        inspection.inspect_vmfb(tiny_build / "gpt2.irpa")
    with pytest.raises(Gpt2IreeError, match="gpt2-cpu.vmfb"):
        inspection.inspect_irpa(tiny_build / "gpt2-cpu.vmfb")
    with pytest.raises(Gpt2IreeError, match="is not a file"):
        inspection.inspect_vmfb(tmp_path)
