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
* The KV cache is written with one `dynamic_update_slice` per row, not under
  vmap (a batched scatter), nor as a one-hot `where` over the sequence axis,
  which reads and writes the whole cache to add one position. Where each row
  is written comes from the host, one scalar per row (`stateful.Scalar`),
  so that IREE records the copy without reading a position back from the
  device in the middle of the call. A decode step
  attends over a static window of the cache (`decode(..., window)`, one entry
  point per window), so late steps read what they need and early ones less.
* The loss picks the target's logit with a comparison against the token ids,
  not `take_along_axis`, whose gradient is a batched scatter too, and its
  gradient is written by hand (`_cross_entropy`): autodiff of log_softmax
  kept more logits-sized buffers alive in a step.
* Masks use `where(mask, x, -1e9)`; `x - inf * mask` would give 0 * inf = NaN.
* The module's Adafactor is adafactor.py's: optax's math, written so that IREE
  streams each weight fewer times (see `make_optimizer`).
* Two pieces avoid wrong results on IREE's GPU path at GPT-2's sizes: the
  embeddings' gradient is added in chunks (`_rows`), and top-p weighs its
  mass unnormalised (`_thresholds`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax

from gpt2_iree import adafactor, packed
from gpt2_iree.generate_weights import INT8_SCALE, PLAIN_WTE

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
    """The static shapes one compiled module is specialised to: `batch` rows,
    prefill chunks of `prompt_len` tokens, a KV cache of `context` positions,
    and fine-tuning windows of `seq_len` tokens."""

    batch: int
    prompt_len: int
    context: int
    seq_len: int

    @property
    def cache_len(self) -> int:
        """Cache slots: the context plus one chunk of slack, so that a chunk
        written at any position below `context` fits (dynamic_update_slice
        would move a write that runs past the end)."""
        return self.context + self.prompt_len

    @property
    def decode_windows(self) -> tuple[int, ...]:
        """The cache windows a decode step can attend over, one entry point
        each: doubling from a chunk up to the context."""
        windows, w = [], self.prompt_len
        while w < self.context:
            windows.append(w)
            w *= 2
        return (*windows, self.context)


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


def _attention_weights(q, k, visible):
    """q (B,T,H,Q), k (B,S,H,Q), visible (B,T,S) bool -> (B,H,T,S), each
    query's softmax over the keys it sees."""
    scores = jnp.einsum("bthq,bshq->bhts", q, k) / math.sqrt(q.shape[-1])
    scores = jnp.where(visible[:, None], scores, NEG_INF)
    return jax.nn.softmax(scores, axis=-1)


def _attend(q, k, v, visible):
    """q (B,T,H,Q), k/v (B,S,H,Q), visible (B,T,S) bool -> (B,T,H,Q)."""
    return jnp.einsum("bhts,bshq->bthq", _attention_weights(q, k, visible), v)


# A LoRA adapter of weight `name` (out, in) is two more entries of the params:
# `name + LORA_A` (rank, in) and `name + LORA_B` (out, rank), B already scaled
# by alpha / rank (lora.py), so the weight the layer computes with is W + B @ A.
LORA_A, LORA_B = ".lora_a", ".lora_b"


@jax.custom_vjp
def _int8_times(x, w, scale):
    """x (..., in) times the int8 weight w (out, in) with its row scales. x is
    quantized too, symmetric, one scale per token, so that the product is
    int8 x int8 -> int32, which IREE runs on its integer ukernels on the CPU:
    IREE 3.13 does not fuse a weight's dequantization into a float matmul,
    which then ran 5.7x slower than float16 weights (docs/PERFORMANCE.md)."""
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    x_scale = jnp.where(amax > 0, amax / 127, 1.0)
    xq = jnp.clip(jnp.round(x / x_scale), -127, 127).astype(jnp.int8)
    if w.ndim == 4:  # packed (packed.py): the CPU's generation module
        acc = packed_int8_times(xq, w)
    else:
        acc = jnp.einsum("...e,fe->...f", xq, w, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * x_scale * scale


def _int8_times_forward(x, w, scale):
    return _int8_times(x, w, scale), (w, scale)


def _int8_times_backward(saved, grad):
    """x's gradient through the int8 weight, straight through the rounding of
    x. JAX's own reaches only each token's largest entry, through its scale
    (round has no derivative), and every adapter's gradient comes back through
    the int8 LM head. An int8 weight is frozen (a LoRA build's base), so it
    gets no gradient. The scales belong to the output rows, so they multiply
    the gradient, and the weight is only widened, as a float16 base is."""
    w, scale = saved
    return jnp.einsum("...f,fe->...e", grad * scale, w.astype(grad.dtype)), None, None


_int8_times.defvjp(_int8_times_forward, _int8_times_backward)


@jax.jit
def packed_times(x, packed_w):
    """x (..., in) times a float16 weight stored packed (packed.py):
    (out / TILE, in, TILE). JAX runs it as written; a jitted function is a
    function of its own in the export, whose body the CPU's export replaces
    with linalg.mmt4d (packed.lowered)."""
    return jnp.einsum("...e,fe->...f", x, packed.unpack(packed_w).astype(x.dtype))


@jax.jit
def packed_int8_times(xq, packed_w):
    """int8 xq (..., in) times an int8 weight stored packed (packed.py): (out /
    TILE, in / INT8_PAIR, TILE, INT8_PAIR), into int32. As packed_times, the
    CPU's export replaces its body with linalg.mmt4d."""
    return jnp.einsum("...e,fe->...f", xq, packed.unpack(packed_w), preferred_element_type=jnp.int32)


# The functions whose bodies packed.lowered replaces.
PACKED_PRODUCTS = (packed_times.__name__, packed_int8_times.__name__)


@jax.custom_vjp
def _packed_product(x, packed_w):
    """packed_times, with a gradient for x of its own. Differentiated as it
    is, JAX splits the jitted function into one that also returns the weight
    unpacked and widened for the backward pass: another signature, which
    packed.lowered must not replace, and a float32 copy of the base. A packed
    weight is frozen (a LoRA build's base), so it gets no gradient."""
    return packed_times(x, packed_w)


def _packed_product_forward(x, packed_w):
    return packed_times(x, packed_w), packed_w


def _packed_product_backward(packed_w, grad):
    tiles, _, tile = packed_w.shape
    by_tile = grad.reshape(*grad.shape[:-1], tiles, tile)
    return jnp.einsum("...tj,tej->...e", by_tile, packed_w.astype(grad.dtype)), None


_packed_product.defvjp(_packed_product_forward, _packed_product_backward)


def _linear(params, name, x):
    """x (..., in) times weight `name` (out, in), or stored packed (a 3-D
    weight, packed.py), plus its LoRA adapter if the params carry one: as
    (x A^T) B^T, never forming B @ A, so the frozen weight is read as it is
    stored and the adapter costs 2 * rank * (in + out) flops a token."""
    if name + INT8_SCALE in params:
        y = _int8_times(x, params[name], params[name + INT8_SCALE])
    elif params[name].ndim == 3:
        y = _packed_product(x, params[name])
    else:
        y = jnp.einsum("...e,fe->...f", x, params[name])
    if name + LORA_A in params:
        y = y + _lora_up(jnp.einsum("...e,re->...r", x, params[name + LORA_A]), params[name + LORA_B])
    return y


# Outputs per block in the gradient through a LoRA adapter's B (_lora_up).
LORA_GRAD_BLOCK = 768


@jax.custom_vjp
def _lora_up(u, b):
    """u (..., rank) times adapter B (out, rank), transposed: (..., out)."""
    return jnp.einsum("...r,fr->...f", u, b)


def _lora_up_forward(u, b):
    return _lora_up(u, b), (u, b)


def _lora_up_backward(saved, grad):
    # The gradient for u sums all `out` outputs into `rank` values. As one
    # product IREE 3.13 splits that long, narrow reduction into 128 pieces:
    # 1.25 ms a layer for q/k/v (2304 x 8), 15 ms of a 124M LoRA step. Summed
    # by blocks of LORA_GRAD_BLOCK outputs, then over the blocks: 0.11 ms.
    u, b = saved
    out, rank = b.shape
    blocks = out // LORA_GRAD_BLOCK if out % LORA_GRAD_BLOCK == 0 else 1
    by_block = jnp.einsum("...ck,ckr->c...r", grad.reshape(*grad.shape[:-1], blocks, out // blocks),
                          b.reshape(blocks, out // blocks, rank))
    grad_b = jnp.einsum("tf,tr->fr", grad.reshape(-1, out), u.reshape(-1, rank))
    return by_block.sum(0), grad_b


_lora_up.defvjp(_lora_up_forward, _lora_up_backward)


def _block(params, i, cfg, x, attend):
    """One transformer block. `attend(layer, q, k, v)` supplies the attention
    context, so prefill, decode and training share every other line."""
    p = lambda name: params[f"h.{i}.{name}"]  # noqa: E731
    linear = lambda w, x: _linear(params, f"h.{i}.{w}_w", x) + p(f"{w}_b")  # noqa: E731
    (B, T, E), H, Q = x.shape, cfg.n_head, cfg.head_dim
    h = _layer_norm(x, p("ln_1.scale"), p("ln_1.bias"), cfg.layer_norm_epsilon)
    q, k, v = jnp.moveaxis(linear("attn.qkv", h).reshape(B, T, 3, H, Q), 2, 0)
    a = attend(i, q, k, v)
    x = x + linear("attn.out", a.reshape(B, T, E))
    h = _layer_norm(x, p("ln_2.scale"), p("ln_2.bias"), cfg.layer_norm_epsilon)
    return x + linear("mlp.out", _gelu(linear("mlp.in", h)))


def _logits(params, cfg, x):
    """Final norm and the tied LM head; padded vocabulary ids can never win."""
    x = _layer_norm(x, params["ln_f.scale"], params["ln_f.bias"], cfg.layer_norm_epsilon)
    if PLAIN_WTE in params:  # a LoRA step on a packed base (generate_weights.PLAIN_WTE)
        logits = _frozen_lm_head(x, params[PLAIN_WTE])
    else:
        logits = _linear(params, "wte", x)
    real = jnp.arange(cfg.padded_vocab) < cfg.vocab_size
    return jnp.where(real, logits, NEG_INF)


# Vocabulary rows per product in x's gradient through a frozen LM head.
VOCAB_CHUNK = 1024


@jax.custom_vjp
def _frozen_lm_head(x, wte):
    """x (..., in) times the frozen tied embedding (vocab, in), plain float16,
    widened inside each product. x's gradient sums the vocabulary in products
    of VOCAB_CHUNK rows: as one product, reduced over 50304, it ran at 55
    GFLOP/s, 181 ms of a 124M LoRA step; in 50 of 1024 rows it takes 67 ms (a
    module on packed weights is compiled without split reduction,
    Target.packed_flags). A step with 16 chunks took 5-10 % longer than with
    48; with 96 or 131, no less."""
    return jnp.einsum("...e,fe->...f", x, wte.astype(x.dtype))


def _frozen_lm_head_forward(x, wte):
    return _frozen_lm_head(x, wte), wte


def _frozen_lm_head_backward(wte, grad):
    x_grad = 0
    for start in range(0, wte.shape[0], VOCAB_CHUNK):
        end = start + VOCAB_CHUNK
        x_grad = x_grad + jnp.einsum("...f,fe->...e", grad[..., start:end], wte[start:end].astype(grad.dtype))
    return x_grad, None


_frozen_lm_head.defvjp(_frozen_lm_head_forward, _frozen_lm_head_backward)


def _greedy(logits):
    """argmax over the vocabulary as two plain reductions (max, then the first
    index holding it): jnp.argmax lowers to one two-result reduce, which IREE's
    split-reduction, the pass that spreads a long reduction over threads, rejects."""
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
    best = jnp.max(logits, axis=-1, keepdims=True)
    return jnp.min(jnp.where(logits == best, vocab, logits.shape[-1]), axis=-1)


# The most workgroups one dispatch may launch along a grid dimension on every
# Vulkan device (the spec's minimum) and on IREE's Metal target.
MAX_WORKGROUP_COUNT = 65535


@jax.custom_vjp
def _rows(table, ids):
    """table[ids]. Its gradient is a scatter-add, which IREE 3.13's GPU path
    runs with one workgroup per updated element without splitting the grid:
    past MAX_WORKGROUP_COUNT elements (85 rows of 768) the rest are silently
    dropped. So the backward adds the rows in chunks that stay under it."""
    return table[ids]


def _rows_forward(table, ids):
    return table[ids], (table, ids)


def _rows_backward(saved, grad):
    table, ids = saved
    ids, grad = ids.reshape(-1), grad.reshape(-1, table.shape[-1])
    chunk = max(1, MAX_WORKGROUP_COUNT // table.shape[-1])
    table_grad = jnp.zeros_like(table)
    for start in range(0, ids.shape[0], chunk):
        table_grad = table_grad.at[ids[start:start + chunk]].add(grad[start:start + chunk])
    return table_grad, None


_rows.defvjp(_rows_forward, _rows_backward)


def _embed(params, tokens, positions):
    wte = params["wte"]
    if PLAIN_WTE in params:  # a LoRA step on a packed base: the copy its LM head reads (its tiles: 10 MB more)
        tokens_in = params[PLAIN_WTE][tokens].astype(jnp.float32)
    elif wte.ndim > 2:  # packed (packed.py): row i is column i % TILE of tile i // TILE
        rows = wte[tokens // packed.TILE, :, tokens % packed.TILE]
        tokens_in = rows.reshape(*tokens.shape, -1).astype(jnp.float32)
    else:
        tokens_in = _rows(wte, tokens)
    if "wte" + INT8_SCALE in params:
        tokens_in = tokens_in.astype(jnp.float32) * params["wte" + INT8_SCALE][tokens][..., None]
    return tokens_in + _rows(params["wpe"], positions)


def _rounded(x, dtype):
    """x as a cache of `dtype` holds it, in x's own dtype."""
    return x.astype(dtype).astype(x.dtype)


def forward(params, cfg: GPT2Config, tokens, kv: dict | None = None, cache_dtype=jnp.float32):
    """Full causal forward over tokens (B,T) -> logits (B,T,V_padded). Given a
    dict `kv`, it also receives each layer's keys and values, "k.<i>" and
    "v.<i>" (B,T,H,Q): what a cache holds after these tokens. Keys and values
    are rounded to `cache_dtype` before they are attended over, as a cache of
    that dtype holds them."""
    T = tokens.shape[1]
    causal = jnp.tril(jnp.ones((T, T), bool))[None]

    def attend(i, q, k, v):
        k, v = (_rounded(t, cache_dtype) for t in (k, v))
        if kv is not None:
            kv[f"k.{i}"], kv[f"v.{i}"] = k, v
        return _attend(q, k, v, causal)

    x = _embed(params, tokens, jnp.arange(T)[None])
    for i in range(cfg.n_layer):
        x = _block(params, i, cfg, x, attend)
    return _logits(params, cfg, x)


# --- inference with a KV cache ------------------------------------------------


def empty_cache(cfg: GPT2Config, shapes: Shapes, dtype=jnp.float32) -> dict[str, jax.Array]:
    """The decode state: per-layer K and V (B, cache_len, H, Q) in `dtype`; per
    row the last token, that step's logits (kept for verification) and its
    random generator's key (threefry's two uint32 words, held as int32:
    IREE's globals are signless). Where each row is, the host keeps.

    A LoRA build and every generation module keep float16 K and V, as
    llama.cpp does by default: half the cache's memory (80 MB of float32 for
    124M at context 1024). Attention still computes in float32, on the
    rounded values."""
    kv_shape = (shapes.batch, shapes.cache_len, cfg.n_head, cfg.head_dim)
    cache = {"token": jnp.zeros((shapes.batch,), jnp.int32),
             "logits": jnp.zeros((shapes.batch, cfg.padded_vocab), jnp.float32),
             "key": jnp.zeros((shapes.batch, 2), jnp.int32)}
    # Zero here, where JAX runs it; the module leaves K and V uninitialised
    # (export.generation_state), so that a process that only fine-tunes never
    # touches their pages, and `started` zeroes a row's before it is used:
    # attention multiplies the slots past a row's end by zero, and zero times
    # whatever an allocation held (a NaN on a GPU) need not be zero.
    for name in kv_names(cfg):
        cache[name] = jnp.zeros(kv_shape, dtype)
    return cache


def kv_names(cfg: GPT2Config) -> list[str]:
    """The cache's per-layer K and V: "k.<i>", "v.<i>"."""
    return [f"{kv}.{i}" for i in range(cfg.n_layer) for kv in "kv"]


def _write_rows(cache_kv, new, starts):
    """cache_kv (B,L,H,Q) with each row b's `new[b]` (T,H,Q) written at
    `starts[b]`, one scalar per row. Positions are never negative: JAX's wrap
    of negative indices would be computed on the device, and IREE would then
    wait for it before it could record the copy."""
    new = new.astype(cache_kv.dtype)
    for b, start in enumerate(starts):
        cache_kv = jax.lax.dynamic_update_slice(cache_kv, new[b:b + 1], (b, start, 0, 0),
                                                allow_negative_indices=False)
    return cache_kv


# The top-k and top-p thresholds are searched in passes over the logits, each
# weighing THRESHOLD_WAYS - 1 candidates spread over the range left: 12
# passes of 4 ways narrow a range of 100 to 6e-6, as 24 halvings would, in
# half the passes (each a dispatch, and on a GPU a launch). 16 ways in 6
# passes did more work per pass than they saved, on lavapipe and the CPU.
THRESHOLD_PASSES, THRESHOLD_WAYS = 12, 4


def _thresholds(scaled, top_k, top_p):
    """Per row, the largest logit thresholds at which at least `top_k` tokens
    (count) and at least `top_p` of the probability (mass) stay at or above
    them: the top-k set and the top-p nucleus without sorting the vocabulary.
    (IREE 3.13's top-k is wrong on its SPIR-V path: Vulkan and Metal.)

    The mass is weighed unnormalised, against top_p times the total: IREE
    3.13's softmax is wrong on that path from 32768 entries on, and GPT-2's
    vocabulary has 50257."""
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))
    needed = top_p[:, None] * jnp.sum(weights, axis=-1, keepdims=True)
    k = jnp.maximum(top_k, 1).astype(scaled.dtype)[:, None]
    # Every real token is at or above it (count V, mass 1); the padded
    # vocabulary's NEG_INF would make the range, and each pass, 1e9 wide.
    low = jnp.min(jnp.where(scaled > NEG_INF / 2, scaled, -NEG_INF), axis=-1, keepdims=True)
    high = jnp.max(scaled, axis=-1, keepdims=True) + 1.0  # none: count 0, mass 0
    k_low, k_high, p_low, p_high = low, high, low, high
    for _ in range(THRESHOLD_PASSES):
        k_cuts, p_cuts = _cuts(k_low, k_high), _cuts(p_low, p_high)
        enough = jnp.sum((scaled[:, None, :] >= k_cuts[:, :, None]).astype(scaled.dtype), axis=-1) >= k
        mass = jnp.sum(jnp.where(scaled[:, None, :] >= p_cuts[:, :, None], weights[:, None, :], 0.0), axis=-1)
        k_low, k_high = _narrowed(k_low, k_cuts, k_high, enough)
        p_low, p_high = _narrowed(p_low, p_cuts, p_high, mass >= needed)
    return k_low, p_low


def _cuts(low, high):
    """THRESHOLD_WAYS - 1 candidates (B, ways - 1), rising, that cut each
    row's range [low, high) (B,1) into equal parts."""
    return low + (high - low) * (jnp.arange(1, THRESHOLD_WAYS, dtype=low.dtype) / THRESHOLD_WAYS)


def _narrowed(low, cuts, high, kept):
    """Each row's range narrowed to the part between the last of its `cuts`
    that keeps enough (`kept`, a prefix of them: they rise) and the next."""
    bounds = jnp.concatenate([low, cuts, high], axis=-1)
    last = jnp.sum(kept, axis=-1, keepdims=True)
    return jnp.take_along_axis(bounds, last, axis=-1), jnp.take_along_axis(bounds, last + 1, axis=-1)


def sample(logits, key, temperature, top_k, top_p):
    """One token per row from logits (B,V): greedy where temperature is 0, else
    drawn from softmax(logits / temperature) restricted to the `top_k` most
    likely tokens (0: no limit) and to the smallest set of the most likely
    whose probability reaches `top_p` (1: no limit). Per row: key (B,2)
    int32, temperature (B,) float, top_k (B,) int, top_p (B,) float ->
    (tokens (B,), new keys).

    Draws are Gumbel-max: argmax(logits / T + Gumbel noise) over the allowed
    tokens is distributed as softmax(logits / T) over them. Every path is
    computed and one picked per row, greedy rows too: IREE 3.13's vectorizer
    crashes on a sampler under a lax.cond at batch 1.
    """
    # The padded vocabulary stays at NEG_INF whatever the temperature: divided
    # by one above 2, it would pass for real logits in the threshold search,
    # whose range would then be too wide to find a threshold in.
    scaled = jnp.where(logits > NEG_INF / 2, logits / jnp.maximum(temperature, 1e-6)[:, None], NEG_INF)
    # No optimization barrier between the search and the draw: IREE's stream
    # dialect runs one on the host, after a wait for the device. The
    # bisection that came before this search needed one on the SPIR-V path,
    # where its last reductions, fused into the draw, let in tokens outside
    # the top-k set or the nucleus (tests/test_model.py).
    k_threshold, p_threshold = _thresholds(scaled, top_k, top_p)
    allowed = (((top_k == 0)[:, None] | (scaled >= k_threshold))
               & ((top_p >= 1.0)[:, None] | (scaled >= p_threshold)))
    gumbel, key = _gumbel_noise(key, logits.shape[-1])
    drawn = _greedy(jnp.where(allowed, scaled + gumbel, NEG_INF))
    return jnp.where(temperature > 0, drawn, _greedy(logits)).astype(jnp.int32), key


def _gumbel_noise(key, vocab):
    """Gumbel noise (B,V) from each row's key (B,2), and the keys for the next
    draw: threefry of the key at counters (i, 0) for the noise, two words
    each, and (0, 1) for the next key, all distinct, so that every output is
    independent. `vocab` is even (padded to a multiple of 64)."""
    words = jax.lax.bitcast_convert_type(key, jnp.uint32)
    k = (words[:, :1], words[:, 1:])
    bits = jnp.concatenate(threefry2x32(k, (jnp.arange(vocab // 2, dtype=jnp.uint32)[None],
                                            jnp.zeros((1, 1), jnp.uint32))), axis=1)
    next_key = jnp.concatenate(threefry2x32(k, (jnp.zeros((1, 1), jnp.uint32), jnp.ones((1, 1), jnp.uint32))),
                               axis=1)
    # The top 23 bits as a float in [1, 2), less 1: uniform on [0, 1).
    uniform = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    gumbel = -jnp.log(-jnp.log(jnp.maximum(uniform, jnp.finfo(jnp.float32).tiny)))
    return gumbel, jax.lax.bitcast_convert_type(next_key, jnp.int32)


THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(key, counter):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011, as jax.random's):
    two uint32 key words and two counter words -> two words of random bits.

    Unrolled here because JAX lowers its own for the CPU as a `fori_loop`,
    a `stablehlo.while` that IREE 3.13 runs on the host: one submission and
    one wait per round, every sampled step."""
    k0, k1 = key
    schedule = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = counter[0] + schedule[0], counter[1] + schedule[1]
    for i in range(5):
        for r in THREEFRY_ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))
            x1 = x1 ^ x0
        x0 = x0 + schedule[(i + 1) % 3]
        x1 = x1 + schedule[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def seeded_keys(seeds):
    """Per-row generator keys (B,2) from int32 seeds (B,), as the cache holds them."""
    keys = jax.vmap(lambda s: jax.random.key_data(jax.random.key(s, impl="threefry2x32")))(seeds)
    return jax.lax.bitcast_convert_type(keys, jnp.int32)


def started(cfg: GPT2Config, cache, seeds, rows):
    """`cache` with each row whose `rows` (B,) flag is set emptied: its K and V
    zero and its generator restarted at its seed (B,)."""
    flagged = rows != 0
    cleared = {name: jnp.where(flagged[:, None, None, None], jnp.zeros_like(cache[name]), cache[name])
               for name in kv_names(cfg)}
    return cache | cleared | {"key": jnp.where(flagged[:, None], seeded_keys(seeds), cache["key"])}


def _advanced(cache, on, token, logits, key):
    """The rows' last token, logits and generator after a step: the new
    values in the rows flagged `on` (B,), the cache's in the others."""
    new = {"token": token, "logits": logits, "key": key}
    return {name: jnp.where(on.reshape(-1, *(1,) * (value.ndim - 1)), value, cache[name])
            for name, value in new.items()}


def prefill(params, cfg: GPT2Config, shapes: Shapes, cache, chunk, lengths, starts, sampling):
    """Append a chunk to each row's sequence and pick the token after it.

    chunk (B,C) right-padded, lengths (B,) of its real tokens (0: the row is
    left as it was), starts (B scalars) where each row's chunk goes (its
    current length; 0 starts over). `sampling` is (temperature, top_k, top_p),
    one value per row. -> (cache, next token (B,)).

    A chunk's padding writes junk K/V past the row's end, where no query looks
    before decode overwrites it; the cache's slack keeps those writes in bounds.
    """
    C = chunk.shape[1]
    positions = jnp.stack(starts)[:, None] + jnp.arange(C)[None]  # (B,C)
    visible = jnp.arange(shapes.cache_len)[None, None] <= positions[:, :, None]  # (B,C,L)
    new = {}

    def attend(i, q, k, v):
        new[f"k.{i}"] = _write_rows(cache[f"k.{i}"], k, starts)
        new[f"v.{i}"] = _write_rows(cache[f"v.{i}"], v, starts)
        # The chunk's sum over the whole cache reads V head by head,
        # (B,H,L,Q): a batch of plain products. Over the cache's own layout
        # IREE 3.13's CPU code took 2.5x as long with a float16 cache (a 124M
        # prefill 181 -> 132 ms). Decode's one query keeps the cache's layout.
        weights = _attention_weights(q, new[f"k.{i}"], visible)
        return jnp.einsum("bhts,bhsq->bthq", weights, jnp.swapaxes(new[f"v.{i}"], 1, 2))

    x = _embed(params, chunk, jnp.minimum(positions, cfg.n_positions - 1))
    for i in range(cfg.n_layer):
        x = _block(params, i, cfg, x, attend)
    last = jax.nn.one_hot(jnp.maximum(lengths - 1, 0), C, dtype=x.dtype)
    logits = _logits(params, cfg, jnp.einsum("bc,bce->be", last, x)[:, None])[:, 0]
    token, key = sample(logits, cache["key"], *sampling)
    new |= _advanced(cache, lengths > 0, token, logits, key)
    return new, new["token"]


def decode(params, cfg: GPT2Config, shapes: Shapes, cache, window: int, active, positions, sampling):
    """One step: feed each row's last token at its position (`positions`, B
    scalars: the row's length), write its K/V, attend over the first `window`
    cache slots (static; every active row's position must be below it) and
    pick the next token: with `sampling` (per-row settings, as `sample` takes
    them), or greedily for every row when it is None. The greedy step leaves
    out the sampler and leaves the generators as they were: on the CPU the
    sampler's full-vocabulary passes were a sixth of a 124M step. Rows
    whose `active` (B,) is 0 keep their state; their K/V write lands past
    their sequence. -> (cache, token (B,))."""
    pos = jnp.stack(positions)
    visible = (jnp.arange(window)[None] <= pos[:, None])[:, None]  # (B,1,W)
    new = {}

    def attend(i, q, k, v):
        new[f"k.{i}"] = _write_rows(cache[f"k.{i}"], k, positions)
        new[f"v.{i}"] = _write_rows(cache[f"v.{i}"], v, positions)
        return _attend(q, new[f"k.{i}"][:, :window], new[f"v.{i}"][:, :window], visible)

    x = _embed(params, cache["token"][:, None], jnp.minimum(pos, cfg.n_positions - 1)[:, None])
    for i in range(cfg.n_layer):
        x = _block(params, i, cfg, x, attend)
    logits = _logits(params, cfg, x)[:, 0]
    token, key = (_greedy(logits).astype(jnp.int32), cache["key"]) if sampling is None else \
        sample(logits, cache["key"], *sampling)
    new |= _advanced(cache, active != 0, token, logits, key)
    return new, new["token"]


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


@jax.custom_vjp
def _cross_entropy(logits, target):
    """-log softmax(logits)[target] over the last axis; `target` holds token ids."""
    return _cross_entropy_forward(logits, target)[0]


def _is_target(logits, target):
    # Compared where it is used, never stored: a one-hot of the targets is
    # as large as the logits (25.7 MB at B=1, S=128).
    return jnp.arange(logits.shape[-1]) == target[..., None]


def _cross_entropy_forward(logits, target):
    top = jnp.max(logits, axis=-1, keepdims=True)
    log_total = jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1, keepdims=True)) + top
    picked = jnp.sum(jnp.where(_is_target(logits, target), logits, 0.0), axis=-1)
    return log_total[..., 0] - picked, (logits, log_total, target)


def _cross_entropy_backward(saved, grad):
    # softmax - one_hot in one pass over the logits, which differentiating
    # log_softmax took several logits-sized buffers for.
    logits, log_total, target = saved
    return (jnp.exp(logits - log_total) - _is_target(logits, target)) * grad[..., None], None


_cross_entropy.defvjp(_cross_entropy_forward, _cross_entropy_backward)


def loss_fn(params, cfg: GPT2Config, text, target, lengths):
    """Mean next-token cross-entropy over the first `lengths[b]` positions of each row."""
    nll = _cross_entropy(forward(params, cfg, text), target)
    valid = (jnp.arange(text.shape[1])[None] < lengths[:, None]).astype(nll.dtype)
    return jnp.sum(nll * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def train_step(params, opt_state, cfg: GPT2Config, optimizer: optax.GradientTransformation,
               text, target, lengths, learning_rate, network=lambda params: params):
    """One step of `optimizer` (a `make_optimizer`) on the trained `params` ->
    (params, opt_state, loss before the step). `network` maps them to the
    weights the model computes with: LoRA's adapters to the frozen base plus them."""
    loss, grads = jax.value_and_grad(lambda p: loss_fn(network(p), cfg, text, target, lengths))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    updates = jax.tree.map(lambda u: learning_rate * u, updates)
    return optax.apply_updates(params, updates), opt_state, loss
