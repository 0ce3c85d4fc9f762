"""GPT-2 in JAX, written for IREE: prefill, one decode step, and a training step.

Every function here is pure and shape-static, so that `stateful.py` can lower
it once and IREE can compile it ahead of time. A few choices look odd for JAX
code; each avoids something IREE 3.13 rejects or runs slowly (see DESIGN.md):

* Matmul weights are stored output-major (the contraction dim last), e.g.
  `mlp.in_w` is (F, E). With `--iree-opt-aggressively-propagate-transposes`
  IREE then never transposes a weight at run time. They stay 2-D and every
  projection is a plain 2-D matmul, split into heads after it: Adafactor
  factors its second moment only for matrices whose two largest dims are
  >= 128, which (3, H, Q, E) would not be, and IREE runs the q/k/v projection
  written as one einsum over heads 2.7x slower (4.1 vs 1.5 ms per layer in a
  124M fine-tuning step).
* The KV cache is updated with a one-hot `where` over the sequence axis, not
  `dynamic_update_slice` under vmap, which lowers to a batched scatter.
* The loss is `-sum(log_softmax * one_hot)`, not `take_along_axis`, whose
  gradient is a batched scatter too.
* Masks use `where(mask, x, -1e9)`; `x - inf * mask` would give 0 * inf = NaN.
* The module's Adafactor is adafactor.py's: optax's math, written so that IREE
  streams each weight fewer times (see `make_optimizer`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from gpt2_iree import adafactor

# Logits of masked positions and padded vocabulary ids: far below any real
# logit, yet finite so that softmax never sees inf - inf.
NEG_INF = -1e9


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """The shape of a GPT-2 model, named as in Hugging Face's config.json."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    vocab_size: int
    layer_norm_epsilon: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up to a multiple of 64, so the LM head tiles evenly."""
        return -(-self.vocab_size // 64) * 64


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The static shapes one compiled module is specialised to."""

    batch: int
    prompt_len: int
    seq_len: int


# --- parameters -------------------------------------------------------------


