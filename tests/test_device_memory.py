"""gpt2_iree.device_memory: host memory every device takes, and results that stay put."""

import numpy as np

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
