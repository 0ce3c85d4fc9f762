"""A compiled tiny module opened through gpt2_iree.module: devices, weights, and what is refused."""

import json
import platform
import resource
import shutil
import subprocess
import sys

import numpy as np
import pytest

from gpt2_iree import archive, model
from gpt2_iree.archive import ArchiveError
from gpt2_iree.devices import available_devices
from gpt2_iree.module import DEFAULT_BUILD_DIR, BuildError, Module, reuse_freed_memory
from tasks.config import parse_config


def test_default_build_dir_is_what_doit_builds_by_default():
    assert DEFAULT_BUILD_DIR == parse_config({}).build_dir


def test_cpu_is_available_and_chosen_by_default(tiny_build):
    assert "local-task" in available_devices()
    assert Module(tiny_build).device in available_devices()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    # What a CPU module's calls rely on: a big block freed at the end of one
    # call comes back in the next without the kernel faulting it in again.
    assert reuse_freed_memory()

    def faults_of_a_64mb_block():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = np.ones(64 << 18, np.float32)
        del block
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    assert min(faults_of_a_64mb_block() for _ in range(3)) == 0


def test_unbuilt_directory_says_how_to_build(tmp_path):
    with pytest.raises(BuildError, match=r"not built yet.*doit"):
        Module(tmp_path)


def test_a_build_whose_module_kept_the_rows_positions_is_refused(tiny_build, tmp_path):
    # Its decode entries take no positions: the call would fail on its arguments.
    old = tmp_path / "old"
    shutil.copytree(tiny_build, old, symlinks=True)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps(manifest | {"state": ["pos", *manifest["state"]]}))
    with pytest.raises(BuildError, match="predates positions passed by value; rebuild it with `doit`"):
        Module(old)


@pytest.mark.parametrize("generation", [False, True])
def test_a_module_compiled_from_another_export_is_refused(tiny_build, tmp_path, generation):
    # doit compiles only the targets it is given: after a new export, another
    # target's module stays beside it, and its calls would fail on their arguments.
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build, symlinks=True)
    manifest = json.loads((build / "manifest.json").read_text())
    # The CPU's generation module is the export on packed weights.
    exported = [manifest["generate"], manifest["generate"]["packed"]] if generation else [manifest]
    for export in exported:
        export["source_digest"] = "0123456789abcdef"
    (build / "manifest.json").write_text(json.dumps(manifest))
    name = "gpt2-generate-cpu.vmfb" if generation else "gpt2-cpu.vmfb"
    with pytest.raises(BuildError, match=rf"{name} was compiled from another export than .*build's manifest; "
                                         r"rebuild it with `doit.*targets=cpu`"):
        Module(build, "local-task", generation=generation)
    for export in exported:  # as in a build exported before the digest: not checked
        del export["source_digest"]
    (build / "manifest.json").write_text(json.dumps(manifest))
    Module(build, "local-task", generation=generation)


def test_a_position_outside_the_context_is_refused(tiny_build):
    # The cache write would clamp it and attention would read where nothing was written.
    module = Module(tiny_build, "local-task")
    with pytest.raises(ValueError, match=r"position -1 is out of range; valid: 0 to 128 \(the context\)"):
        module.decode(64, np.ones(1), np.array([-1]), None)
    with pytest.raises(ValueError, match="position 129 is out of range"):
        module.prefill(np.zeros((1, 64)), np.array([1]), np.array([129]), ((0.0,), (0,), (1.0,)))


def test_missing_device_lists_available_ones(tiny_build):
    with pytest.raises(BuildError, match=r"device 'metal' is not available here; this runtime has: .*local-task"):
        Module(tiny_build, device="metal")


def test_params_that_do_not_match_the_module_are_refused(tiny_build, tmp_path):
    weights = archive.read_irpa(tiny_build / "gpt2.irpa")
    del weights["wpe"]
    weights["ln_f.bias"] = np.zeros(3, np.float32)
    archive.write_irpa(weights, tmp_path / "bad.irpa")
    with pytest.raises(BuildError, match=r"missing: wpe; wrong size: ln_f.bias"):
        Module(tiny_build, params=tmp_path / "bad.irpa")
    # The generation module, which converts them on the host as it reads them, names the file too.
    with pytest.raises(BuildError, match=r"bad.irpa does not match the module .*missing: wpe; wrong size: ln_f.bias"):
        Module(tiny_build, params=tmp_path / "bad.irpa", generation=True)
    (tmp_path / "garbage.irpa").write_bytes(b"not an archive")
    with pytest.raises(ArchiveError, match="garbage.irpa is not an IREE parameter archive"):
        Module(tiny_build, params=tmp_path / "garbage.irpa")


