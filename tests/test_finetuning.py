"""finetuning: a run on the tiny module takes its schedule's rates, validates without changing what it
learns, and stops, checkpointed, when asked."""

import pytest
from english import paragraphs

from gpt2_iree import checkpoint, schedule
from gpt2_iree.corpus import Batches, split
from gpt2_iree.finetuning import Plan, Run
from gpt2_iree.module import Module
from gpt2_iree.session import Session


@pytest.fixture(scope="module")
def corpus(tiny_build):
    return Session(tiny_build).corpus(texts=[paragraphs(3000)])


def run(tiny_build, corpus, **plan):
    train, val = split(len(corpus), 0.2, seed=0)
    return Run(Module(tiny_build), corpus, train, val, Plan(**({"steps": 8, "learning_rate": 0.05} | plan)))


def test_each_step_takes_the_schedules_rate(tiny_build, corpus):
    scheduled = run(tiny_build, corpus, lr_schedule="cosine", warmup_steps=3)
    assert scheduled.train()
    # The same batches, stepped by hand at the schedule's rates.
    module, batches = Module(tiny_build), Batches(corpus, scheduled.batches.train, 1, seed=0)
    by_hand = [module.finetune(*batches.at(step), schedule.learning_rate(step, 8, 0.05, "cosine", 3))
               for step in range(8)]
    assert scheduled.history.train_loss == by_hand
    constant = run(tiny_build, corpus)
    constant.train()
    assert constant.history.train_loss[0] == by_hand[0] and constant.history.train_loss[1:] != by_hand[1:]


def test_validating_changes_nothing_the_run_learns(tiny_build, corpus):
    often, never = run(tiny_build, corpus, eval_every=1), run(tiny_build, corpus)
    often.train()
    never.train()
    assert often.history.train_loss == never.history.train_loss
    assert [step for step, _ in often.history.val_loss] == list(range(9))
    assert [step for step, _ in never.history.val_loss] == [0]  # before; the caller validates after
    assert often.history.val_loss[-1][1] == never.validate()


def test_a_run_asked_to_stop_stops_after_the_step_and_is_checkpointed(tiny_build, corpus, tmp_path):
    stopping = run(tiny_build, corpus, checkpoint_dir=tmp_path / "ck")
    assert not stopping.train(should_stop=lambda: len(stopping.history.train_loss) == 3)
    assert stopping.step == 3
    saved = checkpoint.load(tmp_path / "ck", stopping.module.manifest)
    assert saved.step == 3 and saved.run["train_loss"] == stopping.history.train_loss


def test_a_checkpoint_of_other_text_or_seed_is_refused(tiny_build, corpus, tmp_path):
    first = run(tiny_build, corpus, checkpoint_dir=tmp_path / "ck", steps=2)
    first.train()
    saved = checkpoint.load(tmp_path / "ck", first.module.manifest)
    other = Session(tiny_build).corpus(texts=[paragraphs(3000, seed=9)])
    with pytest.raises(checkpoint.CheckpointError, match="the checkpoint is of another run"):
        run(tiny_build, other, steps=4).resume(saved)
    with pytest.raises(ValueError, match="is at step 2; a run of 2 steps has nothing left to do"):
        run(tiny_build, corpus, steps=2).resume(saved)

