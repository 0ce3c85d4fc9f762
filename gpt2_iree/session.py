"""Text in, text out: generate and fine-tune through a build's compiled modules."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gpt2_iree.corpus import Corpus, read_documents
from gpt2_iree.finetuning import Plan, Run
from gpt2_iree.generation import Rows
from gpt2_iree.devices import DRIVER_TARGETS
from gpt2_iree.module import DEFAULT_BUILD_DIR, BuildError, Module, choose_device, has_generation_module, read_manifest
from gpt2_iree.sampling import GREEDY, Sampling


@dataclasses.dataclass
class Completion:
    """One prompt's completion: its text, its new token ids (end-of-text not
    included) and why it ended: end-of-text, a stop string, or max_new_tokens."""

    prompt: str
    text: str
    tokens: list[int]
    stop_reason: str


class _Text:
    """A completion as it grows: tokens in, the text that is safe to show out.

    Text is held back while it could still be the start of a stop string or
    ends inside a multi-byte character (only the whole sequence decodes right);
    a stop string ends the completion before it.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.tokens: list[int] = []
        self.text, self.shown = "", 0
        self.stop_reason: str | None = None

    def add(self, token: int) -> str:
        """Take the next token; the new text to show."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        found = [i for i in (text.find(s, max(0, self.shown - len(s))) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stop_reason = text[:min(found)], "stop"
            return self._show(len(self.text))
        self.text = text
        held = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return self._show(len(text) - held)

    def end(self, reason: str) -> str:
        """End the completion for `reason` ("eot", "length"); the text still held."""
        self.stop_reason = reason
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        piece = self.text[self.shown:upto]
        self.shown = max(self.shown, upto)
        return piece


class Session:
    """Generate and fine-tune with text, through the compiled modules.

    The module keeps its weights between calls: after `finetune`, `generate`
    uses the fine-tuned weights, and `save_params` writes them to a `.irpa`
    that `Session(build_dir, params=...)` opens later in place of the original.
    `generate` runs on the generation module where the build has one for the
    device (float16 or int8 weights, twice as fast or more), opened on the current weights when
    first needed; else on the whole module.

    The KV cache is kept between calls: `generate(..., resume=True)` appends the
    new text to what the cache holds (the last prompt and its completion) and
    prefills only that; `reset()` starts over. A full context shifts: see
    generation.py.
    """

    def __init__(self, build_dir: Path = DEFAULT_BUILD_DIR, device: str | None = None, params: Path | None = None):
        from gpt2_iree.tokenizer import Tokenizer

        self.build_dir, self.params_path = Path(build_dir), params
        self.manifest = manifest = read_manifest(self.build_dir)
        if manifest["tokenizer"] is None:
            raise BuildError(f"{build_dir} has no tokenizer (weights=random of a Hub model downloads "
                             f"nothing); build with weights=pretrained to use text")
        self.device = choose_device(self.build_dir, device)
        self._target = DRIVER_TARGETS[self.device]
        self._has_generator = has_generation_module(self.build_dir, manifest, self._target)
        # Generating alone never opens the whole module, whose float32 weights
        # would be a second copy beside the generation module's.
        self._module: Module | None = None  # the whole module, once opened
        self._generator: Module | None = None  # the generation module, once opened
        self._rows: Rows | None = None  # its rows' caches
        self._tuned = False  # whether the weights have changed since the archive
        shapes = manifest["shapes"]
        self.batch, self.prompt_len, self.seq_len = shapes["batch"], shapes["prompt_len"], shapes["seq_len"]
        self.context = shapes["context"]
        self.tokenizer = Tokenizer(self.build_dir / manifest["tokenizer"])
        self.generation_module()  # opened now: a bad archive is found before any work

    @property
    def module(self) -> Module:
        """The whole module (fine-tuning, weights), opened when first needed."""
        if self._module is None:
            self._module = Module(self.build_dir, self.device, self.params_path)
        return self._module

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt. An empty prompt is end-of-text: GPT-2's start
        of unconditional text. One longer than the context is generated from
        its most recent half-context of tokens (see generation.Rows.feed)."""
        return self.tokenizer.encode(prompt) or [self.tokenizer.eot_id]

    def reset(self) -> None:
        """Forget what the cache holds: the next `generate` starts over."""
        self._rows = None

    def generate(self, prompt: str, max_new_tokens: int = 32, sampling: Sampling = GREEDY,
                 stop: tuple[str, ...] = (), resume: bool = False) -> Iterator[str]:
        """Yield the completion of `prompt` piece by piece as tokens come.

        Stops after `max_new_tokens`, at end-of-text, or before the first of
        the `stop` strings. With `resume`, `prompt` continues what the cache
        holds, in the same generator stream; else it starts afresh, seeded
        with `sampling.seed`.
        """
        text = _Text(self.tokenizer, tuple(stop))
        tokens = self.generate_ids(self.encode_prompt(prompt), max_new_tokens, sampling, resume)
        for token in tokens:
            if piece := text.add(token):
                yield piece
            if text.stop_reason:
                tokens.close()
                return
        if piece := text.end("length"):
            yield piece

    def generate_ids(self, ids: list[int], max_new_tokens: int = 32, sampling: Sampling = GREEDY,
                     resume: bool = False) -> Iterator[int]:
        """`generate` for callers that tokenize themselves: yield the new token
        ids of row 0, ending before end-of-text or after `max_new_tokens`."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; give at least 1")
        rows = self._rows_for(resume)
        if resume and rows.history[0]:
            rows.settings[0] = sampling  # the same generator stream, new settings
        else:
            rows.start(0, sampling)
        token = rows.feed({0: list(ids)})[0]
        for produced in range(1, max_new_tokens + 1):
            if token == self.tokenizer.eot_id:
                return
            yield token
            if produced < max_new_tokens:
                token = rows.step({0})[0]

    def complete(self, prompts: list[str], max_new_tokens: int = 32, sampling: Sampling = GREEDY,
                 stop: tuple[str, ...] = ()) -> list[Completion]:
        """Complete each prompt on its own, `batch` at a time, one row each:
        a prompt's completion is the one it gets alone, with the same seed."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; give at least 1")
        encoded = [self.encode_prompt(p) for p in prompts]
        done = []
        for first in range(0, len(prompts), self.batch):
            group = range(first, min(first + self.batch, len(prompts)))
            rows = self._rows_for(resume=False)
            for row in range(len(group)):
                rows.start(row, sampling)
            texts = [_Text(self.tokenizer, tuple(stop)) for _ in group]
            live = set(range(len(group)))
            next_tokens = rows.feed({row: encoded[i] for row, i in enumerate(group)})
            while live:
                for row in sorted(live):
                    token, text = next_tokens[row], texts[row]
                    if token == self.tokenizer.eot_id:
                        text.end("eot")
                    else:
                        text.add(token)
                    if not text.stop_reason and len(text.tokens) >= max_new_tokens:
                        text.end("length")
                    if text.stop_reason:
                        live.discard(row)
                if live:
                    next_tokens = rows.step(live)
            self._rows = None  # the rows hold this group now, not a conversation
            done += [Completion(prompts[i], t.text, t.tokens, t.stop_reason) for i, t in zip(group, texts)]
        return done

    def _rows_for(self, resume: bool) -> Rows:
        generator = self.generation_module()
        if self._rows is None or self._rows.module is not generator or not resume:
            self._rows = Rows(generator)
        return self._rows

    def generation_module(self) -> Module:
        """The module `generate` runs on: the generation module on the current
        weights where the build has one for this device, else the whole module."""
        if self._generator is None and self._has_generator:
            self._generator = Module(self.build_dir, self.device, self.params_path, generation=True,
                                     weights=self.module.get_params() if self._tuned else None, target=self._target)
        return self._generator or self.module

    def corpus(self, files: list[Path] = (), texts: list[str] = ()) -> Corpus:
        """`files` and `texts`, tokenized and packed into windows of this module's
        seq_len + 1 tokens (see corpus.py): any length, nothing cut."""
        return Corpus(read_documents(self.tokenizer, files, texts), self.seq_len)

    def train(self, run: Run, on_step=None, should_stop=lambda: False) -> bool:
        """`run.train` (a finetuning.Run on this session's module); generation
        follows the weights it leaves, finished or stopped."""
        try:
            return run.train(on_step, should_stop)
        finally:
            self._generator, self._tuned = None, True  # its weights are the old ones now

    def finetune(self, texts: list[str], steps: int = 30, learning_rate: float = 1e-3,
                 on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """`steps` optimizer steps on `texts`, packed, every window trained on
        (no validation split); the loss of each step."""
        corpus = self.corpus(texts=texts)
        run = Run(self.module, corpus, np.arange(len(corpus)), np.array([], np.int64),
                  Plan(steps=steps, learning_rate=learning_rate))
        self.train(run, on_step and (lambda step, loss, _: on_step(step - 1, loss)))
        return run.history.train_loss

    def save_params(self, path: Path) -> None:
        """Write what the module trains as a `.irpa` (atomically): every weight,
        or in a LoRA build only the adapters, which `params=` loads onto the same build."""
        from gpt2_iree.archive import write_irpa

        write_irpa(self.module.get_params(), Path(path))

    def full_weights(self) -> dict[str, np.ndarray]:
        """Every weight as the module computes with it, float32: in a LoRA
        build the frozen base with the adapters merged in."""
        from gpt2_iree import generate_weights, lora

        tuning = lora.from_manifest(self.module.manifest)
        trained = self.module.get_params()
        return lora.merged(generate_weights.widened(self.module.stored_base()), trained, tuning) if tuning else trained

    def export_hf(self, out_dir: Path) -> None:
        """Write the current weights as a Hugging Face GPT-2 directory (merged, in a LoRA build)."""
        from gpt2_iree import model, weights

        cfg = model.GPT2Config(**self.module.manifest["config"])
        weights.save_hf_model(self.full_weights(), cfg, Path(out_dir),
                              self.module.build_dir / self.module.manifest["tokenizer"])

    def export_peft(self, out_dir: Path) -> None:
        """Write a LoRA build's adapters as a Hugging Face PEFT adapter directory."""
        from gpt2_iree import lora, model

        tuning = lora.from_manifest(self.module.manifest)
        if tuning is None:
            raise BuildError(f"{self.module.build_dir} fine-tunes every weight, so it has no adapters to "
                             f"export; build with `doit tuning=lora`")
        lora.save_peft(self.module.get_params(), model.GPT2Config(**self.module.manifest["config"]), tuning,
                       Path(out_dir))