@pytest.mark.parametrize("size", [100, 5000, 300_000])  # into the header, the entry table, the weights
def test_a_truncated_archive_is_refused_by_name(tiny_build, tmp_path, size):
    (tmp_path / "cut.irpa").write_bytes((tiny_build / "gpt2.irpa").read_bytes()[:size])
    with pytest.raises(ArchiveError, match="cut.irpa is not an IREE parameter archive, or not all of one"):
        Module(tiny_build, params=tmp_path / "cut.irpa")


def test_eval_loss_changes_nothing_and_the_optimizer_state_round_trips(tiny_build):
    module = Module(tiny_build)
    text = np.arange(128, dtype=np.int32)[None] % 200
    target, lengths = np.roll(text, -1, axis=1), np.array([127], np.int32)
    first = module.eval_loss(text, target, lengths)
    assert module.eval_loss(text, target, lengths) == first == module.finetune(text, target, lengths, 0.1)
    state, params = module.get_opt_state(), module.get_params()
    assert [(name, list(value.shape), value.dtype.name) for name, value in state.items()] == \
        [tuple(leaf) for leaf in module.manifest["opt_state"]]
    assert state["[0].count"] == 1  # Adafactor counts its steps
    stepped = module.finetune(text, target, lengths, 0.1)
    module.set_params(params)
    module.set_opt_state(state)
    assert module.finetune(text, target, lengths, 0.1) == stepped


def test_weights_given_in_memory_must_fit_the_module(tiny_build):
    weights = archive.read_irpa(tiny_build / "gpt2.irpa")
    weights["wte"] = weights["wte"].astype(np.float16)
    with pytest.raises(BuildError, match=r"the weights given do not match the module .*wrong size: wte"):
        Module(tiny_build, generation=True, weights=weights)


def test_software_vulkan_is_never_the_default(tiny_vulkan_build):
    # The vulkan modules are built and lavapipe runs them, yet the CPU module,
    # faster on the same cores, is what opens without --device.
    assert Module(tiny_vulkan_build).device == "local-task"
    assert Module(tiny_vulkan_build, device="vulkan").device == "vulkan"


