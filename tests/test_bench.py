"""The benchmark on the real tiny module: IREE vs jax.jit, table and plot."""

import json
import math
import mmap

import numpy as np
import pytest

from gpt2_iree import bench, host_cpu

PAIRS = ("prefill_ms", "long_prefill_ms", "decode_ms_per_token", "decode_late_ms_per_token",
         "decode_float32_ms_per_token", "finetune_s_per_step")
KEYS = {*PAIRS, "decode_sampled_ms_per_token", "tokens_per_s", "generation_weights", "bandwidth_gbs",
        "decode_floor_ms", "decode_late_floor_ms", "decode_float32_floor_ms", "peak_rss_mb", "model", "config",
        "device", "cpu", "repeats"}


@pytest.fixture(scope="module")
def run(tiny_build):
    lines = []
    return bench.run_benchmark(tiny_build, device="local-task", repeats=2, warmup=1, log=lines.append), lines


@pytest.fixture
def result(run):
    return run[0]


def test_result_has_every_metric(run, tiny_build):
    result, log = run
    assert set(result) == KEYS
    for key in PAIRS:
        pair = result[key]
        assert set(pair) - {"tokens", "position"} == {"iree", "jax", "ratio"}
        assert pair["iree"] > 0 and pair["jax"] > 0
        assert pair["ratio"] == pytest.approx(pair["iree"] / pair["jax"])
    batch = result["config"]["batch"]
    assert set(result["tokens_per_s"]) == {"iree", "jax"}
    for side in ("iree", "jax"):
        assert result["tokens_per_s"][side] == pytest.approx(1000 / result["decode_ms_per_token"][side] * batch)
    assert result["bandwidth_gbs"] > 0 and result["decode_floor_ms"] > 0
    manifest = json.loads((tiny_build / "manifest.json").read_text())
    weight_bytes = sum(4 * math.prod(shape) for _, shape in manifest["params"])
    assert result["decode_float32_floor_ms"] == pytest.approx(weight_bytes / (result["bandwidth_gbs"] * 1e9) * 1e3)
    # Prefill and decode ran on the generation module, which reads float16 weights: half the bytes.
    assert result["generation_weights"] == "float16"
    assert result["decode_floor_ms"] == pytest.approx(result["decode_float32_floor_ms"] / 2)
    assert result["decode_float32_ms_per_token"]["jax"] == result["decode_ms_per_token"]["jax"]
    assert result["model"] == "tiny"
    assert result["config"]["seq_len"] == 128 and result["config"]["optimizer"] == "adafactor"
    # The long prompt fills tiny's context of 128 at most; the late steps run near its end.
    assert result["long_prefill_ms"]["tokens"] == 128
    assert 64 <= result["decode_late_ms_per_token"]["position"] <= 128 - 32
    assert result["decode_late_floor_ms"] > result["decode_floor_ms"]
    assert result["decode_sampled_ms_per_token"]["iree"] > 0
    assert result["config"]["n_layer"] == manifest["config"]["n_layer"]
    assert result["device"] == "local-task" and result["repeats"] == 2
    # Every figure says which CPU made it: its model, and the SIMD features its kernels depend on.
    assert result["cpu"] == host_cpu.describe_cpu()
    json.dumps(result)  # JSON-able as it is
    # One progress line per phase at least (prefill, decode, finetune, bandwidth).
    assert len(log) >= 4 and any("decode" in line for line in log)


def test_format_table_mentions_every_metric(result):
    table = bench.format_table(result)
    for word in ("prefill", "long prefill", "time to first token", "decode", "late", "sampled", "finetune",
                 "tokens/s", "IREE", "JAX", "IREE/JAX", "bandwidth", "floor", "float16", "float32 module"):
        assert word in table, word
    assert f"{result['prefill_ms']['ratio']:.2f}x" in table
    assert result["cpu"]["model"] in table


def test_plot_writes_a_png(result, tmp_path):
    path = tmp_path / "sub" / "bench.png"
    bench.plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == ["bench.png"]  # no temporary left behind


def test_bandwidth_is_plausible():
    assert 0.1 < bench.measure_bandwidth_gbs() < 10000


def test_the_two_sides_take_turns():
    # A slow spell on a shared machine must slow both sides, not whichever ran then.
    calls = []

    def side(name, seconds):
        return lambda: calls.append(name) or seconds

    assert bench._paired_medians(side("iree", 1.0), side("jax", 2.0), repeats=3, warmup=1) == (1.0, 2.0)
    assert calls == ["iree", "jax"] * 4


def test_warm_up_lasts_while_a_run_takes_memory():
    # As a fine-tuning step does in its first calls beside another engine:
    # memory it keeps, less each time (64, then 32 MB), then none. A run timed
    # while it still faults in fresh pages is slow for a reason a steady run never pays.
    kept, calls = [], []

    def warming():
        calls.append("warming")
        if len(kept) < 2:
            # Fresh pages from the kernel, written: malloc could hand back memory a test before freed.
            kept.append(np.frombuffer(mmap.mmap(-1, (64 << 20) >> len(kept)), np.uint8))
            kept[-1][:] = 1
            return 10.0
        return 1.0

    def steady():
        calls.append("steady")
        return 2.0

    assert bench._paired_medians(warming, steady, repeats=3, warmup=1) == (1.0, 2.0)
    assert calls == ["warming", "steady"] * (3 + 3)  # the third warm-up round took nothing


def test_a_run_that_returns_its_memory_is_warm():
    # JAX's fine-tuning step faults in about 300 MB on every step and gives it
    # back: its steady state, not a warm-up.
    calls = []

    def faulting():
        calls.append(1)
        np.ones(64 << 20, np.uint8)  # freed at once
        return 1.0

    bench._paired_medians(faulting, repeats=2, warmup=1)
    assert len(calls) == 1 + 2


@pytest.fixture(scope="module")
def lora_run(tiny_lora_build):
    return bench.run_benchmark(tiny_lora_build, device="local-task", repeats=1, warmup=1, log=lambda line: None)


def test_a_lora_build_benchmarks_its_one_module_against_jax(lora_run):
    assert lora_run["generation_weights"] == "float16" and lora_run["decode_float32_ms_per_token"] is None
    assert lora_run["config"]["tuning"]["mode"] == "lora"
    assert lora_run["finetune_s_per_step"]["iree"] > 0 and lora_run["finetune_s_per_step"]["jax"] > 0
    table = bench.format_table(lora_run)
    assert "LoRA rank 8 on attn+mlp" in table and "float32 module" not in table and "PyTorch" not in table


def test_a_lora_build_benchmarks_beside_pytorch_and_peft(tiny_lora_build):
    """PyTorch's PEFT step on the same shape, where PyTorch, transformers and peft are installed."""
    from gpt2_iree import peers

    if not peers.available():
        pytest.skip("the [peers] extra (torch, transformers, peft) is not installed")
    result = bench.run_benchmark(tiny_lora_build, device="local-task", repeats=1, warmup=1, with_peers=True,
                                 log=lambda line: None)
    peer = result["peers"]["pytorch"]
    assert "PEFT LoRA" in peer["engine"] and peer["finetune_s_per_step"] > 0 and peer["peak_rss_mb"] > 0
    assert "IREE/PyTorch" in bench.format_table(result)
