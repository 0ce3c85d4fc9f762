"""Run a library function as a doit action, importing it only when the task runs.

Heavy imports (jax, iree) stay out of graph loading, and an error the user can
fix (a `Gpt2IreeError` or a bad value) fails the task with its message alone.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

from doit.exceptions import TaskFailed


def call(target: str, *args, **kwargs) -> tuple:
    """A doit python-action running `module:function(*args, **kwargs)`."""
    return (_run, [target, args, kwargs])


def _run(target: str, args: tuple, kwargs: dict):
    from gpt2_iree.errors import Gpt2IreeError

    module, _, name = target.partition(":")
    # doit swaps sys.stderr for a capturing writer while an action runs; absl
    # (imported by jax) would keep that writer as its log stream and fail to
    # close it at exit. The action gets the real stderr, which also shows
    # progress bars (downloads) as they move.
    with contextlib.redirect_stderr(sys.__stderr__):
        try:
            getattr(importlib.import_module(module), name)(*args, **kwargs)
        except (Gpt2IreeError, ValueError) as err:
            return TaskFailed(f"{type(err).__name__}: {err}")
    return None


def remove_outputs(directory, names) -> None:
    """A clean action: remove `names` in `directory`, then the directory and
    its parents up to build/ as they become empty, so `doit clean` leaves no trace."""
    from pathlib import Path

    directory = Path(directory)
    for name in names:
        (directory / name).unlink(missing_ok=True)
    while directory.name and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent
