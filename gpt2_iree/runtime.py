"""Open a build directory with `iree.runtime` and call the compiled GPT-2.

A build directory (made by `doit`) holds `manifest.json`, `gpt2.irpa`,
`tokenizer.json` and one `gpt2-<target>.vmfb` per target. The weights are
loaded from the archive as a parameter provider, so a fine-tuned `.irpa` can
stand in for the original without recompiling.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from gpt2_iree.errors import Gpt2IreeError

# iree.runtime driver -> the target whose vmfb it executes.
DRIVER_TARGETS = {"metal": "metal", "local-task": "cpu", "local-sync": "cpu", "vulkan": "vulkan", "cuda": "cuda"}
# Preferred first when no device is named: the GPU this product is for, then the CPU.
DEVICE_PREFERENCE = ("metal", "cuda", "vulkan", "local-task")


class BuildError(Gpt2IreeError):
    """A build directory that cannot be opened as asked (not built, wrong device...)."""


def available_devices() -> list[str]:
    """The drivers of this runtime that have a usable device."""
    import iree.runtime as rt

    usable = []
    for driver in rt.query_available_drivers():
        if driver not in DRIVER_TARGETS:
            continue
        try:
            if driver.startswith("local") or rt.get_driver(driver).query_available_devices():
                usable.append(driver)
        except (RuntimeError, ValueError):  # a driver whose system library (libvulkan, libcuda) is missing
            continue
    return usable


def read_manifest(build_dir: Path) -> dict:
    path = Path(build_dir) / "manifest.json"
    if not path.is_file():
        raise BuildError(f"{build_dir} is not built yet (no manifest.json); build it with `doit` "
                         f"(e.g. `doit model=tiny` for the tiny model)")
    return json.loads(path.read_text())


class Module:
    """The compiled module on one device, its weights from one parameter archive."""

    def __init__(self, build_dir: Path, device: str | None = None, params: Path | None = None):
        import iree.runtime as rt

        self.build_dir = Path(build_dir)
        self.manifest = read_manifest(self.build_dir)
        have = available_devices()
        if device is None:
            built = [d for d in DEVICE_PREFERENCE if d in have and self._vmfb(d).is_file()]
            if not built:
                raise BuildError(f"{self.build_dir} has no module for any device here ({', '.join(have)}); "
                                 f"build one with `doit targets=cpu`")
            device = built[0]
        if device not in have:
            raise BuildError(f"device {device!r} is not available here; this runtime has: {', '.join(have)}")
        vmfb = self._vmfb(device)
        if not vmfb.is_file():
            raise BuildError(f"{vmfb} is missing; build it with `doit targets={DRIVER_TARGETS[device]}`")
        self.device = device
        self.params_path = Path(params) if params else self.build_dir / "gpt2.irpa"
        self.check_params(self.params_path)

        config = rt.Config(device)
        index = rt.ParameterIndex()
        index.load(str(self.params_path))
        self._modules = [
            rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope="model")),
            rt.create_hal_module(config.vm_instance, config.device),
            rt.VmModule.mmap(config.vm_instance, str(vmfb)),
        ]
        self._context = rt.SystemContext(vm_modules=self._modules, config=config)
        self.functions = self._context.modules.gpt2

    def _vmfb(self, device: str) -> Path:
        return self.build_dir / f"gpt2-{DRIVER_TARGETS[device]}.vmfb"

    def check_params(self, path: Path) -> None:
        """Refuse an archive whose keys or shapes differ from the module's, before
        IREE fails on it somewhere deep inside the first call."""
        import iree.runtime as rt

        if not path.is_file():
            raise BuildError(f"parameter archive {path} does not exist")
        index = rt.ParameterIndex()
        try:
            index.load(str(path))
        except (RuntimeError, ValueError) as err:
            raise BuildError(f"{path} is not an IREE parameter archive: {err}") from None
        sizes = {key: entry.length for key, entry in index.items()}
        expected = {name: 4 * int(np.prod(shape)) for name, shape in self.manifest["params"]}
        missing = sorted(set(expected) - set(sizes))
        extra = sorted(set(sizes) - set(expected))
        wrong = sorted(k for k in set(expected) & set(sizes) if sizes[k] != expected[k])
        if missing or extra or wrong:
            parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for label, keys in (("missing", missing), ("unexpected", extra), ("wrong size", wrong)) if keys]
            raise BuildError(f"{path} does not match the module in {self.build_dir} ({'; '.join(parts)})")

    # --- raw entry points, numpy in and out ---
    # Results are copied: `to_host()` can map the device buffer itself, which
    # IREE reuses once the result is released, changing an array we handed out.

    def encode(self, prompt: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        return _host(self.functions.encode(prompt.astype(np.int32), lengths.astype(np.int32)))

    def decode(self) -> np.ndarray:
        return _host(self.functions.decode())

    def finetune(self, text: np.ndarray, target: np.ndarray, lengths: np.ndarray, learning_rate: float) -> float:
        loss = self.functions.finetune(text.astype(np.int32), target.astype(np.int32),
                                       lengths.astype(np.int32), np.float32(learning_rate))
        return float(_host(loss))

    def get_params(self) -> dict[str, np.ndarray]:
        values = self.functions.get_params()
        return {name: _host(v) for (name, _), v in zip(self.manifest["params"], values, strict=True)}

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        self.functions.set_params(*[np.asarray(params[name], np.float32) for name, _ in self.manifest["params"]])

    def get_state(self) -> dict[str, np.ndarray]:
        values = self.functions.get_state()
        return {name: _host(v) for name, v in zip(self.manifest["state"], values, strict=True)}


def _host(value) -> np.ndarray:
    return np.array(value.to_host(), copy=True)