def param_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape. Names are the keys of the .irpa archive."""
    E, F = cfg.n_embd, 4 * cfg.n_embd
    shapes = {
        "wte": (cfg.padded_vocab, E),
        "wpe": (cfg.n_positions, E),
        "ln_f.scale": (E,),
        "ln_f.bias": (E,),
    }
    for i in range(cfg.n_layer):
        shapes |= {
            f"h.{i}.ln_1.scale": (E,),
            f"h.{i}.ln_1.bias": (E,),
            f"h.{i}.attn.qkv_w": (3 * E, E),
            f"h.{i}.attn.qkv_b": (3 * E,),
            f"h.{i}.attn.out_w": (E, E),
            f"h.{i}.attn.out_b": (E,),
            f"h.{i}.ln_2.scale": (E,),
            f"h.{i}.ln_2.bias": (E,),
            f"h.{i}.mlp.in_w": (F, E),
            f"h.{i}.mlp.in_b": (F,),
            f"h.{i}.mlp.out_w": (E, F),
            f"h.{i}.mlp.out_b": (E,),
        }
    return shapes


def init_params(cfg: GPT2Config, seed: int = 0) -> dict[str, jax.Array]:
    """Seeded random weights with GPT-2's initialisation (normal, std 0.02).

    The residual projections are scaled by 1/sqrt(2 * n_layer) as in the
    GPT-2 paper; padded vocabulary rows stay zero like a converted checkpoint's.
    """
    key = jax.random.PRNGKey(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        key, sub = jax.random.split(key)
        if name.endswith(".scale"):
            params[name] = jnp.ones(shape, jnp.float32)
        elif name.endswith(("_b", ".bias")):
            params[name] = jnp.zeros(shape, jnp.float32)
        else:
            std = 0.02
            if name.endswith(("attn.out_w", "mlp.out_w")):
                std /= math.sqrt(2 * cfg.n_layer)
            params[name] = std * jax.random.normal(sub, shape, jnp.float32)
    params["wte"] = params["wte"].at[cfg.vocab_size :].set(0.0)
    return params


# --- the network ------------------------------------------------------------


def _layer_norm(x, scale, bias, eps):
    return jax.nn.standardize(x, axis=-1, epsilon=eps) * scale + bias


def _gelu(x):
    # GPT-2's "gelu_new": the tanh approximation.
    return jax.nn.gelu(x, approximate=True)


def _attend(q, k, v, visible):
    """q (B,T,H,Q), k/v (B,S,H,Q), visible (B,T,S) bool -> (B,T,H,Q)."""
    scores = jnp.einsum("bthq,bshq->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(visible[:, None], scores, NEG_INF)
    return jnp.einsum("bhts,bshq->bthq", jax.nn.softmax(scores, axis=-1), v)


def _block(params, i, cfg, x, attend):
    """One transformer block. `attend(layer, q, k, v)` supplies the attention
    context, so prefill, decode and training share every other line."""
    p = lambda name: params[f"h.{i}.{name}"]  # noqa: E731
    (B, T, E), H, Q = x.shape, cfg.n_head, cfg.head_dim
    h = _layer_norm(x, p("ln_1.scale"), p("ln_1.bias"), cfg.layer_norm_epsilon)
    qkv = jnp.einsum("bte,fe->btf", h, p("attn.qkv_w")) + p("attn.qkv_b")
    q, k, v = jnp.moveaxis(qkv.reshape(B, T, 3, H, Q), 2, 0)
    a = attend(i, q, k, v)
    x = x + jnp.einsum("bte,fe->btf", a.reshape(B, T, E), p("attn.out_w")) + p("attn.out_b")
    h = _layer_norm(x, p("ln_2.scale"), p("ln_2.bias"), cfg.layer_norm_epsilon)
    h = _gelu(jnp.einsum("bte,fe->btf", h, p("mlp.in_w")) + p("mlp.in_b"))
    return x + jnp.einsum("btf,ef->bte", h, p("mlp.out_w")) + p("mlp.out_b")


def _logits(params, cfg, x):
    """Final norm and the tied LM head; padded vocabulary ids can never win."""
    x = _layer_norm(x, params["ln_f.scale"], params["ln_f.bias"], cfg.layer_norm_epsilon)
    logits = jnp.einsum("bte,ve->btv", x, params["wte"])
    real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
    return jnp.where(real, logits, NEG_INF)


def _greedy(logits):
    """argmax over the vocabulary as two plain reductions (max, then the first
    index holding it): jnp.argmax lowers to one two-result reduce, which IREE's
    split-reduction, the pass that spreads a long reduction over threads, rejects."""
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    best = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits == best, vocab, logits.shape[-1]), axis=-1)


def _embed(params, tokens, positions):
    return params["wte"][tokens] + params["wpe"][positions]


def forward(params, cfg: GPT2Config, tokens):
    """Full causal forward over tokens (B,T) -> logits (B,T,V_padded)."""
    T = tokens.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))[None]
    x = _embed(params, tokens, jnp.arange(T)[None])
    for i in range(cfg.n_layer):
        x = _block(params, i, cfg, x, lambda _, q, k, v: _attend(q, k, v, causal))
    return _logits(params, cfg, x)


# --- inference with a KV cache ------------------------------------------------


def empty_cache(cfg: GPT2Config, shapes: Shapes) -> dict[str, jax.Array]:
    """The decode state: per-layer K and V (B,S,H,Q), the next write position,
    the last token produced, and that step's logits (kept for verification)."""
    kv_shape = (shapes.batch, shapes.seq_len, cfg.n_head, cfg.head_dim)
    cache = {"pos": jnp.zeros((shapes.batch,), jnp.int32),
             "token": jnp.zeros((shapes.batch,), jnp.int32),
             "logits": jnp.zeros((shapes.batch, cfg.padded_vocab), jnp.float32)}
    for i in range(cfg.n_layer):
        cache[f"k.{i}"] = jnp.zeros(kv_shape, jnp.float32)
        cache[f"v.{i}"] = jnp.zeros(kv_shape, jnp.float32)
    return cache


