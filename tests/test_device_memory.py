"""gpt2_iree.device_memory: host memory every device takes, and results that stay put."""

import mmap
import os
import re
from pathlib import Path

import numpy as np
import pytest

from gpt2_iree import device_memory
from gpt2_iree.devices import open_device


def test_the_arena_puts_every_tensor_on_a_page_of_its_own():
    arena, offsets = device_memory.page_aligned_arena({"a": 10, "b": device_memory.PAGE, "c": 1})
    assert arena.ctypes.data % device_memory.PAGE == 0 and arena.nbytes % device_memory.PAGE == 0
    assert offsets == {"a": 0, "b": device_memory.PAGE, "c": 2 * device_memory.PAGE}
    assert arena.nbytes == 3 * device_memory.PAGE


def test_weights_are_copied_into_the_arena_as_they_were():
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(5, np.float32)}
    index, placed = device_memory.index_of_arrays(weights)
    assert {key for key, _ in index.items()} == {"w", "b"}
    for name, value in weights.items():
        np.testing.assert_array_equal(placed[name], value)
        assert placed[name].ctypes.data % device_memory.PAGE == 0


def test_each_entry_is_made_and_converted_as_it_is_copied():
    made = []
    layout = {"w": ((2, 3), np.dtype("float16")), "q": ((3, 2), np.dtype("int8"))}

    def make(name):
        made.append(name)
        return np.full(layout[name][0], 1 / 3 if name == "w" else -7, np.float32)

    _, placed = device_memory.index_of_weights(layout, make)
    assert made == ["w", "q"]
    assert placed["w"].dtype == np.float16 and placed["w"][0, 0] == np.float16(1 / 3)
    assert placed["q"].dtype == np.int8 and np.all(placed["q"] == -7)


def test_a_result_read_back_is_a_copy_on_either_device(vulkan):
    for driver in ("local-task", vulkan):
        device = open_device(driver)
        result = device_memory.to_device(device, np.arange(4, dtype=np.int32))
        host = device_memory.to_numpy(device, result)
        host[0] = 99
        assert device_memory.to_numpy(device, result).tolist() == [0, 1, 2, 3]


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage").is_dir(), reason="Linux with huge pages only")
def test_an_archive_read_back_into_large_folios_is_mapped_in_2_mb_pages(tmp_path):
    """A decode step reads every weight of a mapped archive: in 2 MB pages a
    124M float16 step took 15 ms, in 4 KB ones 17.6. Large reads are what
    make the kernel's 2 MB folios (its first megabytes come in smaller ones),
    so the file is larger than a tiny model's archive. Written 4 KB at a
    time, its pages are cached in 4 KB folios, as the export leaves an archive."""
    path = tmp_path / "weights.irpa"
    data = np.random.default_rng(0).bytes(64 << 20)
    with open(path, "wb") as f:
        for offset in range(0, len(data), 4096):
            f.write(data[offset:offset + 4096])
    os.sync()
    device_memory.cache_in_large_folios(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        for offset in range(0, len(mapped), 4096):
            mapped[offset]
        assert _file_pmd_mapped_kb(path) > 0, "no part of the file is mapped in 2 MB pages"


def _file_pmd_mapped_kb(path) -> int:
    """The kB of `path`'s mappings in this process that 2 MB page-table entries map."""
    total, ours = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
            ours = line.endswith(str(path))
        elif ours and line.startswith("FilePmdMapped:"):
            total += int(line.split()[1])
    return total
