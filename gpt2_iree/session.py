"""Text in, text out: generate and fine-tune through a build's compiled modules."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gpt2_iree.corpus import Corpus, read_documents
from gpt2_iree.finetuning import Plan, Run
from gpt2_iree.module import DEFAULT_BUILD_DIR, BuildError, Module, has_generation_module


class Session:
    """Generate and fine-tune with text, through the compiled modules.

    The module keeps its weights between calls: after `finetune`, `generate`
    uses the fine-tuned weights, and `save_params` writes them to a `.irpa`
    that `Session(build_dir, params=...)` opens later in place of the original.
    `generate` runs on the generation module where the build has one for the
    device (float16 weights, twice as fast), opened on the current weights when
    first needed; else on the whole module.
    """

    def __init__(self, build_dir: Path = DEFAULT_BUILD_DIR, device: str | None = None, params: Path | None = None):
        from gpt2_iree.tokenizer import Tokenizer

        self.module = Module(build_dir, device, params)
        self._generator: Module | None = None  # the generation module, once opened
        self._tuned = False  # whether the weights have changed since the archive
        manifest = self.module.manifest
        shapes = manifest["shapes"]
        self.batch, self.prompt_len, self.seq_len = shapes["batch"], shapes["prompt_len"], shapes["seq_len"]
        if manifest["tokenizer"] is None:
            raise BuildError(f"{build_dir} has no tokenizer (weights=random of a Hub model downloads "
                             f"nothing); build with weights=pretrained to use text")
        self.tokenizer = Tokenizer(self.module.build_dir / manifest["tokenizer"])

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, refused before any work if the module can't take it."""
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty; give at least one token of text")
        if len(ids) > self.prompt_len:
            raise ValueError(f"the prompt is {len(ids)} tokens; this module takes at most {self.prompt_len} "
                             f"(rebuild with `doit prompt_len={len(ids)}` for longer prompts)")
        return ids

    def generate(self, prompt: str, max_new_tokens: int = 32) -> Iterator[str]:
        """Yield the completion of `prompt` piece by piece as tokens come (greedy).

        Stops after `max_new_tokens`, at end-of-text, or when the KV cache is
        full (`seq_len` positions: the prompt and what was generated).
        """
        ids = self.encode_prompt(prompt)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; give at least 1")
        prompt_ids = np.zeros((self.batch, self.prompt_len), np.int32)
        prompt_ids[:, : len(ids)] = ids  # every row the same prompt; row 0 is returned
        lengths = np.full((self.batch,), len(ids), np.int32)
        # encode predicts the token at position len(ids); each decode writes one
        # cache slot, the last at seq_len - 1.
        limit = min(max_new_tokens, self.seq_len - len(ids) + 1)
        new: list[int] = []
        text = ""
        generator = self.generation_module()
        token = int(generator.encode(prompt_ids, lengths)[0, 0])
        while True:
            if token == self.tokenizer.eot_id:
                return
            new.append(token)
            # Decode everything so far and yield what is new: a multi-byte
            # character can span tokens, and only the whole sequence decodes right.
            decoded = self.tokenizer.decode(new)
            if not decoded.endswith("\ufffd"):
                yield decoded[len(text):]
                text = decoded
            if len(new) >= limit:
                return
            token = int(generator.decode()[0, 0])

    def generation_module(self) -> Module:
        """The module `generate` runs on: the generation module on the current
        weights where the build has one for this device, else the whole module."""
        module = self.module
        if self._generator is None and has_generation_module(module):
            self._generator = Module(module.build_dir, module.device, module.params_path, generation=True,
                                     weights=module.get_params() if self._tuned else None, target=module.target)
        return self._generator or module

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
        """Write the module's current weights as a `.irpa` (atomically)."""
        from gpt2_iree.archive import write_irpa

        write_irpa(self.module.get_params(), Path(path))

    def export_hf(self, out_dir: Path) -> None:
        """Write the current weights as a Hugging Face GPT-2 directory."""
        from gpt2_iree import model, weights

        cfg = model.GPT2Config(**self.module.manifest["config"])
        weights.save_hf_model(self.module.get_params(), cfg, Path(out_dir),
                              self.module.build_dir / self.module.manifest["tokenizer"])
