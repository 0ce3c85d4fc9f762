"""LoRA: adapters on a frozen float16 or int8 base, tuned and generated in one
module, saved as small archives and in PEFT's format, checked against peft itself."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_LORA

from gpt2_iree import lora, model, models
from gpt2_iree.module import BuildError, Module

REPO = Path(__file__).resolve().parent.parent
SENTENCE = "The quick brown fox jumps over the lazy dog."
CFG = model.GPT2Config(**models.TINY_SHAPE)


def gpt2_iree(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2_iree.cli", *args], capture_output=True, text=True,
                          timeout=600)


def trained_adapters(tuning: lora.Lora, seed: int = 1) -> dict[str, np.ndarray]:
    """Adapters as after training: B no longer zero."""
    rng = np.random.default_rng(seed)
    return {name: (0.05 * rng.standard_normal(value.shape)).astype(np.float32) if name.endswith(model.LORA_B)
            else value for name, value in lora.init_adapters(CFG, tuning).items()}


def logits(params, tokens):
    return np.asarray(model.forward(params, CFG, tokens))[..., :CFG.vocab_size]


TOKENS = np.random.default_rng(0).integers(0, CFG.vocab_size, (1, 24), dtype=np.int32)


def test_fresh_adapters_change_nothing_and_merging_is_the_same_network():
    tuning = lora.Lora(**{**TINY_LORA, "targets": tuple(TINY_LORA["targets"])})
    base = {k: np.asarray(v) for k, v in model.init_params(CFG).items()}
    np.testing.assert_array_equal(logits(lora.network(base, lora.init_adapters(CFG, tuning), tuning), TOKENS),
                                  logits(base, TOKENS))
    adapters = trained_adapters(tuning)
    adapted = logits(lora.network(base, adapters, tuning), TOKENS)
    assert np.abs(adapted - logits(base, TOKENS)).max() > 1e-2  # the adapters matter...
    np.testing.assert_allclose(logits(lora.merged(base, adapters, tuning), TOKENS), adapted, atol=1e-5)  # ...merged too


@pytest.mark.parametrize("targets", [("attn",), ("mlp",), ("attn", "mlp")])
def test_peft_computes_what_the_exported_adapters_compute(targets, tmp_path):
    """PEFT, on transformers' GPT-2, loads what `save_peft` writes and gets our logits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    from gpt2_iree import weights
    from gpt2_iree.tokenizer import write_byte_tokenizer

    tuning = lora.Lora(8, 16.0, targets)
    base = {k: np.asarray(v) for k, v in model.init_params(CFG).items()}
    adapters = trained_adapters(tuning)
    write_byte_tokenizer(tmp_path / "tokenizer.json")
    weights.save_hf_model(base, CFG, tmp_path / "base", tmp_path / "tokenizer.json")
    lora.save_peft(adapters, CFG, tuning, tmp_path / "peft")

    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    ours = logits(lora.network(base, adapters, tuning), TOKENS)
    assert np.abs(ours - logits(base, TOKENS)).max() > 1e-2
    np.testing.assert_allclose(theirs, ours, atol=2e-5)


def test_the_module_trains_only_the_adapters_and_its_adapters_reload(tiny_lora_build, tmp_path):
    module = Module(tiny_lora_build, "local-task")
    manifest = module.manifest
    assert manifest["tuning"] == {"mode": "lora", **TINY_LORA}
    assert "generate" not in manifest and not list(tiny_lora_build.glob("gpt2-generate*"))
    assert all(name.endswith((".lora_a", ".lora_b")) for name, _ in manifest["params"])
    assert (tiny_lora_build / "base.irpa").stat().st_size < 0.6 * 4 * sum(
        int(np.prod(shape)) for _, shape in manifest["base"]["params"])  # float16: half of float32, and a header

    batch = _batch(SENTENCE)
    losses = [module.finetune(*batch, 1e-2) for _ in range(5)]
    assert losses[-1] < losses[0]
    tuned = module.get_params()
    assert any(np.abs(v).max() > 0 for k, v in tuned.items() if k.endswith(".lora_b"))

    from gpt2_iree.archive import write_irpa
    write_irpa(tuned, tmp_path / "adapters.irpa")
    reloaded = Module(tiny_lora_build, "local-task", params=tmp_path / "adapters.irpa")
    assert reloaded.eval_loss(*batch) == module.eval_loss(*batch)
    # Training moved the adapters only: with fresh ones again, the module
    # computes what the untrained build does.
    module.set_params(lora.init_adapters(CFG, lora.from_manifest(manifest)))
    assert module.eval_loss(*batch) == Module(tiny_lora_build, "local-task").eval_loss(*batch)


