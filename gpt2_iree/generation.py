"""KV-cached generation over a module's B rows: chunked prefill, windowed decode, context shift.

`Rows` drives the module's prefill, decode_<W> and seed entry points and
keeps, per row, the tokens its cache holds. The module samples each next
token on the device; only token ids cross to the host.

* A prompt of any length up to the context is appended chunk by chunk
  (`prompt_len` tokens per prefill call), each at the row's current position.
* A decode step attends over the smallest of the module's windows that holds
  every active row, so a step early in the context reads little of the cache.
* Context shift (llama.cpp's): when a row's cache is full, it keeps the most
  recent half of its tokens, prefills them again from position 0 and goes on,
  so a long generation or conversation never dead-ends. The model then no
  longer sees the older half.
* Rows are independent: a row that is not fed or not stepped keeps its state
  (prefill length 0, decode inactive), and each row has its own generator.
* A step in which no row samples runs the module's greedy decode entry,
  which leaves the sampler out (and the generators as they were).
"""

from __future__ import annotations

import numpy as np

from gpt2_iree.sampling import Sampling


def decode_function(window: int, greedy: bool = False) -> str:
    """The module's decode entry for `window`; `greedy`, the one without the sampler."""
    return f"decode_greedy_{window}" if greedy else f"decode_{window}"


class Rows:
    """The generation state of a module's rows. `module` is a module.Module
    (the generation module, or the whole one: they share these entry points)."""

    def __init__(self, module):
        manifest = module.manifest
        self.module = module
        self.batch = manifest["shapes"]["batch"]
        self.chunk = manifest["shapes"]["prompt_len"]
        self.context = manifest["shapes"]["context"]
        self.windows = manifest["decode_windows"]
        # Per row: the tokens in its cache (positions 0..len-1), and the token
        # sampled after them, which the next decode step writes.
        self.history: list[list[int]] = [[] for _ in range(self.batch)]
        self.pending: list[int | None] = [None] * self.batch
        self.settings: list[Sampling] = [Sampling()] * self.batch

    def start(self, row: int, settings: Sampling) -> None:
        """Empty `row` and restart its generator at `settings.seed`."""
        self.history[row], self.pending[row], self.settings[row] = [], None, settings
        rows = np.zeros(self.batch, np.int32)
        rows[row] = 1
        self.module.seed(np.full(self.batch, settings.seed, np.int32), rows)

    def feed(self, tokens: dict[int, list[int]]) -> dict[int, int]:
        """Append `tokens[row]` (after the row's pending token, if any) to each
        row's cache; each fed row's next token. A row whose cache would
        overflow keeps its most recent tokens: all of the new ones if they fit
        in the context, else its most recent half, as a context shift would."""
        todo = {}
        for row, new in tokens.items():
            if len(new) > self.context:
                new = new[-(self.context // 2):]
            total = self.history[row] + ([self.pending[row]] if self.pending[row] is not None else []) + new
            if len(total) > self.context:
                total = total[-max(self.context // 2, len(new)):]
                self.history[row] = []
            todo[row] = total[len(self.history[row]):]
        return self._prefill(todo)

    def step(self, rows: set[int]) -> dict[int, int]:
        """One new token for each of `rows`, which must each hold a pending token."""
        full = {r for r in rows if len(self.history[r]) == self.context}
        shifted = {}
        for r in full:  # context shift: the pending token goes in with the kept half
            kept = (self.history[r] + [self.pending[r]])[-(self.context // 2):]
            self.history[r] = []
            shifted[r] = kept
        out = self._prefill(shifted) if shifted else {}
        decoding = rows - full
        if decoding:
            position = max(len(self.history[r]) for r in decoding)
            window = next(w for w in self.windows if w > position)
            active = np.zeros(self.batch, np.int32)
            active[list(decoding)] = 1
            greedy = all(self.settings[r].temperature == 0 for r in decoding)
            tokens = self.module.decode(window, active, self._positions(), None if greedy else self._sampling())
            for r in decoding:
                self.history[r].append(self.pending[r])
                self.pending[r] = int(tokens[r])
                out[r] = self.pending[r]
        return out

    def _prefill(self, todo: dict[int, list[int]]) -> dict[int, int]:
        """Write each row's tokens into its cache, chunk by chunk, after what it holds."""
        out = {}
        while todo:
            chunk = np.zeros((self.batch, self.chunk), np.int32)
            lengths = np.zeros(self.batch, np.int32)
            for row, tokens in todo.items():
                part = tokens[:self.chunk]
                chunk[row, :len(part)], lengths[row] = part, len(part)
            next_tokens = self.module.prefill(chunk, lengths, self._positions(), self._sampling())
            for row in list(todo):
                self.history[row] += todo[row][:self.chunk]
                todo[row] = todo[row][self.chunk:]
                if not todo[row]:
                    del todo[row]
                    self.pending[row] = out[row] = int(next_tokens[row])
        return out

    def _positions(self) -> np.ndarray:
        """Each row's position: its length, where its next K/V goes (the
        module takes them from the host)."""
        return np.array([len(h) for h in self.history], np.int32)

    def _sampling(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return (np.array([s.temperature for s in self.settings], np.float32),
                np.array([s.top_k for s in self.settings], np.int32),
                np.array([s.top_p for s in self.settings], np.float32))