def test_every_entry_point_agrees_on_vulkan_and_the_cpu(tiny_vulkan_build):
    # Arguments, results and weights cross to the device without importing
    # numpy's memory, which lavapipe refuses unless it is 4096-byte aligned.
    from gpt2_iree.generation import Rows
    from gpt2_iree.sampling import Sampling

    cpu, gpu = Module(tiny_vulkan_build, device="local-task"), Module(tiny_vulkan_build, device="vulkan")
    prompt, sampled = [72, 101, 108, 108, 111] * 20, Sampling(0.9, 20, 0.95, seed=5)

    def tokens(module):
        rows = Rows(module)
        rows.start(0, sampled)
        return [rows.feed({0: prompt})[0]] + [rows.step({0})[0] for _ in range(40)]  # across a context shift

    assert tokens(gpu) == tokens(cpu)
    text = np.arange(128, dtype=np.int32)[None] % 200
    target, text_lengths = np.roll(text, -1, axis=1), np.array([127], np.int32)
    losses = [(m.finetune(text, target, text_lengths, 0.1), m.finetune(text, target, text_lengths, 0.1))
              for m in (cpu, gpu)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    tuned = cpu.get_params()
    gpu.set_params(tuned)
    for name, value in gpu.get_params().items():
        np.testing.assert_array_equal(value, tuned[name])
    # The generation module, opened on those weights from memory.
    generator = Module(tiny_vulkan_build, device="vulkan", generation=True, weights=tuned)
    reference = Module(tiny_vulkan_build, device="local-task", generation=True, weights=tuned)
    assert tokens(generator) == tokens(reference)


def _loads_vulkan(*statements: str) -> bool:
    """Whether a fresh process running `statements` maps the Vulkan loader."""
    code = "; ".join((*statements, "print(any('libvulkan' in line for line in open('/proc/self/maps')))"))
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return child.stdout.split()[-1] == "True"


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_a_cpu_module_never_loads_vulkan(tiny_build, vulkan, tmp_path):
    # Probing Vulkan maps every installed implementation into the process
    # (lavapipe: 42 MB of LLVM), which a CPU run would carry to its end.
    cpu_only = tmp_path / "cpu-only"
    cpu_only.mkdir()
    for name in ("manifest.json", "gpt2.irpa", "gpt2-cpu.vmfb"):
        (cpu_only / name).symlink_to(tiny_build / name)
    opened = "from gpt2_iree.module import Module; Module({!r}, {})"
    assert not _loads_vulkan(opened.format(str(tiny_build), "'local-task'"))
    assert not _loads_vulkan(opened.format(str(cpu_only), "None"))  # no GPU module: the default probes no GPU
    assert _loads_vulkan(opened.format(str(tiny_build), "None"))  # a vulkan module: lavapipe is probed, and refused


def test_modules_on_constant_weights_keep_their_kv_cache_in_float16(tiny_build, tiny_lora_build, tiny_int8_build):
    # Half the cache's memory wherever the weights are constants: every
    # generation module and a LoRA build's. The full build's whole module
    # trains in float32.
    for build, generation, dtype in ((tiny_build, False, np.float32), (tiny_build, True, np.float16),
                                     (tiny_lora_build, False, np.float16), (tiny_int8_build, True, np.float16)):
        module = Module(build, "local-task", generation=generation)
        state = module.get_state()
        assert module.cache_dtype == dtype
        assert {state[f"{kv}.0"].dtype for kv in "kv"} == {np.dtype(dtype)}


def test_seed_empties_a_row_s_kv_cache(tiny_build, tiny_lora_build):
    # K and V start uninitialised, so that fine-tuning never touches their
    # pages; starting a row (`seed`) zeroes its slots before generation reads
    # them, since attention multiplies the slots past a row's end by zero.
    for build, generation in ((tiny_build, False), (tiny_build, True), (tiny_lora_build, False)):
        module = Module(build, "local-task", generation=generation)
        module.seed(np.array([3]), np.array([1]))
        module.prefill(np.arange(64)[None], np.array([64]), np.array([0]), ((0.0,), (0,), (1.0,)))
        assert np.abs(module.get_state()["k.0"][0, :64]).min() > 0
        module.seed(np.array([3]), np.array([1]))
        state = module.get_state()
        assert not any(state[name].any() for name in model.kv_names(model.GPT2Config(**module.manifest["config"])))


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc/self/maps")
def test_the_cpu_maps_an_archive_only_where_its_weights_stay_constant(tiny_build, tiny_lora_build, tmp_path):
    # The whole module copies the weights it trains into buffers of its own: a
    # mapping of the archive would keep the file's pages resident beside them
    # (497 MB for 124M). Weights that no entry writes are used where they are
    # mapped: the generation module's float16 archive, a LoRA build's base (on the CPU, packed).
    def mapped(path) -> bool:
        return any(line.rstrip().endswith(str(path)) for line in open("/proc/self/maps"))

    full, lora = tmp_path / "full", tmp_path / "lora"
    shutil.copytree(tiny_build, full)
    shutil.copytree(tiny_lora_build, lora)
    whole = Module(full, "local-task")
    generation = Module(full, "local-task", generation=True)
    tuned_elsewhere = Module(full, "local-task", params=tmp_path / "full" / "gpt2.irpa", generation=True)
    adapted = Module(lora, "local-task")
    assert not mapped(full / "gpt2.irpa") and mapped(full / "gpt2-generate-packed.irpa")
    assert mapped(lora / "base-packed.irpa") and not mapped(lora / "gpt2.irpa")

    streamed, stored = whole.get_params(), archive.read_irpa(full / "gpt2.irpa")
    for name, value in stored.items():
        np.testing.assert_array_equal(streamed[name].ravel(), value.ravel())
    # The generation module computes on the same float16 weights whether they
    # come from its archive or are made (and packed) on the host from a float32 one.
    def logits(module):
        module.seed(np.array([0]), np.array([1]))
        module.prefill(np.arange(64)[None], np.array([64]), np.array([0]), ((0.0,), (0,), (1.0,)))
        return module.get_state()["logits"]

    np.testing.assert_array_equal(logits(generation), logits(tuned_elsewhere))
    assert adapted.get_params()