def _batch(text: str) -> tuple:
    tokens = np.asarray([[ord(c) for c in text * 3][:128]], np.int32)
    return tokens, np.roll(tokens, -1, axis=1), np.array([127], np.int32)


def test_an_int8_base_is_a_quarter_of_float32_and_trains_as_the_float16_one(tiny_lora_int8_build, tiny_lora_build):
    """Same adapters, same steps: the losses on an int8 base stay within 1 %
    of a float16 base's, and the module matches JAX on the same int8 base."""
    from gpt2_iree import verify

    int8 = Module(tiny_lora_int8_build, "local-task")
    assert int8.manifest["base"]["weights_dtype"] == "int8"
    float32_bytes = 4 * sum(int(np.prod(shape)) for _, shape in int8.manifest["base"]["params"])
    assert (tiny_lora_int8_build / "base.irpa").stat().st_size < 0.35 * float32_bytes
    batch = _batch(SENTENCE)
    float16 = Module(tiny_lora_build, "local-task")
    int8_losses, float16_losses = ([m.finetune(*batch, 1e-2) for _ in range(8)] for m in (int8, float16))
    assert int8_losses[-1] < 0.95 * int8_losses[0], int8_losses
    np.testing.assert_allclose(int8_losses, float16_losses, rtol=1e-2, err_msg=str((int8_losses, float16_losses)))

    report = verify.check_parity(Module(tiny_lora_int8_build, "local-task"))
    assert report["passed"] and report["base_dtype"] == "int8", report["relative_errors"]


@pytest.mark.parametrize("target, base", [("vulkan", "float16"), ("metal", "float16"), ("vulkan", "int8")])
def test_a_lora_module_matches_jax_on_vulkan(request, vulkan, target, base):
    """On the GPU code path: the vulkan module, and the Metal build's kernels compiled for Vulkan."""
    from gpt2_iree import compiler, targets, toolchain, verify

    build = request.getfixturevalue("tiny_lora_build" if base == "float16" else "tiny_lora_int8_build")
    stand_in = targets.get_target(target) if target == "vulkan" else targets.on_vulkan(targets.get_target(target))
    compiler.compile_target(toolchain.iree_compile(), build, stand_in)
    report = verify.check_parity(Module(build, "vulkan", target=stand_in.name))
    assert report["passed"], report["relative_errors"]
    assert report["sampled"]["equal_to_jax"] and report["tokens_equal"]


def test_a_checkpoint_of_adapters_resumes_exactly_and_only_on_its_base(tiny_lora_build, tiny_build, tmp_path):
    from gpt2_iree import checkpoint
    from gpt2_iree.checkpoint import CheckpointError

    module = Module(tiny_lora_build, "local-task")
    text = np.arange(128, dtype=np.int32)[None] % 200
    batch = (text, np.roll(text, -1, axis=1), np.array([127], np.int32))
    for _ in range(2):
        module.finetune(*batch, 1e-2)
    checkpoint.save(tmp_path / "ck", module, {"step": 2})
    loaded = checkpoint.load(tmp_path / "ck", module.manifest)
    resumed = Module(tiny_lora_build, "local-task", params=loaded.params)
    resumed.set_opt_state(loaded.opt_state)
    assert resumed.finetune(*batch, 1e-2) == module.finetune(*batch, 1e-2)
    with pytest.raises(CheckpointError, match="another build"):
        checkpoint.load(tmp_path / "ck", Module(tiny_build, "local-task").manifest)
    other_base = module.manifest | {"base": module.manifest["base"] | {"sha256": "0" * 64}}
    with pytest.raises(CheckpointError, match="LoRA base differ"):
        checkpoint.load(tmp_path / "ck", other_base)


