"""Fine-tuning data: texts -> one token stream -> windows the module trains on.

As nanoGPT and Hugging Face's `run_clm` do, the texts are packed: each
document (a file, or a text given) is tokenized, followed by end-of-text, and
the stream is cut into windows of `seq_len + 1` tokens, each the input
`window[:-1]` and the target `window[1:]` of one batch row. A window starts
where the last one's input ends, so consecutive windows share one token and
every next-token pair of the stream is trained on exactly once. The last
window may be shorter; its row is masked by its length, so nothing is
padded into the loss and no text is cut.

Some windows are held out for validation (a seeded choice across the whole
stream, not the last file alone); the rest are shuffled at the start of each
epoch by one seeded generator, whose state `Batches.state` gives to a
checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from gpt2_iree.errors import Gpt2IreeError

TEXT_SUFFIX = ".txt"
# How much text is tokenized at once: a large file costs memory near its
# tokens (4 bytes each), not a multiple of its text.
CHUNK_CHARS = 1 << 20


class CorpusError(Gpt2IreeError):
    """Text that cannot be fine-tuned on as given (missing, empty, too little)."""


def text_files(paths: Iterable[Path]) -> list[Path]:
    """The files behind `--text-file` arguments: a file itself, a directory's
    `.txt` files (sorted by name, so the stream is the same on every machine)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix == TEXT_SUFFIX and p.is_file())
            if not found:
                raise CorpusError(f"--text-file {path}: the directory has no {TEXT_SUFFIX} files")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"--text-file {path}: no such file or directory")
    return files


def _chunks(lines: Iterable[str]) -> Iterator[str]:
    """The text of `lines` in pieces of about CHUNK_CHARS, each ending at a line
    end followed by a line that starts with a visible character. GPT-2's
    pre-tokenizer never joins across such a point (a run of whitespace ends at
    it), so tokenizing the pieces gives the tokens of the whole text."""
    piece, size = [], 0
    for line in lines:
        if size >= CHUNK_CHARS and line[:1].strip():
            yield "".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line)
    if piece:
        yield "".join(piece)


def tokenize_documents(tokenizer, documents: Iterable[tuple[str, Iterable[str]]]) -> np.ndarray:
    """One int32 stream of every document's tokens, each followed by end-of-text.

    `documents` are (name, lines) pairs; the name is for the error of an empty one.
    """
    parts = []
    for name, lines in documents:
        visible = False
        for chunk in _chunks(lines):
            visible = visible or bool(chunk.strip())
            parts.append(np.asarray(tokenizer.encode(chunk), np.int32))
        if not visible:
            raise CorpusError(f"{name} is empty; give text to fine-tune on")
        parts.append(np.array([tokenizer.eot_id], np.int32))
    if not parts:
        raise CorpusError("no text to fine-tune on")
    return np.concatenate(parts)


def read_documents(tokenizer, files: list[Path] = (), texts: list[str] = ()) -> np.ndarray:
    """The token stream of `files` (read line by line) and `texts`, in that order."""
    def lines_of(path: Path) -> Iterator[str]:
        try:
            with open(path, encoding="utf-8") as f:
                yield from f
        except UnicodeDecodeError:
            raise CorpusError(f"--text-file {path} is not UTF-8 text") from None
        except OSError as err:
            raise CorpusError(f"--text-file {path}: {err.strerror}") from None

    documents = [(str(path), lines_of(path)) for path in files]
    documents += [(f"text {i}", text.splitlines(keepends=True)) for i, text in enumerate(texts, 1)]
    return tokenize_documents(tokenizer, documents)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A token stream cut into windows of `seq_len + 1` tokens (see the module's docstring)."""

    tokens: np.ndarray
    seq_len: int

    def __len__(self) -> int:
        """The number of windows: each starts seq_len after the last, and needs two tokens."""
        return -(-(len(self.tokens) - 1) // self.seq_len)

    def fingerprint(self) -> str:
        """What a checkpoint is tied to: the stream and how it is cut."""
        return hashlib.sha256(self.tokens.tobytes() + str(self.seq_len).encode()).hexdigest()

    def lengths(self, windows: np.ndarray) -> np.ndarray:
        """The predictions (target tokens) in each of `windows`."""
        starts = np.asarray(windows, np.int64) * self.seq_len
        return np.minimum(self.seq_len, len(self.tokens) - 1 - starts)

    def batch(self, windows: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(text, target, lengths) of `windows`, as `rows` rows of seq_len tokens.
        Rows past the windows given are empty (length 0): no loss, no gradient."""
        text = np.zeros((rows, self.seq_len), np.int32)
        target = np.zeros((rows, self.seq_len), np.int32)
        lengths = np.zeros((rows,), np.int32)
        for row, (window, n) in enumerate(zip(windows, self.lengths(windows))):
            start = int(window) * self.seq_len
            text[row, :n] = self.tokens[start:start + n]
            target[row, :n] = self.tokens[start + 1:start + n + 1]
            lengths[row] = n
        return text, target, lengths


def split(windows: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training windows, validation windows): `val_fraction` of them, at least
    one, chosen with `seed`, held out; none if `val_fraction` is 0, or if there
    is a single window (one short text), which can only be trained on."""
    if not 0 <= val_fraction < 1:
        raise CorpusError(f"--val-fraction {val_fraction} is out of range; valid: 0 <= fraction < 1")
    held = 0 if val_fraction == 0 or windows < 2 else max(1, round(val_fraction * windows))
    if held >= windows > 1:
        raise CorpusError(f"--val-fraction {val_fraction} holds {held} of the text's {windows} windows out "
                          f"for validation, leaving none to train on; give a smaller fraction or more text")
    chosen = np.random.default_rng(seed).permutation(windows)
    return np.sort(chosen[held:]), np.sort(chosen[:held])


class Batches:
    """The training batches, epoch by epoch: in each epoch every training window
    once, in an order drawn from a seeded generator at the epoch's start.

    An epoch is `steps_per_epoch` steps; its last batch may have empty rows.
    """

    def __init__(self, corpus: Corpus, train: np.ndarray, rows: int, seed: int):
        self.corpus, self.train, self.rows = corpus, np.asarray(train), rows
        self.steps_per_epoch = -(-len(self.train) // rows)
        self._generator = np.random.default_rng(seed)
        self.epoch, self.order = -1, np.array([], np.int64)  # no epoch drawn yet

    def at(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The batch of `step` (0-based). Steps come in order: an epoch's order
        is drawn when its first step is asked for."""
        epoch, position = divmod(step, self.steps_per_epoch)
        while self.epoch < epoch:
            self.order = self._generator.permutation(self.train)
            self.epoch += 1
        return self.corpus.batch(self.order[position * self.rows:(position + 1) * self.rows], self.rows)

    def state(self) -> dict:
        """What a checkpoint keeps to go on with the same batches: the epoch, its
        order, and the generator's state after drawing it (JSON-serialisable)."""
        return {"epoch": self.epoch, "order": self.order.tolist(), "generator": self._generator.bit_generator.state}

    def restore(self, state: dict) -> None:
        self.epoch, self.order = state["epoch"], np.asarray(state["order"], np.int64)
        self._generator.bit_generator.state = state["generator"]


def validation_batches(corpus: Corpus, val: np.ndarray, rows: int):
    """The validation windows in batches of `rows`, each with its number of target tokens."""
    for start in range(0, len(val), rows):
        text, target, lengths = corpus.batch(val[start:start + rows], rows)
        yield (text, target, lengths), int(lengths.sum())
