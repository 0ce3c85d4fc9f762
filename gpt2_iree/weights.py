"""Convert between Hugging Face GPT-2 checkpoints and our parameter layout.

A Hugging Face GPT-2 directory holds `config.json` and `model.safetensors`.
Its matmul weights are `Conv1D`s stored (in, out), so `y = x @ W + b`; ours are
output-major (the contraction dim last, see model.py), so every matmul weight
is transposed on the way in and back on the way out. `c_attn` packs q, k and v
side by side along its output: [q | k | v], each head-major (H, Q).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from gpt2_iree.files import replace_atomically
from gpt2_iree.model import GPT2Config, param_shapes

# Keys a checkpoint may carry that are not weights of ours: the tied LM head
# (it is `wte`) and the causal-mask buffers older `transformers` saved.
_IGNORED = re.compile(r"lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias)")
_PREFIX = "transformer."  # put on every key by current `transformers`


# --- config -----------------------------------------------------------------


def config_from_hf(config: dict) -> GPT2Config:
    """Our config from a parsed config.json; ValueError if we cannot run that model."""
    required = ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size")
    missing = [k for k in required if k not in config]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    bad = [f"{k}={config[k]!r}" for k in required
           if not isinstance(config[k], int) or isinstance(config[k], bool) or config[k] <= 0]
    if bad:
        raise ValueError(f"config.json: {', '.join(bad)} (must be positive integers)")
    # Settings that change the math; model.py implements only GPT-2's own.
    expected = {"model_type": "gpt2", "activation_function": "gelu_new",
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False}
    for key, want in expected.items():
        if config.get(key, want) != want:
            raise ValueError(f"config.json: {key}={config[key]!r} is not supported (need {want!r})")
    if config.get("n_inner") not in (None, 4 * config["n_embd"]):
        raise ValueError(f"config.json: n_inner={config['n_inner']!r} is not supported "
                         f"(need null or 4 * n_embd)")
    if config["n_embd"] % config["n_head"]:
        raise ValueError(f"config.json: n_embd={config['n_embd']} is not divisible by "
                         f"n_head={config['n_head']}")
    return GPT2Config(n_layer=config["n_layer"], n_embd=config["n_embd"], n_head=config["n_head"],
                      n_positions=config["n_positions"], vocab_size=config["vocab_size"],
                      layer_norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)))


def load_hf_config(model_dir: Path) -> GPT2Config:
    return config_from_hf(json.loads((Path(model_dir) / "config.json").read_text()))


def config_to_hf(cfg: GPT2Config) -> dict:
    """A config.json that `transformers.GPT2LMHeadModel` loads as this model."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "n_layer": cfg.n_layer,
        "n_embd": cfg.n_embd,
        "n_head": cfg.n_head,
        "n_positions": cfg.n_positions,
        "n_ctx": cfg.n_positions,
        "vocab_size": cfg.vocab_size,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "activation_function": "gelu_new",
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
    }


# --- weights ----------------------------------------------------------------


def _conversions(cfg: GPT2Config) -> dict:
    """Our name -> (HF name, HF shape, HF-to-ours, ours-to-HF)."""
    E, F, V = cfg.n_embd, 4 * cfg.n_embd, cfg.vocab_size
    same = lambda w: w  # noqa: E731
    t = lambda w: w.T  # noqa: E731  Conv1D (in, out) <-> our (out, in)
    pad_rows = ((0, cfg.padded_vocab - V), (0, 0))
    conv = {
        "wte": ("wte.weight", (V, E), lambda w: np.pad(w, pad_rows), lambda w: w[:V]),
        "wpe": ("wpe.weight", (cfg.n_positions, E), same, same),
        "ln_f.scale": ("ln_f.weight", (E,), same, same),
        "ln_f.bias": ("ln_f.bias", (E,), same, same),
    }
    for i in range(cfg.n_layer):
        h = f"h.{i}."
        conv |= {
            h + "ln_1.scale": (h + "ln_1.weight", (E,), same, same),
            h + "ln_1.bias": (h + "ln_1.bias", (E,), same, same),
            h + "attn.qkv_w": (h + "attn.c_attn.weight", (E, 3 * E), t, t),
            h + "attn.qkv_b": (h + "attn.c_attn.bias", (3 * E,), same, same),
            h + "attn.out_w": (h + "attn.c_proj.weight", (E, E), t, t),
            h + "attn.out_b": (h + "attn.c_proj.bias", (E,), same, same),
            h + "ln_2.scale": (h + "ln_2.weight", (E,), same, same),
            h + "ln_2.bias": (h + "ln_2.bias", (E,), same, same),
            h + "mlp.in_w": (h + "mlp.c_fc.weight", (E, F), t, t),
            h + "mlp.in_b": (h + "mlp.c_fc.bias", (F,), same, same),
            h + "mlp.out_w": (h + "mlp.c_proj.weight", (F, E), t, t),
            h + "mlp.out_b": (h + "mlp.c_proj.bias", (E,), same, same),
        }
    return conv


def params_from_hf(tensors: dict[str, np.ndarray], cfg: GPT2Config) -> dict[str, np.ndarray]:
    """Our float32 params from a checkpoint's tensors (keys with or without `transformer.`)."""
    tensors = {k.removeprefix(_PREFIX): v for k, v in tensors.items()}
    conv = _conversions(cfg)
    wanted = {hf_name for hf_name, *_ in conv.values()}
    missing = sorted(wanted - tensors.keys())
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors: {', '.join(missing[:8])}"
                         + (", ..." if len(missing) > 8 else ""))
    extra = sorted(k for k in tensors.keys() - wanted if not _IGNORED.fullmatch(k))
    if extra:
        raise ValueError(f"checkpoint has tensors this config does not expect "
                         f"(n_layer={cfg.n_layer}?): {', '.join(extra[:8])}")
    params = {}
    for name, (hf_name, hf_shape, to_ours, _) in conv.items():
        w = tensors[hf_name]
        if w.shape != hf_shape:
            raise ValueError(f"{hf_name}: expected shape {hf_shape}, got {tuple(w.shape)}")
        params[name] = np.ascontiguousarray(to_ours(np.asarray(w, np.float32)))
    return params


def load_hf_params(model_dir: Path, cfg: GPT2Config) -> dict[str, np.ndarray]:
    return params_from_hf(load_file(Path(model_dir) / "model.safetensors"), cfg)


def params_to_hf(params, cfg: GPT2Config) -> dict[str, np.ndarray]:
    """Checkpoint tensors (unprefixed keys, as older Hub files) from our params."""
    shapes, hf = param_shapes(cfg), {}
    for name, (hf_name, _, _, to_hf) in _conversions(cfg).items():
        w = np.asarray(params[name], np.float32)
        if w.shape != shapes[name]:
            raise ValueError(f"{name}: expected shape {shapes[name]}, got {w.shape}")
        hf[hf_name] = np.ascontiguousarray(to_hf(w))
    return hf


def save_hf_model(params, cfg: GPT2Config, out_dir: Path, tokenizer_json: Path) -> None:
    """Write a directory `transformers` can load: config.json, model.safetensors, tokenizer.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = params_to_hf(params, cfg)
    config = json.dumps(config_to_hf(cfg), indent=2, sort_keys=True) + "\n"
    replace_atomically(out_dir / "model.safetensors",
                  lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    replace_atomically(out_dir / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer_json, tmp))
    replace_atomically(out_dir / "config.json", lambda tmp: tmp.write_text(config))
