"""IREE parameter archives (.irpa): the weights beside a module, by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gpt2_iree.files import replace_atomically

# The scope the module's globals name their parameters in
# (`#flow.parameter.named<"model"::"wte">`) and the runtime provides them under.
PARAMETER_SCOPE = "model"


def write_irpa(params: dict, path: Path) -> None:
    """Write float32 weights as a parameter archive, atomically."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    for name, value in params.items():
        index.add_buffer(name, np.ascontiguousarray(np.asarray(value, np.float32)))
    replace_atomically(Path(path), lambda tmp: index.create_archive_file(str(tmp)))


def read_irpa(path: Path) -> dict[str, np.ndarray]:
    """The weights of an archive as flat float32 arrays by key."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    index.load(str(path))
    return {key: rt.parameter_index_entry_as_numpy_flat_ndarray(entry).view(np.float32).copy()
            for key, entry in index.items()}
