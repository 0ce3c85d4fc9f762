"""corpus: texts of any size packed into windows, held out and shuffled as a run relies on."""

import tracemalloc

import numpy as np
import pytest
from english import paragraphs

from gpt2_iree import corpus
from gpt2_iree.corpus import Batches, Corpus, CorpusError
from gpt2_iree.tokenizer import Tokenizer, write_byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    write_byte_tokenizer(path)
    return Tokenizer(path)


@pytest.fixture(scope="module")
def bpe_tokenizer(tmp_path_factory):
    """A byte-level BPE with merges and GPT-2's pre-tokenizer, trained here on
    the test text: merges are what could join tokens across a chunk's end."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([paragraphs(20_000, seed=1) + "  indented\n\t\ttabs \n\n\n x"], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return Tokenizer(path)


def test_windows_cover_every_next_token_pair_once_and_mask_the_short_last_one():
    tokens = np.arange(100, 110, dtype=np.int32)  # 10 tokens: 9 next-token pairs
    packed = Corpus(tokens, seq_len=4)
    assert len(packed) == 3  # pairs 0-3, 4-7, 8
    text, target, lengths = packed.batch(np.arange(3), rows=4)
    assert lengths.tolist() == [4, 4, 1, 0]  # the last row is empty: the batch has 4 rows
    pairs = [(int(x), int(y)) for row, n in enumerate(lengths) for x, y in zip(text[row, :n], target[row, :n])]
    assert pairs == [(t, t + 1) for t in range(100, 109)]
    assert text[2].tolist() == [108, 0, 0, 0] and target[2].tolist() == [109, 0, 0, 0]


def test_documents_are_joined_with_end_of_text_and_none_is_cut(tokenizer, tmp_path):
    long = "x" * 150  # longer than any window
    (tmp_path / "a.txt").write_text(long)
    stream = corpus.read_documents(tokenizer, [tmp_path / "a.txt"], ["hi"])
    assert stream.tolist() == tokenizer.encode(long) + [tokenizer.eot_id] + tokenizer.encode("hi") + [tokenizer.eot_id]


def test_a_directory_gives_its_txt_files_in_name_order(tmp_path):
    (tmp_path / "b.txt").write_text("b")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "notes.md").write_text("not text to train on")
    (tmp_path / "sub.txt").mkdir()
    single = tmp_path / "single.text"
    single.write_text("named as a file")
    assert corpus.text_files([tmp_path, single]) == [tmp_path / "a.txt", tmp_path / "b.txt", single]


@pytest.mark.parametrize("make, message", [
    (lambda d: d, "the directory has no .txt files"),
    (lambda d: d / "missing.txt", "no such file or directory"),
])
def test_a_path_with_no_text_is_refused(tmp_path, make, message):
    with pytest.raises(CorpusError, match=message):
        corpus.text_files([make(tmp_path)])


def test_empty_and_binary_files_are_refused(tokenizer, tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\n ")
    with pytest.raises(CorpusError, match="blank.txt is empty"):
        corpus.read_documents(tokenizer, [tmp_path / "blank.txt"])
    (tmp_path / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(CorpusError, match="image.txt is not UTF-8 text"):
        corpus.read_documents(tokenizer, [tmp_path / "image.txt"])


def test_tokenizing_in_chunks_gives_the_tokens_of_the_whole_text(bpe_tokenizer, tmp_path, monkeypatch):
    text = paragraphs(30_000, seed=2) + "  an indented line\n\t\ttabs \n\n\n x\n"
    (tmp_path / "big.txt").write_text(text)
    monkeypatch.setattr(corpus, "CHUNK_CHARS", 200)  # ~150 chunks, each cut where a chunk may end
    stream = corpus.read_documents(bpe_tokenizer, [tmp_path / "big.txt"])
    assert stream.tolist() == bpe_tokenizer.encode(text) + [bpe_tokenizer.eot_id]


def test_a_large_file_costs_memory_near_its_tokens_not_a_multiple_of_its_text(tokenizer, tmp_path):
    (tmp_path / "big.txt").write_text(paragraphs(4_000_000, seed=3))
    tracemalloc.start()
    try:
        stream = corpus.read_documents(tokenizer, [tmp_path / "big.txt"])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The chunks' arrays and their concatenation: twice the tokens, plus a chunk.
    # Reading the whole text and tokenizing it at once peaks past 4x.
    assert peak < 2.5 * stream.nbytes, (peak, stream.nbytes)


def test_the_validation_split_holds_out_a_seeded_fraction_and_at_least_one_window():
    train, val = corpus.split(100, 0.1, seed=0)
    assert len(val) == 10 and sorted([*train, *val]) == list(range(100))
    assert np.array_equal(corpus.split(100, 0.1, seed=0)[1], val)
    assert not np.array_equal(corpus.split(100, 0.1, seed=1)[1], val)
    assert val.max() - val.min() > 50  # spread over the stream, not its end alone
    assert len(corpus.split(3, 0.1, seed=0)[1]) == 1
    assert len(corpus.split(100, 0, seed=0)[1]) == 0
    # A single window (one short text) can only be trained on.
    assert [len(part) for part in corpus.split(1, 0.1, seed=0)] == [1, 0]


@pytest.mark.parametrize("windows, fraction, message", [
    (2, 0.9, "holds 2 of the text's 2 windows out for validation, leaving none to train on"),
    (10, 1.0, "out of range; valid: 0 <= fraction < 1"),
    (10, -0.1, "out of range"),
])
def test_a_split_that_leaves_nothing_to_train_on_is_refused(windows, fraction, message):
    with pytest.raises(CorpusError, match=message):
        corpus.split(windows, fraction, seed=0)


def test_each_epoch_trains_every_window_once_in_a_new_seeded_order():
    packed = Corpus(np.arange(1, 42, dtype=np.int32), seq_len=4)  # 10 windows; token t starts window (t-1)/4
    train = np.arange(10)

    def epoch_orders(seed, epochs=3):
        batches = Batches(packed, train, rows=3, seed=seed)
        assert batches.steps_per_epoch == 4
        orders = []
        for epoch in range(epochs):
            firsts = [batches.at(epoch * 4 + i)[0][:, 0] for i in range(4)]
            orders.append([(int(t) - 1) // 4 for t in np.concatenate(firsts) if t])  # empty rows start with 0
        return orders

    orders = epoch_orders(seed=0)
    assert all(sorted(order) == list(range(10)) for order in orders)
    assert orders[0] != orders[1] != orders[2]
    assert epoch_orders(seed=0) == orders and epoch_orders(seed=1) != orders


def test_restored_batches_go_on_as_the_uninterrupted_ones():
    packed = Corpus(np.arange(1, 42, dtype=np.int32), seq_len=4)
    straight = Batches(packed, np.arange(10), rows=3, seed=7)
    expected = [straight.at(step)[0].tolist() for step in range(12)]
    first = Batches(packed, np.arange(10), rows=3, seed=7)
    for step in range(5):
        first.at(step)
    import json
    state = json.loads(json.dumps(first.state()))  # as a checkpoint keeps it
    resumed = Batches(packed, np.arange(10), rows=3, seed=7)
    resumed.restore(state)
    assert [resumed.at(step)[0].tolist() for step in range(5, 12)] == expected[5:]
