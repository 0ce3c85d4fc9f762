"""Hugging Face GPT-2 checkpoint conversion: layout math, validation, saving.

Checkpoints are built by hand in Hugging Face's layout, and a NumPy GPT-2
written straight from those tensors checks the converted model end to end.
"""

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from gpt2_iree import model
from gpt2_iree.weights import (config_from_hf, config_to_hf, load_hf_config, load_hf_params,
                               params_from_hf, params_to_hf, save_hf_model)

# head_dim 16, not 64; vocab 100 pads to 128.
CFG = model.GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=32, vocab_size=100)

GPT2_SMALL_CONFIG = {  # gpt2's config.json, trimmed of fields that do not matter here
    "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
    "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768,
    "n_head": 12, "n_layer": 12, "n_positions": 1024, "vocab_size": 50257,
}


def hf_checkpoint(cfg=CFG, seed=0, dtype=np.float32):
    """Random tensors in Hugging Face's layout, every one non-trivial (biases and
    layer-norm weights too), large enough that attention is far from uniform."""
    rng = np.random.default_rng(seed)
    E, V = cfg.n_embd, cfg.vocab_size
    shapes = {"wte.weight": (V, E), "wpe.weight": (cfg.n_positions, E),
              "ln_f.weight": (E,), "ln_f.bias": (E,)}
    for i in range(cfg.n_layer):
        shapes |= {f"h.{i}.ln_1.weight": (E,), f"h.{i}.ln_1.bias": (E,),
                   f"h.{i}.attn.c_attn.weight": (E, 3 * E), f"h.{i}.attn.c_attn.bias": (3 * E,),
                   f"h.{i}.attn.c_proj.weight": (E, E), f"h.{i}.attn.c_proj.bias": (E,),
                   f"h.{i}.ln_2.weight": (E,), f"h.{i}.ln_2.bias": (E,),
                   f"h.{i}.mlp.c_fc.weight": (E, 4 * E), f"h.{i}.mlp.c_fc.bias": (4 * E,),
                   f"h.{i}.mlp.c_proj.weight": (4 * E, E), f"h.{i}.mlp.c_proj.bias": (E,)}
    tensors = {}
    for name, shape in shapes.items():
        base = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
        tensors[name] = (base + 0.2 * rng.standard_normal(shape)).astype(dtype)
    return tensors


