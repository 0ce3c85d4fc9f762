"""Text through gpt2_iree.session on the tiny build: generate, fine-tune, save, export."""

import shutil

import numpy as np
import pytest

from gpt2_iree import archive
from gpt2_iree.corpus import CorpusError
from gpt2_iree.session import Session

SENTENCE = "The quick brown fox jumps over the lazy dog."


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
    (["ok", "  "], "text 2 is empty"),
])
def test_bad_finetune_texts_are_refused(tiny_build, texts, message):
    with pytest.raises(CorpusError, match=message):
        Session(tiny_build).finetune(texts, steps=1)


def test_texts_longer_than_seq_len_are_packed_into_windows_not_refused(tiny_build):
    session = Session(tiny_build)
    corpus = session.corpus(texts=["x" * 150, "y" * 20])
    assert len(corpus) == 3 and corpus.lengths([0, 1, 2]).tolist() == [64, 64, 43]  # 172 tokens with end-of-text, 171 pairs
    assert len(session.finetune(["x" * 150, "y" * 20], steps=4)) == 4


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


def test_a_session_on_vulkan_generates_fine_tunes_and_saves_as_on_the_cpu(tiny_vulkan_build, tmp_path):
    cpu, gpu = Session(tiny_vulkan_build, device="local-task"), Session(tiny_vulkan_build, device="vulkan")
    assert gpu.generation_module().device == "vulkan" and gpu.generation_module().generation
    assert "".join(gpu.generate("The quic", 20)) == "".join(cpu.generate("The quic", 20))
    losses = [s.finetune([SENTENCE], steps=3, learning_rate=0.1) for s in (cpu, gpu)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    assert "".join(gpu.generate("The quic", 20)) == "".join(cpu.generate("The quic", 20))
    gpu.save_params(tmp_path / "tuned.irpa")
    saved = archive.read_irpa(tmp_path / "tuned.irpa")
    for name, value in gpu.module.get_params().items():
        np.testing.assert_array_equal(saved[name].reshape(value.shape), value)
    # An archive opened on Vulkan is streamed into device buffers.
    reopened = Session(tiny_vulkan_build, device="vulkan", params=tmp_path / "tuned.irpa")
    assert "".join(reopened.generate("The quic", 20)) == "".join(gpu.generate("The quic", 20))
