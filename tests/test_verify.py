"""verify: parity with JAX passes on a right module and fails, with a report, on a wrong one."""

import json
import shutil

import numpy as np
import pytest

from gpt2_iree import verify


def test_parity_report_on_the_cpu_module(tiny_build, tmp_path, toolchain_json):
    report = verify.verify_build(tiny_build, "cpu", tmp_path / "verify-cpu.json", toolchain_json)
    assert report["kind"] == "parity" and report["passed"] and report["tokens_equal"]
    assert report["decode_steps"] == verify.DECODE_STEPS == len(report["tokens"])
    # The prompts end a few steps short of tiny's context of 128, not on a chunk boundary of 64.
    assert all(n % 64 and 128 - verify.DECODE_STEPS < n < 128 for n in report["prompt_lengths"])
    sampled = report["sampled"]
    assert sampled["equal_to_jax"] and sampled["top_k_1_is_greedy"] and sampled["steps"] == verify.SAMPLED_STEPS
    assert len(report["losses"]) == verify.FINETUNE_STEPS
    assert all(e <= verify.TOLERANCE for e in report["relative_errors"].values())
    # The new entry points: eval_loss against JAX's loss, and a resumed step.
    errors = report["relative_errors"]
    assert {"eval_loss", "opt_state", "resumed_step"} <= set(errors) and errors["resumed_step"] == 0
    # The generation module, against JAX on the same float16-rounded weights.
    generation = report["generation"]
    assert generation["kind"] == "parity" and generation["passed"] and generation["weights_dtype"] == "float16"
    assert set(generation["relative_errors"]) == {"prefill_logits", "prefill_kv", "decode_logits", "decode_kv"}
    cost = generation["rounding_cost"]
    assert 0 < cost["logits"] < 1e-2 and cost["positions"] == 128 and cost["greedy_agreement"] > 0.9
    assert json.loads((tmp_path / "verify-cpu.json").read_text()) == report


def test_a_module_that_computes_something_else_fails(tiny_build, tmp_path, toolchain_json):
    # The reference now normalises with a different epsilon than the module was
    # compiled with: a small, real numerical difference verify must catch.
    wrong = tmp_path / "build"
    shutil.copytree(tiny_build, wrong)
    manifest = json.loads((wrong / "manifest.json").read_text())
    manifest["config"]["layer_norm_epsilon"] = 1e-2
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(verify.VerifyError, match="verify:cpu failed"):
        verify.verify_build(wrong, "cpu", tmp_path / "verify-cpu.json", toolchain_json)
    report = json.loads((tmp_path / "verify-cpu.json").read_text())
    assert not report["passed"]


def test_structure_of_a_metal_module_on_a_host_without_vulkan(tiny_build, tmp_path, toolchain_json, monkeypatch):
    from gpt2_iree import devices

    monkeypatch.setattr(devices, "available_devices", lambda: ["local-task"])
    report = verify.verify_build(tiny_build, "metal", tmp_path / "verify-metal.json", toolchain_json)
    assert report["kind"] == "structure" and report["passed"]
    assert report["checks"] == {"executable_format": True, "functions": True, "msl_source": True}
    assert report["generation"]["passed"] and report["generation"]["exported"][:2] == ["prefill", "decode_64"]


def test_the_metal_kernels_run_on_vulkan_with_parity(tiny_build, tmp_path, toolchain_json, vulkan):
    report = verify.verify_build(tiny_build, "metal", tmp_path / "verify-metal.json", toolchain_json)
    for r, module in ((report, "gpt2-metal-on-vulkan.vmfb"), (report["generation"], "gpt2-generate-metal-on-vulkan.vmfb")):
        assert r["kind"] == "parity-on-vulkan" and r["passed"] and r["tokens_equal"]
        assert r["device"] == "vulkan" and r["module"] == module
        assert r["structure"]["passed"] and r["structure"]["checks"]["msl_source"]
    assert report["generation"]["weights_dtype"] == "float16"


def test_structure_check_names_missing_functions(tiny_build):
    from gpt2_iree.toolchain import runtime_tool

    report = verify.check_structure(tiny_build / "gpt2-metal.vmfb", "metal-msl-fb", ["prefill", "beam_search"],
                                    runtime_tool("iree-dump-module"))
    assert not report["passed"] and report["missing_functions"] == ["beam_search"]


def test_kv_that_round_to_neighbouring_float16_values_agree():
    # The module and JAX can round a K or V that lies on a float16 boundary
    # to either neighbour; a kernel that is wrong moves it further.
    float16 = np.dtype("float16")
    expected = np.linspace(-3, 3, 1001, dtype=np.float32).astype(float16)
    neighbour = np.nextafter(expected, float16.type(np.inf))
    assert verify.relative_error(neighbour, expected) > verify.TOLERANCE
    assert verify.cache_error(neighbour, expected, float16) == 0
    assert verify.cache_error(np.nextafter(neighbour, float16.type(np.inf)), expected, float16) > verify.TOLERANCE


def test_rounding_cost_follows_the_config_it_is_given():
    # verify reuses one jit per function: a second model in the same process
    # must not run with the first one's config (here: its number of layers) or
    # the first one's cache dtype.
    import jax.numpy as jnp
    import numpy as np

    from gpt2_iree import model

    for n_layer in (1, 2):
        for cache_dtype in (np.dtype("float32"), np.dtype("float16")):
            cfg = model.GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, n_positions=16, vocab_size=100)
            exact = {k: np.asarray(v) for k, v in model.init_params(cfg, 0).items()}
            rounded = {k: v.astype(np.float16).astype(np.float32) for k, v in exact.items()}
            tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16), dtype=np.int32)
            want = verify.relative_error(*(
                model.forward({k: jnp.asarray(v) for k, v in p.items()}, cfg, tokens, None, dtype)[0, :, :100]
                for p, dtype in ((rounded, cache_dtype), (exact, np.float32))))
            assert verify.rounding_cost(cfg, rounded, exact, 16, cache_dtype)["logits"] == pytest.approx(want, rel=1e-4)


def test_an_int8_module_is_held_to_what_float32_rounding_moves_in_jax(tiny_int8_build, tmp_path):
    """Rounding activations to int8 turns float32 noise into whole int8 steps
    (and a float16 cache's K or V that moves to its neighbour, into more), so
    an int8 check measures how far JAX's own result moves by that noise and
    is held to the larger of the int8 tolerance and twice that. tiny's
    module passes with the tokens JAX picks, and one computing with another
    epsilon fails by far more."""
    from gpt2_iree.module import Module

    report = verify.check_generation_parity(Module(tiny_int8_build, "local-task", generation=True))
    noise = report["rounding_noise"]
    assert noise > 0 and report["tolerance"] == max(verify.INT8_TOLERANCE, verify.NOISE_MARGIN * noise)
    assert report["passed"] and report["tokens_equal"]

    wrong = tmp_path / "build"
    shutil.copytree(tiny_int8_build, wrong)
    manifest = json.loads((wrong / "manifest.json").read_text())
    manifest["config"]["layer_norm_epsilon"] = 1e-3
    (wrong / "manifest.json").write_text(json.dumps(manifest))
    report = verify.check_generation_parity(Module(wrong, "local-task", generation=True))
    assert not report["passed"] and min(report["relative_errors"].values()) > 10 * report["tolerance"]
