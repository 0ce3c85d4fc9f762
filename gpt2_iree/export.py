"""GPT-2 as one stateful IREE module: the entry points and the files they make.

The module `@gpt2` exports
  encode(prompt[B,K] i32, lengths[B] i32) -> next token[B,1]   fills the KV cache
  decode() -> next token[B,1]                                    extends it one step
  finetune(text[B,S], target[B,S], lengths[B], learning_rate) -> loss
  get_params() -> every weight;  set_params(every weight)
  get_state() -> the last step's logits and the KV cache (for verification)
and keeps the weights, KV cache and optimizer state in globals between calls.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_iree import model, stateful
from gpt2_iree.archive import write_irpa
from gpt2_iree.files import replace_atomically, sha256_file, write_json, write_text

MODULE_NAME = "gpt2"
FUNCTIONS = ("encode", "decode", "finetune", "get_params", "set_params", "get_state")


def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def entries(cfg: model.GPT2Config, shapes: model.Shapes, optimizer: str, params) -> list[stateful.Entry]:
    B, K, S = shapes.batch, shapes.prompt_len, shapes.seq_len
    param_avals = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in params.items()}

    def encode(params, prompt, lengths):
        cache, token = model.encode(params, cfg, shapes, prompt, lengths)
        return (cache,), token[:, None]

    def decode(params, cache):
        cache, token = model.decode(params, cfg, shapes, cache)
        return (cache,), token[:, None]

    def finetune(params, opt_state, text, target, lengths, learning_rate):
        params, opt_state, loss = model.train_step(
            params, opt_state, cfg, model.make_optimizer(optimizer, for_iree=True), text, target, lengths,
            learning_rate)
        return (params, opt_state), loss

    return [
        stateful.Entry("encode", encode, (_i32(B, K), _i32(B)), reads=("params",), writes=("cache",)),
        stateful.Entry("decode", decode, reads=("params", "cache"), writes=("cache",)),
        stateful.Entry("finetune", finetune,
                       (_i32(B, S), _i32(B, S), _i32(B), jax.ShapeDtypeStruct((), jnp.float32)),
                       reads=("params", "opt"), writes=("params", "opt")),
        stateful.Entry("get_params", lambda params: ((), params), reads=("params",)),
        stateful.Entry("set_params", lambda new: ((new,), ()), (param_avals,), writes=("params",)),
        stateful.Entry("get_state", lambda cache: ((), cache), reads=("cache",)),
    ]


def initial_state(cfg: model.GPT2Config, shapes: model.Shapes, optimizer: str, params) -> dict:
    return {
        "params": params,
        "cache": model.empty_cache(cfg, shapes),
        "opt": model.make_optimizer(optimizer).init(params),
    }


def export_mlir(cfg: model.GPT2Config, shapes: model.Shapes, optimizer: str, params) -> str:
    """The module's MLIR text. Only the shapes of `params` matter here."""
    state = initial_state(cfg, shapes, optimizer, params)
    return stateful.build_module(MODULE_NAME, state, "params", entries(cfg, shapes, optimizer, params))


def load_model(model_dir: Path | None, weights: str, shape: dict | None = None):
    """(config, params) from a Hugging Face directory, or seeded random weights.

    `weights="random"` takes the shape from `model_dir`'s config.json if given,
    else from `shape` (a Hub model's known shape, so nothing is downloaded).
    """
    from gpt2_iree import weights as hf

    cfg = hf.load_hf_config(model_dir) if model_dir else model.GPT2Config(**shape)
    if weights == "random":
        return cfg, {k: np.asarray(v) for k, v in model.init_params(cfg).items()}
    return cfg, hf.load_hf_params(model_dir, cfg)


def export_build(out_dir: Path, name: str, cfg: model.GPT2Config, params: dict, shapes: model.Shapes,
                 optimizer: str, weights: str, tokenizer: Path | None) -> None:
    """Write gpt2.mlir, gpt2.irpa, tokenizer.json and manifest.json into `out_dir`.

    The manifest is what the runtime reads to open the build, and what later
    stages depend on instead of hashing the (large) archive again.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "gpt2.mlir", export_mlir(cfg, shapes, optimizer, params))
    write_irpa(params, out_dir / "gpt2.irpa")
    if tokenizer:
        replace_atomically(out_dir / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer, tmp))
    write_json(out_dir / "manifest.json", {
        "model": name,
        "config": dataclasses.asdict(cfg),
        "shapes": dataclasses.asdict(shapes),
        "optimizer": optimizer,
        "weights": weights,
        "functions": list(FUNCTIONS),
        # get_params/set_params order: JAX flattens a dict in sorted key order.
        "params": [[k, list(params[k].shape)] for k in sorted(params)],
        "state": sorted(model.empty_cache(cfg, shapes)),
        "irpa_sha256": sha256_file(out_dir / "gpt2.irpa"),
        "tokenizer": "tokenizer.json" if tokenizer else None,
    })


def build(out_dir: Path, name: str, model_dir: Path | None, weights: str, shape: dict | None,
          shapes: dict, optimizer: str) -> None:
    """The export stage: load the model and write the build directory's inputs."""
    cfg, params = load_model(model_dir, weights, shape)
    if shapes["seq_len"] > cfg.n_positions:
        raise ValueError(f"seq_len={shapes['seq_len']} exceeds the model's {cfg.n_positions} positions")
    tokenizer = Path(model_dir) / "tokenizer.json" if model_dir else None
    export_build(Path(out_dir), name, cfg, params, model.Shapes(**shapes), optimizer, weights, tokenizer)
