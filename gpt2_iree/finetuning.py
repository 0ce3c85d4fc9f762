"""A fine-tuning run: optimizer steps over a corpus on a schedule, with
validation, checkpoints, and a clean stop on SIGINT or SIGTERM.

The run is a function of its seed: the batches (corpus.Batches), the learning
rates (schedule) and the module's state. A checkpoint holds all three, so a
run resumed from one takes the very steps the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gpt2_iree import checkpoint, schedule
from gpt2_iree.corpus import Batches, Corpus, validation_batches
from gpt2_iree.errors import Gpt2IreeError


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a run trains. `eval_every`/`save_every`: steps between validations
    and between checkpoints (None: validate before and after only; save at the end only)."""

    steps: int
    learning_rate: float
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    eval_every: int | None = None
    save_every: int | None = None
    checkpoint_dir: Path | None = None
    seed: int = 0

    def check(self) -> None:
        """Refuse a plan that cannot run, naming the value and the valid range."""
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}; give at least 1")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate {self.learning_rate} must be positive")
        schedule.check(self.lr_schedule, self.warmup_steps, self.steps)

    def learning_rate_at(self, step: int) -> float:
        return schedule.learning_rate(step, self.steps, self.learning_rate, self.lr_schedule, self.warmup_steps)


@dataclasses.dataclass
class History:
    """Per-step training losses, [step, loss] validation losses (step = steps
    taken before it), and this process's training tokens and seconds."""

    train_loss: list[float] = dataclasses.field(default_factory=list)
    val_loss: list[list] = dataclasses.field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    def report(self) -> dict:
        return {"train_loss": self.train_loss, "val_loss": self.val_loss, "tokens_per_s": self.tokens_per_s}


class Run:
    """One run of `plan` on `module` (a module.Module): training on the
    `train` windows of `corpus`, validating on the `val` windows."""

    def __init__(self, module, corpus: Corpus, train: np.ndarray, val: np.ndarray, plan: Plan):
        plan.check()
        self.module, self.corpus, self.val, self.plan = module, corpus, np.asarray(val), plan
        self.batches = Batches(corpus, train, module.manifest["shapes"]["batch"], plan.seed)
        self.history = History()
        self.step = 0  # steps taken
        self._saved_step = None

    @property
    def identity(self) -> dict:
        """What a resumed run must share with the checkpoint's."""
        return {"corpus": self.corpus.fingerprint(), "seed": self.plan.seed, "val": self.val.tolist()}

    def resume(self, saved: checkpoint.Checkpoint) -> None:
        """Go on from `saved`; the module must have been opened on `saved.params`."""
        if saved.run["identity"] != self.identity:
            raise checkpoint.CheckpointError(
                f"--resume {saved.directory}: the checkpoint is of another run (other text, --seed "
                f"{saved.run['identity']['seed']} or another --val-fraction); resume it with its own")
        if saved.step >= self.plan.steps:
            raise ValueError(f"the checkpoint in {saved.directory} is at step {saved.step}; a run of "
                             f"{self.plan.steps} steps has nothing left to do (give more --steps or --epochs)")
        self.module.set_opt_state(saved.opt_state)
        self.batches.restore(saved.run["batches"])
        self.history.train_loss = list(saved.run["train_loss"])
        self.history.val_loss = [list(v) for v in saved.run["val_loss"]]
        self.step = self._saved_step = saved.step

    def validate(self) -> float | None:
        """The validation loss on the current weights (mean over target tokens),
        recorded at the current step; None without validation windows."""
        if not len(self.val):
            return None
        if self.history.val_loss and self.history.val_loss[-1][0] == self.step:
            return self.history.val_loss[-1][1]  # a resumed run's, taken before its checkpoint
        total = tokens = 0
        for batch, n in validation_batches(self.corpus, self.val, self.batches.rows):
            total += self.module.eval_loss(*batch) * n
            tokens += n
        loss = total / tokens
        self.history.val_loss.append([self.step, loss])
        return loss

    def save(self) -> Path | None:
        """Checkpoint the run into plan.checkpoint_dir (once per step); the pointer's path."""
        directory = self.plan.checkpoint_dir
        if directory is None:
            return None
        if self._saved_step != self.step:
            checkpoint.save(directory, self.module, {
                "step": self.step, "identity": self.identity, "batches": self.batches.state(),
                "train_loss": self.history.train_loss, "val_loss": self.history.val_loss})
            self._saved_step = self.step
        return Path(directory)

    def train(self, on_step: Callable[[int, float, float | None], None] | None = None,
              should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Take the plan's remaining steps; True if all were taken, False if
        `should_stop` said so after a step (the run is checkpointed then).

        Validates before the first step and every `eval_every` steps (the
        caller validates after the last, once it has saved the weights);
        checkpoints every `save_every` steps and after the last.
        `on_step(step, loss, last validation loss)` follows each step (1-based).
        """
        plan = self.plan
        self.validate()
        while self.step < plan.steps:
            text, target, lengths = self.batches.at(self.step)
            start = time.perf_counter()
            loss = self.module.finetune(text, target, lengths, plan.learning_rate_at(self.step))
            self.history.seconds += time.perf_counter() - start
            self.history.tokens += int(lengths.sum())
            self.history.train_loss.append(loss)
            self.step += 1
            if plan.eval_every and self.step % plan.eval_every == 0:
                self.validate()
            if on_step:
                on_step(self.step, loss, self.history.val_loss[-1][1] if self.history.val_loss else None)
            if plan.save_every and self.step % plan.save_every == 0:
                self.save()
            if should_stop() and self.step < plan.steps:
                self.save()
                return False
        self.save()
        return True


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows a float past ~709


class Interrupted(Gpt2IreeError):
    """A run stopped by SIGINT or SIGTERM; the message says what was kept."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


@contextlib.contextmanager
def stop_on_signals() -> Iterator[Callable[[], int | None]]:
    """While inside, SIGINT and SIGTERM only ask the run to stop: yields a
    function returning the signal received, if any. The step under way ends
    and is kept, instead of a KeyboardInterrupt inside an IREE call losing it."""
    received: list[int] = []
    handlers = {sig: signal.signal(sig, lambda number, _frame: received.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0] if received else None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
