"""A compiled module of a build directory, opened with `iree.runtime` on one device.

A build directory (made by `doit`) holds `manifest.json`, `gpt2.irpa`,
`tokenizer.json` and one `gpt2-<target>.vmfb` per target. The weights are
loaded from the archive as a parameter provider, so a fine-tuned `.irpa` can
stand in for the original without recompiling. `Module` is the raw module:
numpy arrays in and out of its entry points; `session.Session` puts text on top.
"""

from __future__ import annotations

import ctypes
import functools
import json
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from gpt2_iree import device_memory, generate_weights
from gpt2_iree.archive import PARAMETER_SCOPE
from gpt2_iree.devices import (DRIVER_TARGETS, DeviceLostError, available_devices, default_device, has_device,
                               open_device, reports_device_loss)
from gpt2_iree.errors import Gpt2IreeError, first_line
from gpt2_iree.generation import decode_function
from gpt2_iree.inspection import SOURCE_DIGEST_KEY
from gpt2_iree.targets import TARGETS, vmfb_name

# What `doit` builds with no vars (tests/test_module.py keeps the two in step).
DEFAULT_BUILD_DIR = Path("build/gpt2/pretrained-b1-k64-c1024-s128-adafactor")

# mallopt(3) parameters of glibc's malloc.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


class BuildError(Gpt2IreeError):
    """A build directory that cannot be opened as asked (not built, wrong device...)."""


def reuse_freed_memory() -> bool:
    """Have glibc keep freed memory for the next call rather than return it to the
    kernel; False where the C library is not glibc.

    IREE's CPU device mallocs each call's temporaries (a 124M fine-tuning step:
    1.2 GB) and frees them when the call ends. glibc serves blocks over 32 MB
    with a fresh mmap and unmaps them on free, so every call faulted all of its
    temporaries in again, zeroed by the kernel: 300k page faults, a third of a
    124M step. With mmap off and trimming off, the heap keeps its high-water mark
    and the next call reuses it. It holds for the whole process (JAX, in the same
    process, gains as much).
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def read_manifest(build_dir: Path) -> dict:
    path = Path(build_dir) / "manifest.json"
    if not path.is_file():
        raise BuildError(f"{build_dir} is not built yet (no manifest.json); build it with `doit` "
                         f"(e.g. `doit model=tiny` for the tiny model)")
    return json.loads(path.read_text())


def _doit(manifest: dict, target: str) -> str:
    """The doit command that builds `target`'s module for the configuration of
    `manifest`'s build (into build/, where doit put that build)."""
    return " ".join(filter(None, ("doit", manifest.get("doit_vars"), f"targets={target}")))


def choose_device(build_dir: Path, device: str | None = None, generation: bool = False) -> str:
    """`device`, refused if this runtime lacks it, or else the default device
    for which the build has a module (with `generation`, a generation module)."""
    if device is None:
        device = default_device(lambda driver: (Path(build_dir) / vmfb_name(DRIVER_TARGETS[driver], generation))
                                .is_file())
        if device is None:
            raise BuildError(f"{build_dir} has no module for a default device here "
                             f"({', '.join(available_devices())}; software Vulkan is never the default); "
                             f"build one with `{_doit(read_manifest(build_dir), 'cpu')}`, "
                             f"or name the device with --device")
    elif not has_device(device):
        raise BuildError(f"device {device!r} is not available here; "
                         f"this runtime has: {', '.join(available_devices())}")
    return device


def _on_device(entry):
    """An entry of Module whose lost device raises DeviceLostError naming it."""
    @functools.wraps(entry)
    def run(self, *args, **kwargs):
        with reports_device_loss(self.device, f"{entry.__name__} of {self._vmfb(self.target).name}"):
            return entry(self, *args, **kwargs)
    return run


