"""The models a build can name: Hugging Face GPT-2 checkpoints, `tiny`, or a local directory.

Hub models are pinned to a commit so that a build made today downloads the
same bytes next year; their shapes are known here too, so `weights=random`
builds the full shape without any download.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

# The files a model directory holds, in Hugging Face layout.
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


@dataclasses.dataclass(frozen=True)
class HubModel:
    repo_id: str
    revision: str
    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int = 1024
    vocab_size: int = 50257

    def shape(self) -> dict:
        return {k: getattr(self, k) for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")}


HUB_MODELS = {
    "gpt2": HubModel("openai-community/gpt2", "607a30d783dfa663caf39e06633721c8d4cfcd7e", 12, 768, 12),
    "gpt2-medium": HubModel("openai-community/gpt2-medium", "6dcaa7a952f72f9298047fd5137cd6e4f05f41da", 24, 1024, 16),
    "gpt2-large": HubModel("openai-community/gpt2-large", "32b71b12589c2f8d625668d2335a01cac3249519", 36, 1280, 20),
    "gpt2-xl": HubModel("openai-community/gpt2-xl", "15ea56dee5df4983c59b2538573817e1667135e2", 48, 1600, 25),
    "distilgpt2": HubModel("distilbert/distilgpt2", "2290a62682d06624634c1f46a6ad5be0f47f38aa", 6, 768, 12),
}

TINY = "tiny"
# Two layers, width 64, a byte-level vocabulary: the whole graph in seconds.
TINY_SHAPE = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128, "vocab_size": 257}

# What the tiny model's lock records as its source: a new shape regenerates it.
TINY_SOURCE = f"generated: tiny {TINY_SHAPE}"

MODEL_NAMES = (*HUB_MODELS, TINY)


def check_model_dir(path: Path) -> None:
    """A local model directory must hold the Hugging Face files we read."""
    if not path.is_dir():
        raise ValueError(f"model={path}: not one of {', '.join(MODEL_NAMES)} and not a directory")
    missing = [f for f in MODEL_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"model={path}: the directory lacks {', '.join(missing)} "
                         f"(a GPT-2 model in Hugging Face layout needs {', '.join(MODEL_FILES)})")


def write_tiny_model(out_dir: Path, seed: int = 0) -> None:
    """Generate the `tiny` model's files: config, seeded weights, byte tokenizer."""
    from gpt2_iree import model, weights
    from gpt2_iree.tokenizer import write_byte_tokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = out_dir / "tokenizer.json"
    write_byte_tokenizer(tokenizer)
    cfg = model.GPT2Config(**TINY_SHAPE)
    weights.save_hf_model(model.init_params(cfg, seed), cfg, out_dir, tokenizer)


def fetch_hub_model(name: str, dest_dir: Path, endpoint: str | None = None) -> None:
    """Download a Hub model's files at its pinned revision into `dest_dir`."""
    from gpt2_iree.download import fetch_repo_files

    hub = HUB_MODELS[name]
    fetch_repo_files(hub.repo_id, hub.revision, list(MODEL_FILES), Path(dest_dir), endpoint)


def make_tiny_assets(dest_dir: Path, lock_path: Path) -> None:
    from gpt2_iree.download import lock_local_files

    write_tiny_model(Path(dest_dir))
    lock_local_files(dest_dir, list(MODEL_FILES), lock_path, source=TINY_SOURCE)


def lock_model_dir(model_dir: Path, lock_path: Path) -> None:
    from gpt2_iree.download import lock_local_files

    check_model_dir(Path(model_dir))
    lock_local_files(model_dir, list(MODEL_FILES), lock_path, source=str(model_dir))
