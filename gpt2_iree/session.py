"""Text in, text out: generate and fine-tune through a build's compiled modules."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import numpy as np

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

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of fine-tuning texts, each ending in end-of-text so the
        model also learns where a text stops. A text longer than the module's
        `seq_len` is refused, not cut: silently losing its end would train on
        something other than what was given."""
        if not texts:
            raise ValueError("no text to fine-tune on")
        encoded = []
        for i, text in enumerate(texts, 1):
            if not text.strip():
                raise ValueError(f"text {i} is empty")
            ids = self.tokenizer.encode(text) + [self.tokenizer.eot_id]
            if len(ids) - 1 > self.seq_len:
                raise ValueError(f"text {i} is {len(ids) - 1} tokens with end-of-text; this module fine-tunes on "
                                 f"at most {self.seq_len + 1} (seq_len={self.seq_len}). Split it, or rebuild "
                                 f"with `doit seq_len=...`")
            encoded.append(ids)
        return encoded

    def finetune(self, texts: list[str], steps: int = 30, learning_rate: float = 1e-3,
                 on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """`steps` optimizer steps over `texts` (cycled into batches); the loss of each step."""
        if steps < 1:
            raise ValueError(f"steps={steps}; give at least 1")
        if not learning_rate > 0:
            raise ValueError(f"learning rate {learning_rate} must be positive")
        encoded = self.encode_texts(texts)
        losses = []
        for step in range(steps):
            rows = [encoded[(step * self.batch + r) % len(encoded)] for r in range(self.batch)]
            text = np.zeros((self.batch, self.seq_len), np.int32)
            target = np.zeros((self.batch, self.seq_len), np.int32)
            lengths = np.array([len(ids) - 1 for ids in rows], np.int32)
            for r, ids in enumerate(rows):
                text[r, : len(ids) - 1] = ids[:-1]
                target[r, : len(ids) - 1] = ids[1:]
            losses.append(self.module.finetune(text, target, lengths, learning_rate))
            self._generator, self._tuned = None, True  # its weights are the old ones now
            if on_step:
                on_step(step, losses[-1])
        return losses

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
