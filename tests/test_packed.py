"""packed: the CPU's tiled weight layout, and its products as IREE compiles them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_iree import model, packed
from gpt2_iree.targets import TARGETS, compile_command


def test_tile_t_holds_rows_t_times_tile_on_each_with_its_columns_contiguous():
    w = np.arange(48 * 5, dtype=np.float32).reshape(48, 5)
    tiles = packed.pack(w)
    assert tiles.shape == (3, 5, packed.TILE) == packed.packed_shape(w.shape, w.dtype)
    np.testing.assert_array_equal(tiles[1, :, 3], w[packed.TILE + 3])
    np.testing.assert_array_equal(tiles[2, 4], w[2 * packed.TILE:, 4])
    np.testing.assert_array_equal(packed.unpack(tiles), w)


def test_an_int8_tile_holds_its_rows_columns_in_pairs():
    w = (np.arange(48 * 6) % 251 - 125).astype(np.int8).reshape(48, 6)
    tiles = packed.pack(w)
    assert tiles.shape == (3, 3, packed.TILE, packed.INT8_PAIR) == packed.packed_shape(w.shape, w.dtype)
    np.testing.assert_array_equal(tiles[1, 2, 3], w[packed.TILE + 3, 4:6])
    np.testing.assert_array_equal(packed.unpack(tiles), w)


def test_the_matrices_are_packed_where_their_rows_fill_tiles():
    assert packed.packable("h.0.attn.qkv_w", (96, 32)) and packed.packable("wte", (320, 32))
    assert not packed.packable("h.0.attn.qkv_b", (96,))
    assert not packed.packable("wpe", (128, 32))  # read by row only, never multiplied
    assert not packed.packable("h.0.mlp.in_w", (100, 32))
    assert not packed.packable("h.0.mlp.in_w", (96, 33))  # no whole pairs of int8 columns


def _compiled_product(product, x, w):
    """`product` (model.packed_times or packed_int8_times) exported by JAX for
    x and w's shapes, lowered as the CPU's export lowers it, compiled with the
    cpu target's generation flags: a function of numpy."""
    import iree.compiler
    import iree.runtime as rt

    lowered = jax.jit(product).lower(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, w)))
    text = packed.lowered(lowered.as_text(), model.PACKED_PRODUCTS)
    assert "linalg.mmt4d" in text
    flags = compile_command("iree-compile", TARGETS["cpu"], "-", "-", generation=True, packed=True)[2:-2]
    vmfb = iree.compiler.compile_str(text, input_type="stablehlo", extra_args=flags)
    return rt.load_vm_flatbuffer(vmfb, driver="local-task").main


@pytest.mark.parametrize("lead", [(1, 1), (1, 32), (3, 1), (2, 5)],
                         ids=["decode step", "prefill chunk", "batch of steps", "rows that fill no tile"])
def test_the_cpu_product_on_packed_weights_is_x_times_w_transposed(lead):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, 64)).astype(np.float32)
    w = (rng.standard_normal((48, 64)) * 0.1).astype(np.float16)
    got = np.asarray(_compiled_product(model.packed_times, x, packed.pack(w))(x, packed.pack(w)))
    expected = x @ w.astype(np.float32).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.packed_times(x, packed.pack(w))), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lead", [(1, 1), (1, 32), (2, 5)], ids=["decode step", "prefill chunk", "rows that fill no tile"])
def test_the_cpu_int8_product_on_packed_weights_sums_exactly(lead):
    rng = np.random.default_rng(2)
    x = rng.integers(-127, 128, (*lead, 64), dtype=np.int8)
    w = rng.integers(-127, 128, (48, 64), dtype=np.int8)
    got = np.asarray(_compiled_product(model.packed_int8_times, x, packed.pack(w))(x, packed.pack(w)))
    expected = x.astype(np.int32) @ w.astype(np.int32).T
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.asarray(model.packed_int8_times(x, packed.pack(w))), expected)


def test_lowering_a_module_without_the_product_says_so():
    text = jax.jit(lambda x: x + 1).lower(jax.ShapeDtypeStruct((2,), jnp.float32)).as_text()
    with pytest.raises(ValueError, match="no function of \\('packed_times',\\) to lower"):
        packed.lowered(text, ("packed_times",))


def test_the_gradient_through_a_packed_weight_is_the_plain_ones():
    # A LoRA build's adapters learn through its frozen base, packed on the CPU.
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    w = rng.standard_normal((48, 64)).astype(np.float16)

    def loss(x, weight):
        return jnp.sum(jnp.tanh(model._linear({"h.0.mlp.in_w": weight}, "h.0.mlp.in_w", x)))

    plain = jax.grad(loss)(x, jnp.asarray(w, jnp.float32))
    tiled = jax.grad(loss)(x, jnp.asarray(packed.pack(w)))
    np.testing.assert_allclose(np.asarray(tiled), np.asarray(plain), rtol=1e-5, atol=1e-6)
