"""Checkpoints: what a fine-tuning run needs to go on as if it had never stopped.

A checkpoint directory holds

    params-<step>.irpa   the weights (an archive that `--params` also takes)
    opt-<step>.irpa      the optimizer's state, each leaf in its own dtype
    checkpoint.json      the step, both archives' names, sizes and sha256, and
                         the run's state: epoch, data order, generator state,
                         the losses so far

A save writes the two archives under the new step's names (each atomically,
see files.replace_atomically), then replaces checkpoint.json: that rename is
the commit. Only then are older archives removed. So a process killed at any
point, SIGKILL included, leaves checkpoint.json naming whole files: the
previous checkpoint or the new one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from gpt2_iree.archive import read_irpa, write_irpa
from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import sha256_file, write_json

POINTER = "checkpoint.json"
FORMAT = 1
ARCHIVES = ("params", "opt")


class CheckpointError(Gpt2IreeError):
    """A checkpoint that is missing, damaged, or of another build or run."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    directory: Path
    params: Path  # the weights' archive, to open the module on
    opt_state: dict[str, np.ndarray]
    run: dict  # as given to `save`: the step, the data order, the history...

    @property
    def step(self) -> int:
        return self.run["step"]


def build_identity(manifest: dict) -> dict:
    """What a checkpoint must share with the build that resumes it: the same
    model, shapes and optimizer (so the same weights and optimizer state); a
    LoRA build's adapters also the same LoRA and the same frozen base."""
    identity = {key: manifest[key] for key in ("config", "shapes", "optimizer")}
    if "base" in manifest:
        identity |= {"tuning": manifest["tuning"], "base_sha256": manifest["base"]["sha256"]}
    return identity


def holds_checkpoint(directory: Path) -> bool:
    return (Path(directory) / POINTER).is_file()


def save(directory: Path, module, run: dict) -> Path:
    """Save `module`'s weights and optimizer state with `run` (which holds "step")
    as the checkpoint in `directory`; returns the pointer's path."""
    directory = Path(directory)
    directory.mkdir(exist_ok=True)
    step = run["step"]
    names = {kind: f"{kind}-{step:08d}.irpa" for kind in ARCHIVES}
    write_irpa(module.get_params(), directory / names["params"])
    write_irpa(module.get_opt_state(), directory / names["opt"], dtype=None)
    files = {kind: {"name": name, "bytes": (directory / name).stat().st_size,
                    "sha256": sha256_file(directory / name)} for kind, name in names.items()}
    write_json(directory / POINTER, {"format": FORMAT, "build": build_identity(module.manifest),
                                     "files": files, "run": run})
    # Older checkpoints, and what a save killed before its commit left: its
    # archives, and the temporary files replace_atomically had no time to remove.
    keep = {*names.values(), POINTER}
    for pattern in (*(f"{kind}-*.irpa" for kind in ARCHIVES), *(f".{kind}-*.tmp" for kind in ARCHIVES),
                    f".{POINTER}.*.tmp"):
        for old in directory.glob(pattern):
            if old.name not in keep:
                old.unlink(missing_ok=True)
    return directory / POINTER


def load(directory: Path, manifest: dict) -> Checkpoint:
    """The checkpoint in `directory`, checked whole and made for `manifest`'s build."""
    directory = Path(directory)
    pointer = directory / POINTER
    if not pointer.is_file():
        raise CheckpointError(f"--resume {directory}: no checkpoint there (no {POINTER})")
    try:
        record = json.loads(pointer.read_text())
        files, run = record["files"], record["run"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"--resume {directory}: {POINTER} is damaged (not a checkpoint record)") from None
    if record.get("format") != FORMAT:
        raise CheckpointError(f"--resume {directory}: checkpoint format {record.get('format')!r}; "
                              f"this version reads format {FORMAT}")
    if record.get("build") != build_identity(manifest):
        raise CheckpointError(f"--resume {directory}: the checkpoint was made with another build "
                              f"(model, shapes, optimizer or LoRA base differ from this one's)")
    for kind in ARCHIVES:
        path = directory / files[kind]["name"]
        if not path.is_file() or path.stat().st_size != files[kind]["bytes"] or \
                sha256_file(path) != files[kind]["sha256"]:
            raise CheckpointError(f"--resume {directory}: {path.name} is missing or damaged "
                                  f"(not the {files[kind]['bytes']} bytes the checkpoint recorded)")
    raw = read_irpa(directory / files["opt"]["name"], np.uint8)
    layout = manifest["opt_state"]
    if sorted(raw) != sorted(name for name, _, _ in layout):
        raise CheckpointError(f"--resume {directory}: its optimizer state does not match this build's")
    opt_state = {name: raw[name].view(dtype).reshape(shape) for name, shape, dtype in layout}
    return Checkpoint(directory, directory / files["params"]["name"], opt_state, run)
