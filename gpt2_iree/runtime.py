"""Open a build directory with `iree.runtime` and call the compiled GPT-2.

A build directory (made by `doit`) holds `manifest.json`, `gpt2.irpa`,
`tokenizer.json` and one `gpt2-<target>.vmfb` per target. The weights are
loaded from the archive as a parameter provider, so a fine-tuned `.irpa` can
stand in for the original without recompiling.
"""

from __future__ import annotations

import ctypes
import json
import platform
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from gpt2_iree.archive import PARAMETER_SCOPE
from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.targets import vmfb_name

# iree.runtime driver -> the target whose vmfb it executes.
DRIVER_TARGETS = {"metal": "metal", "local-task": "cpu", "local-sync": "cpu", "vulkan": "vulkan", "cuda": "cuda"}
# What `doit` builds with no vars (tests/test_runtime.py keeps the two in step).
DEFAULT_BUILD_DIR = Path("build/gpt2/pretrained-b1-k8-s64-adafactor")
# Preferred first when no device is named: the GPU this product is for, then the CPU.
DEVICE_PREFERENCE = ("metal", "cuda", "vulkan", "local-task")


# mallopt(3) parameters of glibc's malloc.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


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


class Module:
    """A compiled module of a build on one device, its weights read from a
    parameter archive or, given as `weights`, from arrays in memory.

    `generation` opens the build's generation module (encode, decode and
    get_state on float16 weights, see export.py) instead of the whole module.
    """

    def __init__(self, build_dir: Path, device: str | None = None, params: Path | None = None,
                 generation: bool = False, weights: dict[str, np.ndarray] | None = None):
        import iree.runtime as rt

        self.build_dir = Path(build_dir)
        self.manifest = read_manifest(self.build_dir)
        self.generation = generation
        if generation and "generate" not in self.manifest:
            raise BuildError(f"{self.build_dir} predates the generation module; rebuild it with `doit`")
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
        if device.startswith("local"):
            reuse_freed_memory()
        if weights is None:
            self.params_path, self._weights = Path(params) if params else self.build_dir / "gpt2.irpa", None
            index = self._load_params(self.params_path)
        else:
            # The index refers to the arrays' memory: they must outlive the module.
            self.params_path, self._weights = None, {k: np.ascontiguousarray(v) for k, v in weights.items()}
            index = self._index_of(self._weights)

        config = rt.Config(device)
        self._modules = [
            rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope=PARAMETER_SCOPE)),
            rt.create_hal_module(config.vm_instance, config.device),
            rt.VmModule.mmap(config.vm_instance, str(vmfb)),
        ]
        self._context = rt.SystemContext(vm_modules=self._modules, config=config)
        name = self.manifest["generate"]["module"] if generation else "gpt2"
        self.functions = getattr(self._context.modules, name)

    def _vmfb(self, device: str) -> Path:
        return self.build_dir / vmfb_name(DRIVER_TARGETS[device], self.generation)

    def _load_params(self, path: Path):
        """The archive's index, refused if it does not fit the module."""
        import iree.runtime as rt

        if not path.is_file():
            raise BuildError(f"parameter archive {path} does not exist")
        index = rt.ParameterIndex()
        try:
            index.load(str(path))
        except (RuntimeError, ValueError) as err:
            raise BuildError(f"{path} is not an IREE parameter archive: {err}") from None
        self._check_sizes({key: entry.length for key, entry in index.items()}, f"{path} does")
        return index

    def _index_of(self, weights: dict[str, np.ndarray]):
        """An index of float32 `weights` in memory, refused if they do not fit the module."""
        import iree.runtime as rt

        self._check_sizes({k: v.nbytes if v.dtype == np.float32 else -1 for k, v in weights.items()},
                          "the weights given do")
        index = rt.ParameterIndex()
        for name, value in weights.items():
            index.add_buffer(name, value)
        return index

    def _check_sizes(self, sizes: dict[str, int], subject: str) -> None:
        """Refuse weights whose keys or byte sizes differ from the module's here,
        before IREE fails on them somewhere deep inside the first call;
        `subject` names them in the message ("x.irpa does")."""
        expected = {name: 4 * int(np.prod(shape)) for name, shape in self.manifest["params"]}
        missing = sorted(set(expected) - set(sizes))
        extra = sorted(set(sizes) - set(expected))
        wrong = sorted(k for k in set(expected) & set(sizes) if sizes[k] != expected[k])
        if missing or extra or wrong:
            parts = [f"{label}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                     for label, keys in (("missing", missing), ("unexpected", extra), ("wrong size", wrong)) if keys]
            raise BuildError(f"{subject} not match the module in {self.build_dir} ({'; '.join(parts)})")

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

    def archive_weights(self) -> dict[str, np.ndarray]:
        """The weights the module was opened with (its archive's, or those given),
        float32 and shaped as the module holds them: what a reference runs on."""
        from gpt2_iree.archive import read_irpa

        if self._weights is None:
            weights = read_irpa(self.params_path)  # fresh float32 arrays
        else:
            weights = {name: value.copy() for name, value in self._weights.items()}  # float32, checked at open
        return {name: weights[name].reshape(shape) for name, shape in self.manifest["params"]}

    def get_params(self) -> dict[str, np.ndarray]:
        values = self.functions.get_params()
        return {name: _host(v) for (name, _), v in zip(self.manifest["params"], values, strict=True)}

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        self.functions.set_params(*[np.asarray(params[name], np.float32) for name, _ in self.manifest["params"]])

    def get_state(self) -> dict[str, np.ndarray]:
        values = self.functions.get_state()
        return {name: _host(v) for name, v in zip(self.manifest["state"], values, strict=True)}


def has_generation_module(module: Module) -> bool:
    """Whether `module`'s build has a generation module for its device."""
    vmfb = module.build_dir / vmfb_name(DRIVER_TARGETS[module.device], generation=True)
    return "generate" in module.manifest and vmfb.is_file()


def _host(value) -> np.ndarray:
    return np.array(value.to_host(), copy=True)


class Session:
    """Generate and fine-tune with text, through the compiled modules.

    The module keeps its weights between calls: after `finetune`, `generate`
    uses the fine-tuned weights, and `save_params` writes them to a `.irpa`
    that `Session(build_dir, params=...)` opens later in place of the original.
    `generate` runs on the generation module where the build has one for the
    device (float16 weights, twice as fast), opened on the current weights when
    first needed; else on the whole module.
    """

    def __init__(self, build_dir: Path = DEFAULT_BUILD_DIR, device: str | None = None, params: Path | None = None):
        from gpt2_iree.tokenizer import Tokenizer

        self.module = Module(build_dir, device, params)
        self._generator: Module | None = None  # the generation module, once opened
        self._tuned = False  # whether the weights have changed since the archive
        manifest = self.module.manifest
        shapes = manifest["shapes"]
        self.batch, self.prompt_len, self.seq_len = shapes["batch"], shapes["prompt_len"], shapes["seq_len"]
        if manifest["tokenizer"] is None:
            raise BuildError(f"{build_dir} has no tokenizer (weights=random of a Hub model downloads "
                             f"nothing); build with weights=pretrained to use text")
        self.tokenizer = Tokenizer(self.module.build_dir / manifest["tokenizer"])

    def encode_prompt(self, prompt: str) -> list[int]:
        """Token ids of a prompt, refused before any work if the module can't take it."""
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty; give at least one token of text")
        if len(ids) > self.prompt_len:
            raise ValueError(f"the prompt is {len(ids)} tokens; this module takes at most {self.prompt_len} "
                             f"(rebuild with `doit prompt_len={len(ids)}` for longer prompts)")
        return ids

    def generate(self, prompt: str, max_new_tokens: int = 32) -> Iterator[str]:
        """Yield the completion of `prompt` piece by piece as tokens come (greedy).

        Stops after `max_new_tokens`, at end-of-text, or when the KV cache is
        full (`seq_len` positions: the prompt and what was generated).
        """
        ids = self.encode_prompt(prompt)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}; give at least 1")
        prompt_ids = np.zeros((self.batch, self.prompt_len), np.int32)
        prompt_ids[:, : len(ids)] = ids  # every row the same prompt; row 0 is returned
        lengths = np.full((self.batch,), len(ids), np.int32)
        # encode predicts the token at position len(ids); each decode writes one
        # cache slot, the last at seq_len - 1.
        limit = min(max_new_tokens, self.seq_len - len(ids) + 1)
        new: list[int] = []
        text = ""
        generator = self.generation_module()
        token = int(generator.encode(prompt_ids, lengths)[0, 0])
        while True:
            if token == self.tokenizer.eot_id:
                return
            new.append(token)
            # Decode everything so far and yield what is new: a multi-byte
            # character can span tokens, and only the whole sequence decodes right.
            decoded = self.tokenizer.decode(new)
            if not decoded.endswith("\ufffd"):
                yield decoded[len(text):]
                text = decoded
            if len(new) >= limit:
                return
            token = int(generator.decode()[0, 0])

    def generation_module(self) -> Module:
        """The module `generate` runs on: the generation module on the current
        weights where the build has one for this device, else the whole module."""
        module = self.module
        if self._generator is None and has_generation_module(module):
            self._generator = Module(module.build_dir, module.device, module.params_path, generation=True,
                                     weights=module.get_params() if self._tuned else None)
        return self._generator or module

    def encode_texts(self, texts: list[str]) -> list[list[int]]:
        """Token ids of fine-tuning texts, each ending in end-of-text so the
        model also learns where a text stops. A text longer than the module's
        `seq_len` is refused, not cut: silently losing its end would train on
        something other than what was given."""
        if not texts:
            raise ValueError("no text to fine-tune on")
        encoded = []
        for i, text in enumerate(texts, 1):
            if not text.strip():
                raise ValueError(f"text {i} is empty")
            ids = self.tokenizer.encode(text) + [self.tokenizer.eot_id]
            if len(ids) - 1 > self.seq_len:
                raise ValueError(f"text {i} is {len(ids) - 1} tokens with end-of-text; this module fine-tunes on "
                                 f"at most {self.seq_len + 1} (seq_len={self.seq_len}). Split it, or rebuild "
                                 f"with `doit seq_len=...`")
            encoded.append(ids)
        return encoded

    def finetune(self, texts: list[str], steps: int = 30, learning_rate: float = 1e-3,
                 on_step: Callable[[int, float], None] | None = None) -> list[float]:
        """`steps` optimizer steps over `texts` (cycled into batches); the loss of each step."""
        if steps < 1:
            raise ValueError(f"steps={steps}; give at least 1")
        if not learning_rate > 0:
            raise ValueError(f"learning rate {learning_rate} must be positive")
        encoded = self.encode_texts(texts)
        losses = []
        for step in range(steps):
            rows = [encoded[(step * self.batch + r) % len(encoded)] for r in range(self.batch)]
            text = np.zeros((self.batch, self.seq_len), np.int32)
            target = np.zeros((self.batch, self.seq_len), np.int32)
            lengths = np.array([len(ids) - 1 for ids in rows], np.int32)
            for r, ids in enumerate(rows):
                text[r, : len(ids) - 1] = ids[:-1]
                target[r, : len(ids) - 1] = ids[1:]
            losses.append(self.module.finetune(text, target, lengths, learning_rate))
            self._generator, self._tuned = None, True  # its weights are the old ones now
            if on_step:
                on_step(step, losses[-1])
        return losses

    def save_params(self, path: Path) -> None:
        """Write the module's current weights as a `.irpa` (atomically)."""
        from gpt2_iree.archive import write_irpa

        write_irpa(self.module.get_params(), Path(path))

    def export_hf(self, out_dir: Path) -> None:
        """Write the current weights as a Hugging Face GPT-2 directory."""
        from gpt2_iree import model, weights

        cfg = model.GPT2Config(**self.module.manifest["config"])
        weights.save_hf_model(self.module.get_params(), cfg, Path(out_dir),
                              self.module.build_dir / self.module.manifest["tokenizer"])
