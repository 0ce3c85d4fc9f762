"""Which IREE devices this host has, and which one runs a build when none is named."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from gpt2_iree.errors import Gpt2IreeError, first_line

# iree.runtime driver -> the target whose vmfb it executes.
DRIVER_TARGETS = {"metal": "metal", "local-task": "cpu", "local-sync": "cpu", "vulkan": "vulkan", "cuda": "cuda"}
# Preferred first when no device is named: the GPU this product is for, then the CPU.
DEVICE_PREFERENCE = ("metal", "cuda", "vulkan", "local-task")
# Vulkan implementations that run on the CPU (VkPhysicalDeviceType CPU). They
# run the GPU code path, which is what tests want, but the CPU module is faster
# on the same cores, so they are never the default. iree.runtime lists a
# device's name, not its type, so they are known by name: Mesa's lavapipe
# calls itself "llvmpipe (LLVM ...)", Google's "SwiftShader Device (...)".
SOFTWARE_VULKAN_NAMES = ("llvmpipe", "lavapipe", "swiftshader")


# The device of each driver that this process has opened. iree.runtime caches
# one per driver too, but for good: once a device was lost, every module
# opened after it in the process failed. Here a lost device is forgotten
# (`reports_device_loss`), and the next module opens a new one.
_OPENED: dict[str, object] = {}


class DeviceLostError(Gpt2IreeError):
    """The driver gave up on the device under a module (IREE's status DATA_LOSS:
    Vulkan's VK_ERROR_DEVICE_LOST): whatever the module held on it is gone."""


def open_device(driver: str):
    """The process's device of `driver` (an rt.HalDevice), opened on first use."""
    import iree.runtime as rt

    if driver not in _OPENED:
        _OPENED[driver] = rt.get_device(driver, cache=False)
    return _OPENED[driver]


@contextmanager
def reports_device_loss(driver: str, work: str) -> Iterator[None]:
    """Run `work` on `driver`'s device; if the device is lost, forget it and
    raise DeviceLostError, which names the device and the work."""
    try:
        yield
    except RuntimeError as err:
        if isinstance(err, Gpt2IreeError) or "DATA_LOSS" not in str(err):
            raise
        _OPENED.pop(driver, None)
        raise DeviceLostError(f"the {driver} device was lost during {work} ({first_line(err)}); "
                              f"what the module held on it is gone, fine-tuned weights since the last save or "
                              f"checkpoint included; open the build again for a new device") from err


def _devices(driver: str) -> list[dict] | None:
    """The devices of `driver`, or None where its system library (libvulkan, libcuda) is missing."""
    import iree.runtime as rt

    try:
        return rt.get_driver(driver).query_available_devices()
    except (RuntimeError, ValueError):
        return None


def has_device(driver: str) -> bool:
    """Whether this runtime has `driver` with a usable device. It probes that
    driver alone: probing Vulkan loads every installed Vulkan implementation
    into the process, and Mesa's lavapipe brings 42 MB of resident LLVM."""
    import iree.runtime as rt

    return (driver in DRIVER_TARGETS and driver in rt.query_available_drivers()
            and (driver.startswith("local") or bool(_devices(driver))))


def available_devices() -> list[str]:
    """The drivers of this runtime that have a usable device."""
    import iree.runtime as rt

    return [driver for driver in rt.query_available_drivers() if has_device(driver)]


def is_software(driver: str) -> bool:
    """Whether every device of `driver` is a Vulkan implementation on the CPU."""
    devices = _devices(driver) if driver == "vulkan" else None
    return bool(devices) and all(any(s in d["name"].lower() for s in SOFTWARE_VULKAN_NAMES) for d in devices)


def default_device(is_built: Callable[[str], bool]) -> str | None:
    """The first driver of DEVICE_PREFERENCE for which `is_built(driver)` says a
    module exists, that this host has, and that is hardware (or the CPU); None if
    none. Only drivers with a module are probed."""
    return next((d for d in DEVICE_PREFERENCE if is_built(d) and has_device(d) and not is_software(d)), None)