def test_weights_of_a_full_build_are_refused_by_name(tiny_lora_build, tiny_build):
    with pytest.raises(BuildError, match=r"gpt2.irpa does not match the module .*missing: h.0.attn.out_w.lora_a"):
        Module(tiny_lora_build, "local-task", params=tiny_build / "gpt2.irpa")
    with pytest.raises(BuildError, match="a tuning=lora build: its one module generates"):
        Module(tiny_lora_build, "local-task", generation=True)


def test_export_peft_of_a_full_build_is_refused_before_work(tiny_build, tmp_path):
    result = gpt2_iree("finetune", "--build-dir", str(tiny_build), "--text", SENTENCE, "--steps", "1",
                       "--export-peft", str(tmp_path / "peft"))
    assert result.returncode != 0 and "fine-tunes every weight" in result.stderr and "tuning=lora" in result.stderr
    assert not (tmp_path / "peft").exists()


def _loss_range(stdout: str) -> tuple[float, float]:
    first, last = re.search(r"loss: ([\d.]+) -> ([\d.]+)", stdout).groups()
    return float(first), float(last)


def test_a_lora_build_tunes_saves_exports_and_rebuilds(english_tiny_model, tmp_path):
    """The user's path, each step in a fresh process: doit builds and verifies
    a LoRA build; finetune halves the loss on a sentence; the adapters it
    saves give the tuned completion through --params; its merged --export-hf
    builds with doit and generates the same tokens."""
    def doit(work: Path, *args: str) -> str:
        built = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(work), *args],
                               capture_output=True, text=True, timeout=900)
        assert built.returncode == 0, built.stdout + built.stderr
        return built.stdout

    work = tmp_path / "work"
    work.mkdir()
    out = doit(work, f"model={english_tiny_model}", "tuning=lora", "targets=cpu")
    assert "cpu: parity with JAX (LoRA rank 8, alpha 16, on attn, float16 base, float16 K/V) ok" in out
    build = next((work / "build").glob("local-english-tiny*/pretrained-b1-k64-c128-s128-adamw-lora-r8-a16-attn"))
    verify = json.loads((build / "verify-cpu.json").read_text())
    assert verify["passed"] and verify["relative_errors"]["finetune_params"] <= 1e-4

    adapters, hf, peft = tmp_path / "adapters.irpa", tmp_path / "hf", tmp_path / "peft"
    tuned = gpt2_iree("finetune", "--build-dir", str(build), "--text", SENTENCE, "--steps", "30", "--lr", "0.01",
                      "--prompt", "The quick", "--max-new-tokens", "24", "--out", str(adapters),
                      "--export-hf", str(hf), "--export-peft", str(peft))
    assert tuned.returncode == 0, tuned.stderr
    first, last = _loss_range(tuned.stdout)
    assert last * 2 < first, tuned.stdout
    # Only the adapters are saved: a few percent of the model.
    assert adapters.stat().st_size < 0.2 * (build / "base.irpa").stat().st_size
    assert sorted(p.name for p in peft.iterdir()) == sorted(lora.PEFT_FILES)
    after = tuned.stdout.split("after:  ", 1)[1].rstrip("\n")

    again = gpt2_iree("generate", "--build-dir", str(build), "--prompt", "The quick", "--max-new-tokens", "24",
                      "--params", str(adapters))
    assert again.returncode == 0, again.stderr
    assert again.stdout.rstrip("\n") == after

    doit(work, f"model={hf}", "targets=cpu")
    merged_build = next((work / "build").glob("local-hf-*/pretrained-b1-k64-c128-s128-adafactor"))
    merged = gpt2_iree("generate", "--build-dir", str(merged_build), "--prompt", "The quick",
                       "--max-new-tokens", "24")
    assert merged.returncode == 0, merged.stderr
    assert merged.stdout == again.stdout
