"""LoRA: low-rank adapters trained on a frozen base, laid out as Hugging Face PEFT's.

An adapted weight W (out, in) computes with W + (alpha / rank) * B @ A, where
A is (rank, in) and B is (out, rank): PEFT's `lora_A.weight` and
`lora_B.weight` of the same layer, with our output-major W being PEFT's
Conv1D weight transposed (`fan_in_fan_out`). As PEFT does, A starts uniform
in +-1/sqrt(in) and B at zero, so a fresh adapter changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from gpt2_iree.model import LORA_A, LORA_B, GPT2Config, param_shapes

# lora_targets= names -> the weights of each block they adapt.
TARGETS = {"attn": ("attn.qkv_w", "attn.out_w"), "mlp": ("mlp.in_w", "mlp.out_w")}
# What save_peft writes.
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Each adapted weight's module in transformers' GPT2LMHeadModel.
_HF_MODULES = {"attn.qkv_w": "attn.c_attn", "attn.out_w": "attn.c_proj",
               "mlp.in_w": "mlp.c_fc", "mlp.out_w": "mlp.c_proj"}


@dataclasses.dataclass(frozen=True)
class Lora:
    rank: int
    alpha: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def weights(self, cfg: GPT2Config) -> list[str]:
        """The adapted weights' names, block by block."""
        return [f"h.{i}.{w}" for i in range(cfg.n_layer) for t in self.targets for w in TARGETS[t]]

    def as_manifest(self) -> dict:
        return {"mode": "lora", "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def from_manifest(manifest: dict) -> Lora | None:
    """The build's LoRA, or None for a build that tunes every weight."""
    tuning = manifest.get("tuning", {"mode": "full"})
    if tuning["mode"] != "lora":
        return None
    return Lora(tuning["rank"], tuning["alpha"], tuple(tuning["targets"]))


def adapter_shapes(cfg: GPT2Config, lora: Lora) -> dict[str, tuple[int, int]]:
    """Every adapter matrix's name and shape: what the module trains."""
    shapes = param_shapes(cfg)
    out = {}
    for name in lora.weights(cfg):
        rows, cols = shapes[name]
        out |= {name + LORA_A: (lora.rank, cols), name + LORA_B: (rows, lora.rank)}
    return out


def init_adapters(cfg: GPT2Config, lora: Lora, seed: int = 0) -> dict[str, np.ndarray]:
    """Fresh adapters: A uniform in +-1/sqrt(in) (PEFT's kaiming-uniform), B zero."""
    rng = np.random.default_rng(seed)
    adapters = {}
    for name, shape in adapter_shapes(cfg, lora).items():
        if name.endswith(LORA_A):
            bound = 1 / math.sqrt(shape[1])
            adapters[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
        else:
            adapters[name] = np.zeros(shape, np.float32)
    return adapters


def network(base: dict, adapters: dict, lora: Lora) -> dict:
    """What model.py computes with: the base and the adapters, B scaled (see model.LORA_A)."""
    return base | {name: value * lora.scale if name.endswith(LORA_B) else value for name, value in adapters.items()}


def computed_weights(trained: dict, base: dict, lora: Lora | None) -> dict:
    """What model.py computes with, given what a build trains: its weights,
    or a LoRA build's adapters on its base."""
    return network(base, trained, lora) if lora else trained


def merged(base: dict, adapters: dict, lora: Lora) -> dict[str, np.ndarray]:
    """Full float32 weights: each adapted W + scale * B @ A (what --export-hf writes)."""
    out = {name: np.asarray(value, np.float32) for name, value in base.items()}
    for name in {key[:-len(LORA_A)] for key in adapters if key.endswith(LORA_A)}:
        delta = np.asarray(adapters[name + LORA_B], np.float64) @ np.asarray(adapters[name + LORA_A], np.float64)
        out[name] = (out[name] + lora.scale * delta).astype(np.float32)
    return out


def hf_modules(lora: Lora) -> list[str]:
    """The adapted modules' names, as PEFT's `target_modules` of transformers' GPT-2.
    Exact names: PEFT matches a name by its end, and "c_proj" alone would take
    the MLP's output projection along with the attention's."""
    return sorted({_HF_MODULES[w] for t in lora.targets for w in TARGETS[t]})


def save_peft(adapters: dict, cfg: GPT2Config, lora: Lora, out_dir: Path) -> None:
    """Write PEFT's adapter directory (adapter_config.json, adapter_model.safetensors),
    which `peft.PeftModel.from_pretrained` loads onto transformers' GPT-2."""
    from safetensors.numpy import save_file

    from gpt2_iree.files import replace_atomically, write_json

    tensors = {}
    for name in lora.weights(cfg):
        block, weight = name.split(".", 2)[1], name.split(".", 2)[2]
        prefix = f"base_model.model.transformer.h.{block}.{_HF_MODULES[weight]}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(adapters[name + LORA_A], np.float32)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(adapters[name + LORA_B], np.float32)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    replace_atomically(out_dir / "adapter_model.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    write_json(out_dir / "adapter_config.json", {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": hf_modules(lora),
        "fan_in_fan_out": True,  # transformers' GPT-2 stores its projections as Conv1D (in, out)
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    })