class Module:
    """A compiled module of a build on one device, its weights read from a
    parameter archive or, given as `weights`, from arrays in memory.

    `generation` opens the build's generation module (encode, decode and
    get_state on float16 weights, see export.py) instead of the whole module.
    `target` names the target whose vmfb runs on `device` (default: the one the
    device's driver executes; `metal-on-vulkan`: the Metal build's kernels).
    """

    def __init__(self, build_dir: Path, device: str | None = None, params: Path | None = None,
                 generation: bool = False, weights: dict[str, np.ndarray] | None = None, target: str | None = None):
        self.build_dir = Path(build_dir)
        self.manifest = read_manifest(self.build_dir)
        self.generation = generation
        if generation and "base" in self.manifest:
            raise BuildError(f"{self.build_dir} is a tuning=lora build: its one module generates; "
                             f"open it without generation=True")
        if generation and "archive" not in self.manifest.get("generate", {}):
            raise BuildError(f"{self.build_dir} predates the float16 generation module; rebuild it with `doit`")
        if "base" in self.manifest and "weights_dtype" not in self.manifest["base"]:
            raise BuildError(f"{self.build_dir} predates int8 LoRA bases; rebuild it with `doit`")
        if decode_function(self.manifest["decode_windows"][0], greedy=True) not in self.manifest["functions"]:
            raise BuildError(f"{self.build_dir} predates the greedy decode entries; rebuild it with `doit`")
        if "pos" in self.manifest["state"]:  # the module kept each row's position itself
            raise BuildError(f"{self.build_dir} predates positions passed by value; rebuild it with `doit`")
        # What the module keeps its KV cache in (float32 in builds that predate the choice).
        self.cache_dtype = np.dtype((self.manifest["generate"] if generation else self.manifest)
                                    .get("cache_dtype", "float32"))
        device = choose_device(self.build_dir, device, generation)
        self.target = target or DRIVER_TARGETS[device]
        # The files and layout of the weights this module reads as constants
        # (the generation module's, a LoRA build's base) as this target reads
        # them: plain or packed. A `<target>-on-vulkan` is no entry of
        # TARGETS, and reads a GPU's layout.
        packs = self.target in TARGETS and TARGETS[self.target].packed_weights
        stored = "generate" if generation else "base" if "base" in self.manifest else None
        self._constant = generate_weights.as_read_by(self.manifest[stored], packs) if stored else None
        vmfb = self._vmfb(self.target)
        if not vmfb.is_file():
            raise BuildError(f"{vmfb} is missing; build it with `{_doit(self.manifest, self.target)}`")
        self.device = device
        if device.startswith("local"):
            reuse_freed_memory()
        if weights is None:
            self.params_path = Path(params) if params else self.build_dir / "gpt2.irpa"
            index, self._weights = self._load_params(self.params_path, given=params is not None)
        else:
            self.params_path = None
            self._check_sizes({k: v.nbytes if v.dtype == np.float32 else -1 for k, v in weights.items()},
                              _float32_sizes(self.manifest["params"]), "the weights given do")
            shapes = dict(self.manifest["params"])
            index, self._weights = self._index_of({name: w.reshape(shapes[name]) for name, w in weights.items()})

        self._device, self._context = self._load(vmfb, index)
        name = self.manifest["generate"]["module"] if generation else "gpt2"
        self.functions = getattr(self._context.modules, name)

    def _load(self, vmfb: Path, index) -> tuple:
        """(device, context): `vmfb` loaded on this Module's device, its
        initializer run, which reads the weights from `index`.

        A device lost while loading is replaced by a new one, once: nothing
        the user made is on it yet. IREE 3.13's Vulkan driver signals its
        timeline semaphores from several host threads; on Mesa's lavapipe,
        which takes a value out of order as a lost device, CI saw it once in
        a long run, while a module loaded (docs/ARCHITECTURE.md, Devices).
        """
        import iree.runtime as rt

        for attempt in (1, 2):
            config = rt.Config(device=open_device(self.device))
            try:
                compiled = rt.VmModule.mmap(config.vm_instance, str(vmfb))
            except ValueError as err:  # IREE's verifier: a truncated or corrupt module
                raise BuildError(f"{vmfb} is not a loadable IREE module ({first_line(err)}); "
                                 f"rebuild it with `{_doit(self.manifest, self.target)}`") from None
            self._check_source(compiled, vmfb)
            # SystemContext puts the Config's HAL module first, before the
            # parameters module that imports it.
            modules = [
                rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope=PARAMETER_SCOPE)),
                compiled,
            ]
            try:
                with reports_device_loss(self.device, f"loading {vmfb.name}"):
                    return config.device, rt.SystemContext(vm_modules=modules, config=config)
            except DeviceLostError as lost:
                if attempt == 2:
                    raise
                print(f"gpt2-iree: {lost}; loading it once more, on a new device", file=sys.stderr)

    @property
    def reads_packed_weights(self) -> bool:
        """Whether this module reads its constant weights packed (packed.py)."""
        return bool(self._constant and self._constant["packed"])

    def _check_source(self, compiled, vmfb: Path) -> None:
        """Refuse a module compiled from another export than the manifest's:
        doit compiles only the targets it is given, so a module of another
        target can outlive a new export beside it, and its calls would fail
        on their arguments, or compute what the code no longer does."""
        # A generation module, or a LoRA module on packed weights, is an export
        # of its own; a LoRA build's plain module is the manifest's.
        own = self._constant if self.generation or self.reads_packed_weights else self.manifest
        expected = own.get("source_digest")
        function = compiled.lookup_function("get_state")
        found = function.reflection.get(SOURCE_DIGEST_KEY) if function else None
        if expected and found != expected:  # builds exported before the digest have none
            raise BuildError(f"{vmfb} was compiled from another export than {self.build_dir}'s manifest; "
                             f"rebuild it with `{_doit(self.manifest, self.target)}`")

    def _vmfb(self, target: str) -> Path:
        return self.build_dir / vmfb_name(target, self.generation)

    def _load_params(self, path: Path, given: bool):
        """(index, None): one index over the float32 archive at `path` and, in a
        LoRA build, the frozen base's archive beside the module; refused if one
        does not fit it. The generation module reads its own float16 archive,
        or, `given` another (weights tuned elsewhere), that one's weights made
        float16 on the host as they are read, one at a time, as after
        fine-tuning: (index, the copy, `_index_of`)."""
        from gpt2_iree.archive import ArchiveArrays, load_index

        if not path.is_file():
            raise BuildError(f"parameter archive {path} does not exist")
        if self.generation and given:
            weights = ArchiveArrays(path, dict(self.manifest["params"]))
            self._check_sizes({key: length for key, (_, length) in weights.spans.items()},
                              _float32_sizes(self.manifest["params"]), f"{path} does")
            return self._index_of(weights)
        # (archive, its byte sizes, whether an entry writes its parameters):
        # the whole module's finetune and set_params write `params`.
        if self.generation:
            generate = self._constant
            archives = [(self.build_dir / generate["archive"],
                         _stored_sizes(generate, self.manifest["params"], lora_base=False), False)]
        else:
            archives = [(path, _float32_sizes(self.manifest["params"]), True)]
        if "base" in self.manifest:
            base = self._constant
            archives.append((self.build_dir / base["archive"], _stored_sizes(base, base["params"], lora_base=True),
                             False))
        for archive, expected, _ in archives:
            self._check_sizes({key: entry.length for key, entry in load_index(archive).items()}, expected,
                              f"{archive} does")
        return device_memory.index_of_archives([(archive, written) for archive, _, written in archives],
                                               self.device), None

    def _index_of(self, weights: Mapping[str, np.ndarray]):
        """An index of a page-aligned copy of float32 `weights`, shaped as the
        module holds them (for the generation module, converted to its format,
        float16 or int8, tensor by tensor as it is copied), and that copy."""
        if not self.generation:
            return device_memory.index_of_arrays(weights)
        weights_format, packed = self._constant["weights_dtype"], self._constant["packed"]
        return device_memory.index_of_weights(
            generate_weights.layout(dict(self.manifest["params"]), weights_format, packed),
            lambda name: generate_weights.entry(weights, name, weights_format, packed))

    def _check_sizes(self, sizes: dict[str, int], expected: dict[str, int], subject: str) -> None:
        """Refuse weights whose keys or byte sizes differ from the module's
        (`expected`), before IREE fails on them somewhere deep inside the first
        call; `subject` names them in the message ("x.irpa does")."""
        missing = sorted(set(expected) - set(sizes))
        extra = sorted(set(sizes) - set(expected))
        wrong = sorted(k for k in set(expected) & set(sizes) if sizes[k] != expected[k])
        if missing or extra or wrong:
            parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for label, keys in (("missing", missing), ("unexpected", extra), ("wrong size", wrong)) if keys]
            raise BuildError(f"{subject} not match the module in {self.build_dir} ({'; '.join(parts)})")

    # --- raw entry points, numpy in and out (see device_memory) ---

    def _args(self, *arrays) -> list:
        return [device_memory.to_device(self._device, a) for a in arrays]

    def _host(self, result) -> np.ndarray:
        return device_memory.to_numpy(self._device, result)

    @_on_device
    def prefill(self, chunk: np.ndarray, lengths: np.ndarray, starts: np.ndarray, sampling: tuple) -> np.ndarray:
        """Append chunk[b, :lengths[b]] to row b's cache at starts[b]; each row's
        next token (B,). `sampling`: temperature (B,), top_k (B,), top_p (B,)."""
        tokens = self.functions.prefill(*self._args(*_int32(chunk, lengths)), *self._positions(starts),
                                        *self._args(*_settings(sampling)))
        return self._host(tokens)[:, 0]

    @_on_device
    def decode(self, window: int, active: np.ndarray, positions: np.ndarray, sampling: tuple | None) -> np.ndarray:
        """One step of the active rows, each fed at its position (B,: its
        length), attending over the first `window` cache slots (one of the
        manifest's decode_windows); each row's token (B,). `sampling` None:
        greedy, on the entry without the sampler."""
        greedy = sampling is None
        decode = getattr(self.functions, decode_function(window, greedy))
        settings = () if greedy else _settings(sampling)
        return self._host(decode(*self._args(*_int32(active)), *self._positions(positions),
                                 *self._args(*settings)))[:, 0]

    def _positions(self, positions) -> list[int]:
        """Each row's position, as the module takes it: by value. One outside
        0..context is refused: the cache write would clamp it, and attention
        would look where nothing was written."""
        context = self.manifest["shapes"]["context"]
        values = [int(p) for p in positions]
        for p in values:
            if not 0 <= p <= context:
                raise ValueError(f"position {p} is out of range; valid: 0 to {context} (the context)")
        return values

    @_on_device
    def seed(self, seeds: np.ndarray, rows: np.ndarray) -> None:
        """Start each row whose `rows` flag is set: zero its K/V, which the module
        leaves uninitialised until then, and restart its generator at its seed."""
        self.functions.seed(*self._args(*_int32(seeds, rows)))

    @_on_device
    def finetune(self, text: np.ndarray, target: np.ndarray, lengths: np.ndarray, learning_rate: float) -> float:
        loss = self.functions.finetune(*self._args(text.astype(np.int32), target.astype(np.int32),
                                                   lengths.astype(np.int32), np.float32(learning_rate)))
        return float(self._host(loss))

    @_on_device
    def eval_loss(self, text: np.ndarray, target: np.ndarray, lengths: np.ndarray) -> float:
        """The loss of a batch on the current weights; nothing in the module changes."""
        loss = self.functions.eval_loss(*self._args(text.astype(np.int32), target.astype(np.int32),
                                                    lengths.astype(np.int32)))
        return float(self._host(loss))

    def archive_weights(self) -> dict[str, np.ndarray]:
        """The weights the module was opened with, float32 and shaped as the
        module holds them: what a reference runs on. Read from an archive, its
        float32 weights (for a generation module on the build's own archive,
        those its float16 archive was made from); otherwise the copy the
        module holds (for a generation module given weights or `params`, its
        float16 or int8 one, widened)."""
        from gpt2_iree.archive import read_irpa

        if self._weights is None:
            weights = read_irpa(self.params_path)  # fresh float32 arrays
        else:
            weights = generate_weights.widened(self._weights)
        return {name: weights[name].reshape(shape) for name, shape in self.manifest["params"]}

    def stored_base(self) -> dict[str, np.ndarray] | None:
        """A LoRA build's frozen weights as the archive this module reads stores
        them (float16, packed or not, or int8 and their scales:
        generate_weights.layout), shaped; None for a
        full build. `generate_weights.computed` of them is what the module adds
        the adapters to, `generate_weights.widened` the float32 weights."""
        from gpt2_iree.archive import read_irpa

        if "base" not in self.manifest:
            return None
        base = self._constant
        raw = read_irpa(self.build_dir / base["archive"], np.uint8)
        layout = generate_weights.layout(dict(base["params"]), base["weights_dtype"], base["packed"], lora_base=True)
        return {name: raw[name].view(dtype).reshape(shape) for name, (shape, dtype) in layout.items()}

    @_on_device
    def get_params(self) -> dict[str, np.ndarray]:
        values = self.functions.get_params()
        return {name: self._host(v) for (name, _), v in zip(self.manifest["params"], values, strict=True)}

    @_on_device
    def set_params(self, params: dict[str, np.ndarray]) -> None:
        self.functions.set_params(*self._args(*[np.asarray(params[name], np.float32)
                                                for name, _ in self.manifest["params"]]))

    @_on_device
    def get_opt_state(self) -> dict[str, np.ndarray]:
        """The optimizer's state by leaf name (manifest "opt_state"); empty for SGD."""
        values = self.functions.get_opt_state()
        values = values if isinstance(values, tuple) else () if values is None else (values,)
        return {name: self._host(v) for (name, _, _), v in zip(self.manifest["opt_state"], values, strict=True)}

    @_on_device
    def set_opt_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the optimizer's state with `state` (as `get_opt_state` returns it)."""
        self.functions.set_opt_state(*self._args(*[np.asarray(state[name], dtype).reshape(shape)
                                                   for name, shape, dtype in self.manifest["opt_state"]]))

    @_on_device
    def get_state(self) -> dict[str, np.ndarray]:
        values = self.functions.get_state()
        return {name: self._host(v) for name, v in zip(self.manifest["state"], values, strict=True)}


def _float32_sizes(params: list) -> dict[str, int]:
    """name -> bytes of each [name, shape] of a manifest's float32 weights."""
    return device_memory.byte_sizes({name: (shape, np.float32) for name, shape in params})


def _stored_sizes(stored: dict, params: list, lora_base: bool) -> dict[str, int]:
    """name -> bytes of each entry of the archive a manifest's `stored` entry
    (its "generate" as a target reads it, or with `lora_base` "base") names:
    `params` ([name, shape] of the float32 weights) in its weights_dtype (and layout)."""
    return device_memory.byte_sizes(generate_weights.layout(dict(params), stored["weights_dtype"],
                                                            stored.get("packed", False), lora_base))


def _int32(*arrays) -> list[np.ndarray]:
    return [np.asarray(a, np.int32) for a in arrays]


def _settings(sampling: tuple) -> list[np.ndarray]:
    temperature, top_k, top_p = sampling
    return [np.asarray(temperature, np.float32), np.asarray(top_k, np.int32), np.asarray(top_p, np.float32)]


def has_generation_module(build_dir: Path, manifest: dict, target: str) -> bool:
    """Whether the build has a generation module for `target`."""
    return "generate" in manifest and (Path(build_dir) / vmfb_name(target, generation=True)).is_file()