def encode(params, cfg: GPT2Config, shapes: Shapes, prompt, lengths):
    """Prefill: prompt (B,K) right-padded, lengths (B,) -> (cache, next token (B,)).

    Rows shorter than K carry junk K/V after their length; decode overwrites
    those slots one by one before any query can see them.
    """
    K = prompt.shape[1]
    causal = jnp.tril(jnp.ones((K, K), bool))[None]
    cache = {}

    def attend(i, q, k, v):
        pad = ((0, 0), (0, shapes.seq_len - K), (0, 0), (0, 0))
        cache[f"k.{i}"], cache[f"v.{i}"] = jnp.pad(k, pad), jnp.pad(v, pad)
        return _attend(q, k, v, causal)

    x = _embed(params, prompt, jnp.arange(K)[None])
    for i in range(cfg.n_layer):
        x = _block(params, i, cfg, x, attend)
    last = jax.nn.one_hot(lengths - 1, K, dtype=x.dtype)
    logits = _logits(params, cfg, jnp.einsum("bk,bke->be", last, x)[:, None])[:, 0]
    token = _greedy(logits)
    cache |= {"pos": lengths.astype(jnp.int32), "token": token, "logits": logits}
    return cache, token


def decode(params, cfg: GPT2Config, shapes: Shapes, cache):
    """One step: feed the last token at `pos`, write its K/V, predict the next."""
    pos, S = cache["pos"], shapes.seq_len
    here = (jnp.arange(S)[None] == pos[:, None])  # (B,S) one-hot write slot
    visible = (jnp.arange(S)[None] <= pos[:, None])[:, None]  # (B,1,S)
    new = {}

    def attend(i, q, k, v):
        slot = here[:, :, None, None]
        new[f"k.{i}"] = jnp.where(slot, k, cache[f"k.{i}"])
        new[f"v.{i}"] = jnp.where(slot, v, cache[f"v.{i}"])
        return _attend(q, new[f"k.{i}"], new[f"v.{i}"], visible)

    x = _embed(params, cache["token"][:, None], jnp.minimum(pos, cfg.n_positions - 1)[:, None])
    for i in range(cfg.n_layer):
        x = _block(params, i, cfg, x, attend)
    logits = _logits(params, cfg, x)[:, 0]
    token = _greedy(logits)
    new |= {"pos": pos + 1, "token": token, "logits": logits}
    return new, token


# --- training -----------------------------------------------------------------

OPTIMIZERS = ("adafactor", "sgd", "adamw")


def make_optimizer(name: str, for_iree: bool = False) -> optax.GradientTransformation:
    """The optimizer at learning rate 1; `train_step` scales its update by the
    learning rate given at run time, which is exact for these three (their
    learning rate only multiplies the final update) and keeps it a call argument.

    `for_iree` gives the version the module compiles: for Adafactor that is
    adafactor.py's rewrite of optax's (same math and state, half IREE's memory
    traffic, but slower under XLA). The references that `verify` and `bench`
    run are optax's own.
    """
    if name == "adafactor":
        return adafactor.adafactor() if for_iree else optax.adafactor(learning_rate=1.0)
    if name == "sgd":
        return optax.sgd(learning_rate=1.0)
    if name == "adamw":
        return optax.adamw(learning_rate=1.0)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def loss_fn(params, cfg: GPT2Config, text, target, lengths):
    """Mean next-token cross-entropy over the first `lengths[b]` positions of each row."""
    logits = forward(params, cfg, text)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.sum(logp * jax.nn.one_hot(target, cfg.padded_vocab, dtype=logp.dtype), axis=-1)
    valid = (jnp.arange(text.shape[1])[None] < lengths[:, None]).astype(nll.dtype)
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def train_step(params, opt_state, cfg: GPT2Config, optimizer: optax.GradientTransformation,
               text, target, lengths, learning_rate):
    """One step of `optimizer` (a `make_optimizer`) -> (params, opt_state, loss before the step)."""
    loss, grads = jax.value_and_grad(loss_fn)(params, cfg, text, target, lengths)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: learning_rate * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss
