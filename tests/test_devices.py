"""gpt2_iree.devices: which device runs a build when none is named."""

import pytest

from gpt2_iree import devices


def test_the_cpu_is_always_there():
    assert "local-task" in devices.available_devices()


def test_software_vulkan_is_known_as_such(vulkan):
    # Mesa's lavapipe, which CI installs, runs on the CPU.
    assert devices.is_software("vulkan")
    assert not devices.is_software("local-task")


def test_the_default_is_the_first_built_hardware_device(vulkan):
    assert devices.default_device(lambda driver: True) == "local-task"
    assert devices.default_device(lambda driver: driver == "vulkan") is None
    assert devices.default_device(lambda driver: False) is None


def test_a_lost_device_is_named_and_forgotten_so_the_next_module_opens_a_new_one():
    # As Vulkan's driver reported it in CI, and every later use of the device failed.
    lost = RuntimeError("queue.c:9356: DATA_LOSS; [vkGetSemaphoreCounterValue] VK_ERROR_DEVICE_LOST")
    first = devices.open_device("local-task")
    with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
        with devices.reports_device_loss("local-task", "finetune of gpt2-cpu.vmfb"):
            raise RuntimeError("INVALID_ARGUMENT; wrong shape")
    assert devices.open_device("local-task") is first
    with pytest.raises(devices.DeviceLostError, match=r"local-task device was lost during finetune of gpt2-cpu\.vmfb"):
        with devices.reports_device_loss("local-task", "finetune of gpt2-cpu.vmfb"):
            raise lost
    assert devices.open_device("local-task") is not first
