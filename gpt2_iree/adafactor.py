"""Adafactor as `optax.adafactor(learning_rate=1.0)` computes it, written so IREE
reads each weight as few times as it can.

The math and the state are optax's: second moments factored into a row and a
column mean for matrices whose two dims are both >= 128 (whole otherwise),
decay 1 - t^-0.8, eps 1e-30 added to g², the update clipped to RMS 1 per
weight and scaled by the weight's RMS (at least 1e-3). `init` *is* optax's.
tests/test_adafactor.py holds the update to optax's.

The optimizer step is memory-bound (every weight, gradient and statistic is
streamed), and written as optax writes it IREE 3.13 streams about twice what it
needs to (GPT-2 124M on 2 cores: 405 vs 190 ms per update), for two reasons:

* A mean over a whole matrix is one reduction of millions of elements. IREE
  runs it on one thread, or, with split reduction, fuses its last stage into
  the kernel that uses the mean (the weight update), which then runs on one
  thread. Here such a mean is a mean of row sums: parallel over rows.
* A value that two kernels read is stored to memory and read back, for `wte`
  154 MB each way: optax's update `u = g·r·c` (read by the clipping RMS and by
  the weight update) and `g² + eps` (read by both statistics). Here each kernel
  computes what it needs from `g`: the clipping RMS as Σ_i c_i² Σ_j (g_ij r_j)²,
  the update as g·(c ⊗ r), and the two statistics from g·g and |g|·|g|, which
  are equal but are not merged into one stored tensor.
* A mean over axis 0 (down the columns) runs with each thread reading a strip
  of columns from every row: `wte`'s 154 MB at 7 GB/s. Here it sums blocks of
  COLUMN_BLOCK rows first, then the blocks' sums: 16 GB/s.

Sums come out in a different order than optax's, so results agree to rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

DECAY_EXPONENT = 0.8
EPS = 1e-30
MIN_DIM_TO_FACTOR = 128
MIN_PARAM_RMS = 1e-3
COLUMN_BLOCK = 16


def adafactor() -> optax.GradientTransformation:
    """Adafactor at learning rate 1: `update` returns the step to add, unscaled."""
    return optax.GradientTransformation(optax.adafactor(learning_rate=1.0).init, _update)


def _row_axis(shape) -> int | None:
    """The axis that optax's `v_row` runs along, or None for a weight kept whole.

    optax means g² over the largest dim into `v_row` and over the other into
    `v_col`; a tie (a square matrix) makes axis 1 the largest, as argsort does.
    """
    if len(shape) < 2 or sorted(shape)[-2] < MIN_DIM_TO_FACTOR:
        return None
    if len(shape) > 2:
        raise ValueError(f"a weight of shape {tuple(shape)}: adafactor.py factors matrices only "
                         f"(optax.adafactor would factor its two largest dims)")
    return int(np.argsort(shape)[0])


def _mean_square(x):
    """mean(x²), as a mean of row sums where x is a matrix (see the module doc)."""
    if x.ndim < 2:
        return jnp.mean(x * x)
    return jnp.sum(jnp.sum(x * x, axis=1)) / x.size


def _column_sums(x):
    """x's sums over axis 0: by blocks of COLUMN_BLOCK rows, then over the
    blocks, where the rows divide into them (see the module doc)."""
    rows = x.shape[0]
    if rows % COLUMN_BLOCK:
        return jnp.sum(x, axis=0)
    return jnp.sum(jnp.sum(x.reshape(rows // COLUMN_BLOCK, COLUMN_BLOCK, -1), axis=1), axis=0)


def _update(grads, state, params):
    factored_state = state[0]
    t = jnp.asarray(factored_state.count + 1, jnp.float32)
    decay = 1.0 - t ** (-DECAY_EXPONENT)

    def leaf(g, v_row, v_col, v, p):
        """(update, v_row, v_col, v) of one weight."""
        row_axis = _row_axis(g.shape)
        if row_axis is None:
            v = decay * v + (1.0 - decay) * (g * g + EPS)
            update = g * jax.lax.rsqrt(v)
            update_ms = _mean_square(update)
        else:
            # The statistic indexed by axis 0 (mean over axis 1) and by axis 1.
            by_axis0 = jnp.mean(g * g + EPS, axis=1)
            by_axis1 = _column_sums(jnp.abs(g) * jnp.abs(g) + EPS) / g.shape[0]
            row_stat, col_stat = (by_axis0, by_axis1) if row_axis == 0 else (by_axis1, by_axis0)
            v_row = decay * v_row + (1.0 - decay) * row_stat
            v_col = decay * v_col + (1.0 - decay) * col_stat
            row_factor = jax.lax.rsqrt(v_row / jnp.mean(v_row))
            col_factor = jax.lax.rsqrt(v_col)
            f0, f1 = (row_factor, col_factor) if row_axis == 0 else (col_factor, row_factor)
            update_ms = jnp.sum(jnp.sum(jnp.square(g * f1[None, :]), axis=1) * (f0 * f0)) / g.size
            update = g * (f0[:, None] * f1[None, :])
        clip = jnp.maximum(1.0, jnp.sqrt(update_ms))
        scale = jnp.maximum(jnp.sqrt(_mean_square(p)), MIN_PARAM_RMS)
        return -scale / clip * update, v_row, v_col, v

    treedef = jax.tree.structure(grads)
    results = [leaf(*xs) for xs in zip(jax.tree.leaves(grads), jax.tree.leaves(factored_state.v_row),
                                       jax.tree.leaves(factored_state.v_col), jax.tree.leaves(factored_state.v),
                                       jax.tree.leaves(params))]
    updates, v_rows, v_cols, vs = (jax.tree.unflatten(treedef, list(xs)) for xs in zip(*results))
    new_state = optax.FactoredState(count=optax.safe_increment(factored_state.count),
                                    v_row=v_rows, v_col=v_cols, v=vs)
    return updates, (new_state, *state[1:])
