"""checkpoint: saved whole or not at all, loaded only whole and for the build that made it."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gpt2_iree import checkpoint
from gpt2_iree.checkpoint import CheckpointError
from gpt2_iree.module import Module

REPO = Path(__file__).resolve().parent.parent
BATCH = (np.arange(128, dtype=np.int32)[None] % 200, (np.arange(128, dtype=np.int32)[None] + 1) % 200,
         np.array([128], np.int32))


@pytest.fixture()
def saved(tiny_build, tmp_path):
    """A module two steps in, and the checkpoint of it."""
    module = Module(tiny_build)
    for _ in range(2):
        module.finetune(*BATCH, 0.1)
    checkpoint.save(tmp_path / "ck", module, {"step": 2, "note": "the run's state"})
    return module, tmp_path / "ck"


def test_a_checkpoint_resumes_the_same_next_step(tiny_build, saved):
    module, directory = saved
    loaded = checkpoint.load(directory, module.manifest)
    assert loaded.step == 2 and loaded.run["note"] == "the run's state"
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.json", "opt-00000002.irpa",
                                                           "params-00000002.irpa"]
    resumed = Module(tiny_build, params=loaded.params)
    resumed.set_opt_state(loaded.opt_state)
    assert resumed.finetune(*BATCH, 0.1) == module.finetune(*BATCH, 0.1)
    for name, value in module.get_params().items():
        np.testing.assert_array_equal(resumed.get_params()[name], value)


def test_a_new_save_replaces_the_old_one(saved):
    module, directory = saved
    module.finetune(*BATCH, 0.1)
    checkpoint.save(directory, module, {"step": 3})
    assert checkpoint.load(directory, module.manifest).step == 3
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.json", "opt-00000003.irpa",
                                                           "params-00000003.irpa"]


def test_damage_is_found_and_named(saved, tmp_path):
    module, directory = saved
    for damage, message in [
        (lambda d: (d / "params-00000002.irpa").write_bytes((d / "params-00000002.irpa").read_bytes()[:1000]),
         "params-00000002.irpa is missing or damaged"),
        (lambda d: (d / "opt-00000002.irpa").unlink(), "opt-00000002.irpa is missing or damaged"),
        (lambda d: (d / "checkpoint.json").write_text('{"format": 1, "fi'), "checkpoint.json is damaged"),
        (lambda d: (d / "checkpoint.json").unlink(), "no checkpoint there"),
    ]:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(directory, copy)
        damage(copy)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.load(copy, module.manifest)


def test_a_checkpoint_of_another_build_is_refused(saved):
    module, directory = saved
    other = json.loads(json.dumps(module.manifest)) | {"optimizer": "sgd"}
    with pytest.raises(CheckpointError, match="made with another build"):
        checkpoint.load(directory, other)


def test_a_save_killed_at_any_moment_leaves_a_whole_checkpoint(tiny_build, tmp_path):
    saver = ("import sys\nfrom gpt2_iree import checkpoint\nfrom gpt2_iree.module import Module\n"
             "module = Module(sys.argv[1])\nstep = 0\nwhile True:\n    step += 1\n"
             "    checkpoint.save(sys.argv[2], module, {'step': step})\n")
    for delay in (0.05, 0.2, 0.45):  # into the loop of saves, at different points of one
        directory = tmp_path / f"ck-{delay}"
        child = subprocess.Popen([sys.executable, "-c", saver, str(tiny_build), str(directory)], cwd=REPO)
        deadline = time.monotonic() + 120
        while not (directory / checkpoint.POINTER).is_file() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        manifest = json.loads((tiny_build / "manifest.json").read_text())
        loaded = checkpoint.load(directory, manifest)
        Module(tiny_build, params=loaded.params).set_opt_state(loaded.opt_state)
    # The next save sweeps away what a killed one left.
    checkpoint.save(directory, Module(tiny_build), {"step": 1000})
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint.json", "opt-00001000.irpa",
                                                           "params-00001000.irpa"]
