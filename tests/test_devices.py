"""gpt2_iree.devices: which device runs a build when none is named."""

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
