"""The compiled tiny module through gpt2_iree.runtime: open, generate, fine-tune, save."""


import platform
import resource
import shutil

import numpy as np
import pytest

from gpt2_iree import archive
from gpt2_iree.runtime import DEFAULT_BUILD_DIR, BuildError, Module, Session, available_devices, reuse_freed_memory
from tasks.config import parse_config

SENTENCE = "The quick brown fox jumps over the lazy dog."


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
    (tmp_path / "garbage.irpa").write_bytes(b"not an archive")
    with pytest.raises(BuildError, match="garbage.irpa is not an IREE parameter archive"):
        Module(tiny_build, params=tmp_path / "garbage.irpa")


def test_generate_streams_until_max_new_tokens(tiny_build):
    pieces = list(Session(tiny_build).generate("Hello", max_new_tokens=5))
    assert len(pieces) == 5 and all(isinstance(p, str) for p in pieces)


def test_generate_stops_when_the_cache_is_full(tiny_build):
    session = Session(tiny_build)
    # A 2-token prompt leaves seq_len - 2 cache slots, plus the token encode predicts.
    assert len(list(session.generate("Hi", max_new_tokens=1000))) == session.seq_len - 1


@pytest.mark.parametrize("prompt, message", [
    ("", "the prompt is empty"),
    ("a prompt of many bytes", "the prompt is 22 tokens; this module takes at most 8"),
])
def test_bad_prompts_are_refused(tiny_build, prompt, message):
    with pytest.raises(ValueError, match=message):
        list(Session(tiny_build).generate(prompt))


@pytest.mark.parametrize("texts, message", [
    ([], "no text to fine-tune on"),
    (["  "], "text 1 is empty"),
    (["ok", "x" * 80], r"text 2 is 80 tokens with end-of-text; this module fine-tunes on at most 65"),
])
def test_bad_finetune_texts_are_refused(tiny_build, texts, message):
    with pytest.raises(ValueError, match=message):
        Session(tiny_build).finetune(texts, steps=1)


def test_finetune_learns_a_sentence_and_saved_weights_keep_it(tiny_build, tmp_path):
    session = Session(tiny_build)
    original = "".join(session.generate("The quic", 40))
    losses = session.finetune([SENTENCE], steps=30, learning_rate=0.1)
    assert losses[-1] * 10 < losses[0], losses
    # Generation uses the fine-tuned weights in the module, and stops at end-of-text.
    completion = "".join(session.generate("The quic", 40))
    assert "The quic" + completion == SENTENCE and completion != original

    session.save_params(tmp_path / "tuned.irpa")
    reopened = Session(tiny_build, params=tmp_path / "tuned.irpa")
    assert "".join(reopened.generate("The quic", 40)) == completion
    # The original archive is untouched: fine-tuning happens in the module.
    assert "".join(Session(tiny_build).generate("The quic", 40)) == original


def test_generation_runs_on_the_generation_module_and_follows_fine_tuning(tiny_build):
    session = Session(tiny_build)
    before = session.generation_module()
    assert before.generation and before.device == session.module.device
    assert session.generation_module() is before  # opened once
    session.finetune([SENTENCE], steps=2, learning_rate=0.1)
    after = session.generation_module()
    assert after is not before and after.generation
    tuned = session.module.get_params()
    for name, value in after.archive_weights().items():
        np.testing.assert_array_equal(value, tuned[name])


def test_without_a_generation_module_generation_runs_on_the_whole_module(tiny_build, tmp_path):
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build, ignore=shutil.ignore_patterns("gpt2-generate-*"))
    session = Session(build)
    assert session.generation_module() is session.module
    assert len(list(session.generate("Hello", max_new_tokens=3))) == 3


def test_weights_given_in_memory_must_fit_the_module(tiny_build):
    weights = archive.read_irpa(tiny_build / "gpt2.irpa")
    weights["wte"] = weights["wte"].astype(np.float16)
    with pytest.raises(BuildError, match=r"the weights given do not match the module .*wrong size: wte"):
        Module(tiny_build, generation=True, weights=weights)


def test_export_hf_round_trips_the_weights(tiny_build, tmp_path):
    from gpt2_iree import model, weights

    session = Session(tiny_build)
    session.finetune([SENTENCE], steps=2, learning_rate=0.1)
    session.export_hf(tmp_path / "hf")
    cfg = weights.load_hf_config(tmp_path / "hf")
    assert cfg == model.GPT2Config(**session.module.manifest["config"])
    loaded = weights.load_hf_params(tmp_path / "hf", cfg)
    for name, value in session.module.get_params().items():
        np.testing.assert_array_equal(loaded[name], value)
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tiny_build / "tokenizer.json").read_bytes()
