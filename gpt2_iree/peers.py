"""PyTorch beside us: the build's fine-tuning step in transformers' GPT-2, in a process of its own.

`gpt2-iree bench --peers` runs this. The peer takes the build's shape (the
model's config, batch, seq_len), its optimizer (transformers' Adafactor with
optax's defaults, torch's AdamW or SGD) and its tuning: full fine-tuning, or
PEFT's LoRA with the build's rank, alpha and targets. Its weights are
random, as a `weights=random` build's; dropout is off, as in our model. A
fresh Python (`python -m gpt2_iree.peers BUILD_DIR REPEATS`) does nothing
else, so its peak resident set is the step's, the framework included, as
peak_memory.py measures ours.

PyTorch, transformers and peft are an optional extra (`pip install -e
'.[peers]'`), never needed otherwise.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from gpt2_iree.errors import Gpt2IreeError

WARMUP = 1


def available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) for name in ("torch", "transformers", "peft"))


def _model(manifest: dict):
    """transformers' GPT-2 of the build's shape; with PEFT's LoRA for a LoRA build."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2_iree import lora

    c = manifest["config"]
    net = GPT2LMHeadModel(GPT2Config(n_layer=c["n_layer"], n_embd=c["n_embd"], n_head=c["n_head"],
                                     n_positions=c["n_positions"], vocab_size=c["vocab_size"],
                                     layer_norm_epsilon=c["layer_norm_epsilon"],
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    tuning = lora.from_manifest(manifest)
    if tuning:
        from peft import LoraConfig, get_peft_model

        net = get_peft_model(net, LoraConfig(r=tuning.rank, lora_alpha=tuning.alpha, lora_dropout=0.0,
                                             target_modules=lora.hf_modules(tuning), fan_in_fan_out=True))
    return net


def _optimizer(name: str, parameters):
    import torch

    if name == "adafactor":
        from transformers.optimization import Adafactor

        # optax.adafactor's defaults: relative steps off, the rate given, parameter scaling on.
        return Adafactor(parameters, lr=1e-4, relative_step=False, scale_parameter=True, warmup_init=False)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=1e-4)
    return torch.optim.SGD(parameters, lr=1e-4)


def _run(build_dir: Path, repeats: int) -> dict:
    import numpy as np
    import torch

    from gpt2_iree.module import read_manifest
    from gpt2_iree.peak_memory import own_peak_mb

    manifest = read_manifest(build_dir)
    shapes = manifest["shapes"]
    B, S = shapes["batch"], shapes["seq_len"]
    torch.manual_seed(0)
    net = _model(manifest)
    net.train()
    optimizer = _optimizer(manifest["optimizer"], [p for p in net.parameters() if p.requires_grad])
    text = torch.from_numpy(np.random.default_rng(0).integers(0, manifest["config"]["vocab_size"], (B, S)))

    def step() -> float:
        start = time.perf_counter()
        loss = net(input_ids=text, labels=text).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    for _ in range(WARMUP):
        step()
    seconds = statistics.median(step() for _ in range(repeats))
    return {"engine": f"PyTorch {torch.__version__}" + (" + PEFT LoRA" if "base" in manifest else ""),
            "finetune_s_per_step": seconds, "peak_rss_mb": own_peak_mb(), "threads": torch.get_num_threads()}


def measure(build_dir: Path, repeats: int) -> dict:
    """The peer's fine-tuning step on `build_dir`'s shape, in a fresh process:
    {"engine", "finetune_s_per_step", "peak_rss_mb", "threads"}."""
    if not available():
        raise Gpt2IreeError("bench --peers needs PyTorch, transformers and peft: pip install -e '.[peers]'")
    child = subprocess.run([sys.executable, "-m", "gpt2_iree.peers", str(build_dir), str(repeats)],
                           capture_output=True, text=True)
    if child.returncode != 0:
        raise Gpt2IreeError(f"the PyTorch peer failed on {build_dir}:\n{child.stderr.strip()[-2000:]}")
    return json.loads(child.stdout.splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_run(Path(sys.argv[1]), int(sys.argv[2]))))
