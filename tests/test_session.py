"""Text through gpt2_iree.session on the tiny build: generate, fine-tune, save, export."""

import shutil

import numpy as np
import pytest

from gpt2_iree import archive, generate_weights, verify
from gpt2_iree.corpus import CorpusError
from gpt2_iree.module import BuildError
from gpt2_iree.sampling import Sampling
from gpt2_iree.session import Session

SENTENCE = "The quick brown fox jumps over the lazy dog."


def test_generate_streams_until_max_new_tokens(tiny_build):
    pieces = list(Session(tiny_build).generate("Hello", max_new_tokens=5))
    assert len(pieces) == 5 and all(isinstance(p, str) for p in pieces)


def test_generation_never_dead_ends_when_the_context_is_full(tiny_build):
    # 100 prompt tokens and 100 new ones in a context of 128: the session keeps
    # the most recent half of the tokens and goes on (a context shift).
    session = Session(tiny_build)
    assert session.context == 128
    assert len(list(session.generate_ids([72] * 100, max_new_tokens=100))) == 100


def test_a_prompt_longer_than_the_context_is_generated_from_its_end(tiny_build):
    session = Session(tiny_build)
    long = list(session.generate_ids([65] * 136 + [66] * 64, max_new_tokens=8))
    assert long == list(session.generate_ids([66] * 64, max_new_tokens=8))


def test_an_empty_prompt_starts_from_end_of_text(tiny_build):
    session = Session(tiny_build)
    assert session.encode_prompt("") == [session.tokenizer.eot_id]
    assert list(session.generate_ids([session.tokenizer.eot_id], 6)) == list(session.generate_ids(
        session.encode_prompt(""), 6))


def test_resume_appends_to_the_cache_as_if_the_whole_text_were_one_prompt(tiny_build):
    session = Session(tiny_build)
    first, second = session.encode_prompt("Once upon a time"), session.encode_prompt(" there was")
    completion = list(session.generate_ids(first, 70))  # past a chunk, and the last token left pending
    resumed = list(session.generate_ids(second, 20, resume=True))
    assert resumed == list(session.generate_ids(first + completion + second, 20))
    # reset() forgets it all: the same call now starts over.
    session.reset()
    assert list(session.generate_ids(second, 20, resume=True)) == list(session.generate_ids(second, 20))


def test_seeded_sampling_repeats_and_top_k_1_is_greedy(tiny_build):
    session = Session(tiny_build)
    prompt = session.encode_prompt("Once upon a time")
    sampled = [list(session.generate_ids(prompt, 24, Sampling(0.9, 20, 0.95, seed))) for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert list(session.generate_ids(prompt, 24, Sampling(1.0, top_k=1, seed=3))) == list(
        session.generate_ids(prompt, 24))


def test_the_first_sampled_token_is_distributed_as_softmax_of_logits_over_temperature(tiny_build):
    from scipy import stats

    from gpt2_iree.generation import Rows

    module = Session(tiny_build).generation_module()
    # A temperature at which the random tiny model spreads its draws over a few likely tokens.
    rows, prompt, temperature = Rows(module), [72, 101, 108, 108, 111], 0.08
    rows.start(0, Sampling())
    rows.feed({0: prompt})
    logits = module.get_state()["logits"][0, :module.manifest["config"]["vocab_size"]].astype(np.float64)
    p = np.exp((logits - logits.max()) / temperature)
    p /= p.sum()
    draws = 2000
    counts = np.zeros_like(p)
    for seed in range(draws):
        rows.start(0, Sampling(temperature, seed=seed))
        counts[rows.feed({0: prompt})[0]] += 1
    # The five likeliest tokens, and the rest as one bin: a chi-square test at 0.1%.
    top = np.argsort(p)[::-1][:5]
    observed = np.append(counts[top], draws - counts[top].sum())
    expected = np.append(p[top], 1 - p[top].sum()) * draws
    assert expected.min() >= 5, expected  # the test's own premise: enough draws per bin
    assert stats.chisquare(observed, expected).pvalue > 1e-3, (observed, expected)


def test_stop_strings_end_the_completion_before_them(tiny_build):
    session = Session(tiny_build)
    free = "".join(session.generate("Hello", 40))
    stop = free[10:13]
    assert "".join(session.generate("Hello", 40, stop=(stop, "never"))) == free[:free.index(stop)]
    (completion,) = session.complete(["Hello"], 40, stop=(stop,))
    assert completion.text == free[:free.index(stop)] and completion.stop_reason == "stop"


@pytest.mark.parametrize("texts, message", [
    ([], "no text to fine-tune on"),
    (["ok", "  "], "text 2 is empty"),
])
def test_bad_finetune_texts_are_refused(tiny_build, texts, message):
    with pytest.raises(CorpusError, match=message):
        Session(tiny_build).finetune(texts, steps=1)


def test_texts_longer_than_seq_len_are_packed_into_windows_not_refused(tiny_build):
    session = Session(tiny_build)
    corpus = session.corpus(texts=["x" * 300, "y" * 40])
    # 342 tokens with end-of-text: 341 pairs, in windows of seq_len=128.
    assert len(corpus) == 3 and corpus.lengths([0, 1, 2]).tolist() == [128, 128, 85]
    assert len(session.finetune(["x" * 300, "y" * 40], steps=4)) == 4


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
    for name, value in after.archive_weights().items():  # the tuned weights, as float16 holds them
        np.testing.assert_array_equal(value, tuned[name].astype(np.float16).astype(np.float32))


def test_an_int8_build_generates_from_the_tuned_weights_quantized(tiny_int8_build, tmp_path):
    session = Session(tiny_int8_build)
    session.finetune([SENTENCE], steps=2, learning_rate=0.1)
    after = session.generation_module()
    tuned = session.module.get_params()
    quantized = generate_weights.widened(generate_weights.converted(tuned, "int8"))
    for name, value in after.archive_weights().items():
        np.testing.assert_array_equal(value, quantized[name], err_msg=name)
    report = verify.check_generation_parity(after)
    assert report["passed"] and report["weights_dtype"] == "int8", report["relative_errors"]
    # The saved weights, in a new session through `--params`, generate the same.
    session.save_params(tmp_path / "tuned.irpa")
    completion = "".join(session.generate("The quick", 16))
    assert "".join(Session(tiny_int8_build, params=tmp_path / "tuned.irpa").generate("The quick", 16)) == completion


def test_generating_needs_only_the_generation_module(tiny_build, tmp_path):
    """Generation alone never opens the whole module (a second copy of the
    weights, in float32); fine-tuning opens it when first asked."""
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build, ignore=shutil.ignore_patterns("gpt2-cpu.vmfb"))
    session = Session(build, "local-task")
    assert len(list(session.generate("Hello", max_new_tokens=3))) == 3
    with pytest.raises(BuildError, match="gpt2-cpu.vmfb is missing"):
        session.finetune([SENTENCE], steps=1)


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
