"""IREE parameter archives (.irpa): the weights beside a module, by name."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gpt2_iree.errors import Gpt2IreeError, first_line
from gpt2_iree.files import replace_atomically

# The scope the module's globals name their parameters in
# (`#flow.parameter.named<"model"::"wte">`) and the runtime provides them under.
PARAMETER_SCOPE = "model"


class ArchiveError(Gpt2IreeError):
    """A file that is not a whole parameter archive (truncated, corrupt, or something else)."""


def write_irpa(arrays: dict, path: Path, dtype: np.dtype | None = np.float32) -> None:
    """Write arrays as a parameter archive, atomically: as `dtype` (weights are
    float32), or each in its own dtype if `dtype` is None."""
    import iree.runtime as rt

    index = rt.ParameterIndex()
    for name, value in arrays.items():
        index.add_buffer(name, np.ascontiguousarray(np.asarray(value, dtype)))
    replace_atomically(Path(path), lambda tmp: index.create_archive_file(str(tmp)))


def load_index(path: Path, index=None, **options):
    """The ParameterIndex of the archive at `path` (`options`: ParameterIndex.load's),
    or `index` with the archive's entries added.

    IREE's parser reports a truncated archive as an IndexError, other damage as
    a ValueError or RuntimeError; each becomes one ArchiveError naming the file.
    """
    import iree.runtime as rt

    index = rt.ParameterIndex() if index is None else index
    try:
        index.load(str(path), **options)
    except (IndexError, RuntimeError, ValueError) as err:
        raise ArchiveError(f"{path} is not an IREE parameter archive, or not all of one: {first_line(err)}") from None
    return index


def read_irpa(path: Path, dtype: np.dtype = np.float32) -> dict[str, np.ndarray]:
    """The arrays of an archive, flat, as `dtype` (weights: float32; np.uint8 gives the bytes)."""
    import iree.runtime as rt

    return {key: rt.parameter_index_entry_as_numpy_flat_ndarray(entry).view(dtype).copy()
            for key, entry in load_index(path).items()}


class ArchiveArrays(Mapping):
    """The float32 arrays of the archive at `path`, each read from the file
    when it is asked for, shaped as `shapes` says, and not kept: a conversion
    that takes them one at a time holds one (124M: at most wte's 155 MB),
    where `read_irpa` holds the whole archive (498 MB) beside what it becomes."""

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]]):
        self.path = Path(path)
        self.shapes = shapes
        # name -> (offset, bytes) in the file
        self.spans = {key: (entry.file_storage[1], entry.length) for key, entry in load_index(self.path).items()}

    def __getitem__(self, key: str) -> np.ndarray:
        offset, length = self.spans[key]
        return np.fromfile(self.path, np.float32, count=length // 4, offset=offset).reshape(self.shapes[key])

    def __iter__(self):
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)
