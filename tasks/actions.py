"""Run a library function as a doit action, importing it only when the task runs.

Heavy imports (jax, iree) stay out of graph loading, and an error the user can
fix (a `Gpt2IreeError` or a bad value) fails the task with its message alone.
"""

from __future__ import annotations

import contextlib
import importlib
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

from doit.exceptions import TaskFailed

# The folder holding `tasks` and `gpt2_iree`, for a child Python to import them.
ROOT = Path(__file__).resolve().parent.parent


def call(target: str, *args, **kwargs) -> tuple:
    """A doit python-action running `module:function(*args, **kwargs)`."""
    return (_run, [target, args, kwargs])


def call_with_toolchain(toolchain_json, target: str, *args, **kwargs) -> tuple:
    """`call`, importing `iree` from the toolchain that `toolchain_json` records.
    The wheels' packages are this Python's own, so their call runs here; a
    source build's run in a child Python with its bindings first on the path
    (this process may have imported the wheels' already, and a module is
    imported once)."""
    return (_run_with_toolchain, [toolchain_json, target, args, kwargs])


def fail(message: str) -> tuple:
    """A doit python-action that fails with `message`: for a stage this
    configuration or this machine cannot run, which `doit list` still shows."""
    return (_fail, [message])


def _fail(message: str) -> TaskFailed:
    return TaskFailed(message)


def _call(target: str, args: tuple, kwargs: dict) -> str | None:
    """Call `module:function`; the message of an error the user can fix, or None."""
    from gpt2_iree.errors import Gpt2IreeError

    module, _, name = target.partition(":")
    try:
        getattr(importlib.import_module(module), name)(*args, **kwargs)
    except (Gpt2IreeError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _run(target: str, args: tuple, kwargs: dict):
    # doit swaps sys.stderr for a capturing writer while an action runs; absl
    # (imported by jax) would keep that writer as its log stream and fail to
    # close it at exit. The action gets the real stderr, which also shows
    # progress bars (downloads) as they move.
    with contextlib.redirect_stderr(sys.__stderr__):
        failure = _call(target, args, kwargs)
    return TaskFailed(failure) if failure else None


def _run_with_toolchain(toolchain_json, target: str, args: tuple, kwargs: dict):
    from gpt2_iree.toolchain import python_env, read_record

    record = read_record(toolchain_json)
    if not record.get("python_path"):
        return _run(target, args, kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        call_file, error_file = Path(tmp, "call.pickle"), Path(tmp, "error.txt")
        call_file.write_bytes(pickle.dumps((target, args, kwargs)))
        env = python_env(record, [ROOT]) | {"PYTHONUNBUFFERED": "1"}
        # The child's stderr is the console's (progress bars); its stdout goes
        # where doit captures an action's prints.
        child = subprocess.Popen([sys.executable, "-m", "tasks.actions", call_file, error_file],
                                 stdout=subprocess.PIPE, text=True, env=env)
        for line in child.stdout:
            sys.stdout.write(line)
        code = child.wait()
        if code == 0:
            return None
        if error_file.is_file():
            return TaskFailed(error_file.read_text())
        return TaskFailed(f"{target} failed (exit {code}) in a Python importing IREE from "
                          f"{', '.join(record['python_path'])}; its traceback is above")


def _child(call_file: str, error_file: str) -> None:
    """The child of `call_with_toolchain`: make the call, report a user's error in `error_file`."""
    target, args, kwargs = pickle.loads(Path(call_file).read_bytes())
    if failure := _call(target, args, kwargs):
        Path(error_file).write_text(failure)
        sys.exit(1)


def remove_outputs(directory, names) -> None:
    """A clean action: remove `names` in `directory`, then the directory and
    its parents up to build/ as they become empty, so `doit clean` leaves no trace."""
    directory = Path(directory)
    for name in names:
        (directory / name).unlink(missing_ok=True)
    while directory.name and directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
        directory = directory.parent


if __name__ == "__main__":
    _child(*sys.argv[1:])