def hf_reference_logits(t, cfg, tokens):
    """GPT-2 as Hugging Face computes it, in float64 NumPy, from its own tensors."""
    t = {k: v.astype(np.float64) for k, v in t.items()}
    B, T = tokens.shape
    E, H = cfg.n_embd, cfg.n_head

    def ln(x, p):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + cfg.layer_norm_epsilon) * t[p + ".weight"] + t[p + ".bias"]

    def linear(x, p):  # Conv1D: weight is (in, out)
        return x @ t[p + ".weight"] + t[p + ".bias"]

    def gelu_new(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = t["wte.weight"][tokens] + t["wpe.weight"][:T]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        q, k, v = np.split(linear(ln(x, p + "ln_1"), p + "attn.c_attn"), 3, axis=-1)
        q, k, v = (a.reshape(B, T, H, E // H).transpose(0, 2, 1, 3) for a in (q, k, v))
        scores = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(E // H), -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        a = (w / w.sum(-1, keepdims=True)) @ v
        x = x + linear(a.transpose(0, 2, 1, 3).reshape(B, T, E), p + "attn.c_proj")
        x = x + linear(gelu_new(linear(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
    return ln(x, "ln_f") @ t["wte.weight"].T


# --- layout -----------------------------------------------------------------


def test_projections_match_hf_layout():
    t = hf_checkpoint()
    p = params_from_hf(t, CFG)
    E, H, Q = CFG.n_embd, CFG.n_head, CFG.head_dim
    x = np.random.default_rng(1).standard_normal((2, 5, E)).astype(np.float32)

    hf_qkv = x @ t["h.1.attn.c_attn.weight"] + t["h.1.attn.c_attn.bias"]
    hf_qkv = np.stack([a.reshape(2, 5, H, Q) for a in np.split(hf_qkv, 3, axis=-1)])
    qkv_w, qkv_b = p["h.1.attn.qkv_w"].reshape(3, H, Q, -1), p["h.1.attn.qkv_b"].reshape(3, H, Q)
    ours = np.einsum("bte,nhqe->nbthq", x, qkv_w) + qkv_b[:, None, None]
    np.testing.assert_allclose(ours, hf_qkv, atol=1e-5)

    a = x.reshape(2, 5, H, Q)  # attention output, heads side by side as HF concatenates them
    hf_out = x @ t["h.1.attn.c_proj.weight"]
    np.testing.assert_allclose(np.einsum("bthq,ehq->bte", a, p["h.1.attn.out_w"].reshape(-1, H, Q)), hf_out, atol=1e-5)

    hf_fc = x @ t["h.1.mlp.c_fc.weight"]
    np.testing.assert_allclose(np.einsum("bte,fe->btf", x, p["h.1.mlp.in_w"]), hf_fc, atol=1e-5)
    np.testing.assert_allclose(np.einsum("btf,ef->bte", hf_fc, p["h.1.mlp.out_w"]),
                               hf_fc @ t["h.1.mlp.c_proj.weight"], atol=1e-4)


def test_forward_matches_numpy_reference():
    t = hf_checkpoint()
    tokens = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 11))
    logits = np.asarray(model.forward(params_from_hf(t, CFG), CFG, tokens))
    assert logits.shape == (2, 11, CFG.padded_vocab)
    expected = hf_reference_logits(t, CFG, tokens)
    assert np.abs(expected).max() > 1.0  # not a degenerate model
    np.testing.assert_allclose(logits[..., :CFG.vocab_size], expected, atol=1e-4, rtol=1e-4)
    assert (logits[..., CFG.vocab_size:] == model.NEG_INF).all()


# --- round trips ------------------------------------------------------------


def test_round_trip_through_safetensors(tmp_path):
    params = {k: np.asarray(v) for k, v in model.init_params(CFG).items()}
    hf = params_to_hf(params, CFG)
    assert all(not k.startswith("transformer.") for k in hf)
    assert hf["wte.weight"].shape == (CFG.vocab_size, CFG.n_embd)
    save_file(hf, str(tmp_path / "model.safetensors"))
    loaded = load_hf_params(tmp_path, CFG)
    assert loaded.keys() == params.keys()
    for name, shape in model.param_shapes(CFG).items():
        assert loaded[name].dtype == np.float32 and loaded[name].shape == shape, name
        np.testing.assert_array_equal(loaded[name], params[name], err_msg=name)
    assert (loaded["wte"][CFG.vocab_size:] == 0).all()


def test_hf_round_trip_is_exact():
    t = hf_checkpoint()
    back = params_to_hf(params_from_hf(t, CFG), CFG)
    assert back.keys() == t.keys()
    for name in t:
        np.testing.assert_array_equal(back[name], t[name], err_msg=name)


def test_prefix_buffers_lm_head_and_fp16_accepted():
    t = hf_checkpoint(dtype=np.float16)
    variant = {"transformer." + k: v for k, v in t.items()}
    variant["lm_head.weight"] = t["wte.weight"]
    for i in range(CFG.n_layer):
        variant[f"transformer.h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), np.float16))
        variant[f"transformer.h.{i}.attn.masked_bias"] = np.array(-1e4, np.float16)
    got, want = params_from_hf(variant, CFG), params_from_hf(t, CFG)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


# --- validation -------------------------------------------------------------


def test_missing_key_is_named():
    t = hf_checkpoint()
    del t["h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.bias"):
        params_from_hf(t, CFG)


def test_wrong_shape_names_expected_and_got():
    t = hf_checkpoint()
    t["h.0.attn.c_attn.weight"] = t["h.0.attn.c_attn.weight"][:, :64]
    with pytest.raises(ValueError, match=r"c_attn\.weight.*\(64, 192\).*\(64, 64\)"):
        params_from_hf(t, CFG)


def test_checkpoint_with_more_layers_is_rejected():
    t = hf_checkpoint(model.GPT2Config(n_layer=3, n_embd=64, n_head=4, n_positions=32, vocab_size=100))
    with pytest.raises(ValueError, match=r"h\.2\."):
        params_from_hf(t, CFG)


def test_config_from_hf_reads_gpt2():
    assert config_from_hf(GPT2_SMALL_CONFIG) == model.GPT2Config(
        n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257, layer_norm_epsilon=1e-5)
    no_eps = {k: v for k, v in GPT2_SMALL_CONFIG.items() if k != "layer_norm_epsilon"}
    assert config_from_hf(no_eps).layer_norm_epsilon == 1e-5
    assert config_from_hf(config_to_hf(CFG)) == CFG


@pytest.mark.parametrize("change, message", [
    ({"n_head": 7}, r"n_embd=768.*n_head=7"),
    ({"activation_function": "relu"}, r"activation_function='relu'"),
    ({"model_type": "gpt_neo"}, r"model_type='gpt_neo'"),
    ({"n_inner": 1000}, r"n_inner=1000"),
    ({"n_layer": 0}, r"n_layer=0"),
])
def test_config_from_hf_rejects(change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf(GPT2_SMALL_CONFIG | change)


def test_config_from_hf_names_missing_field():
    with pytest.raises(ValueError, match="n_positions"):
        config_from_hf({k: v for k, v in GPT2_SMALL_CONFIG.items() if k != "n_positions"})


# --- saving -----------------------------------------------------------------


def test_save_hf_model(tmp_path):
    params = params_from_hf(hf_checkpoint(), CFG)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text('{"model": {"type": "BPE"}}')
    out = tmp_path / "out"
    save_hf_model(params, CFG, out, tokenizer)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((out / "config.json").read_text())
    assert config_from_hf(config) == CFG == load_hf_config(out)
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["n_ctx"] == CFG.n_positions
    assert (out / "tokenizer.json").read_bytes() == tokenizer.read_bytes()
    with safe_open(str(out / "model.safetensors"), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = load_hf_params(out, CFG)
    for name in params:
        np.testing.assert_array_equal(loaded[name], params[name], err_msg=name)


def test_transformers_loads_saved_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    params = params_from_hf(hf_checkpoint(), CFG)
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("{}")
    save_hf_model(params, CFG, tmp_path / "out", tokenizer)
    hf_model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, (2, 9))
    with torch.no_grad():
        hf_logits = hf_model(torch.from_numpy(tokens)).logits.numpy()
    ours = np.asarray(model.forward(params, CFG, tokens))[..., :CFG.vocab_size]
    np.testing.assert_allclose(ours, hf_logits, atol=1e-4, rtol=1e-4)
