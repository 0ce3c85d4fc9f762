"""generate_weights: the generation module's float16 and int8 weights, made from float32 ones."""

import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_iree import generate_weights, model, models

TINY = model.GPT2Config(**models.TINY_SHAPE)


@pytest.fixture(scope="module")
def params():
    return {k: np.asarray(v) for k, v in model.init_params(TINY).items()}


def test_int8_stores_every_matmul_weight_in_a_byte_with_a_scale_per_output_row(params):
    stored = generate_weights.converted(params, "int8")
    int8 = {name for name, w in stored.items() if w.dtype == np.int8}
    assert int8 == {name for name in params if name == "wte" or name.endswith("_w")}
    for name in int8:
        assert stored[name + generate_weights.INT8_SCALE].shape == (params[name].shape[0],)
        assert stored[name + generate_weights.INT8_SCALE].dtype == np.float16
    assert all(stored[name].dtype == np.float16 for name in params if name not in int8)
    # Little more than half of float16's bytes: tiny's float16 positions are 6 % of them.
    half = sum(w.nbytes for w in generate_weights.converted(params, "float16").values())
    assert sum(w.nbytes for w in stored.values()) < 0.6 * half


def test_the_layout_is_what_the_conversion_writes(params):
    for weights_format in generate_weights.FORMATS:
        for packed in (False, True):
            for lora_base in (False, True):
                stored = generate_weights.converted(params, weights_format, packed, lora_base)
                layout = generate_weights.layout({k: v.shape for k, v in params.items()}, weights_format, packed,
                                                 lora_base)
                assert {name: (w.shape, w.dtype) for name, w in stored.items()} == layout


def test_only_a_packed_lora_base_stores_the_embedding_plain_too_and_only_a_step_reads_it(params):
    assert generate_weights.PLAIN_WTE not in generate_weights.converted(params, "float16", lora_base=True)
    assert generate_weights.PLAIN_WTE not in generate_weights.converted(params, "float16", packed=True)
    stored = generate_weights.converted(params, "float16", packed=True, lora_base=True)
    assert generate_weights.PLAIN_WTE not in generate_weights.computed(stored)
    np.testing.assert_array_equal(generate_weights.computed(stored, step=True)[generate_weights.PLAIN_WTE],
                                  generate_weights.unpacked(stored)["wte"])


@pytest.mark.parametrize("weights_format,tile_rank", [("float16", 3), ("int8", 4)])
def test_packed_weights_store_the_matrices_in_tiles_and_the_same_numbers(params, weights_format, tile_rank):
    plain = generate_weights.converted(params, weights_format)
    stored = generate_weights.converted(params, weights_format, packed=True)
    assert {name for name, w in stored.items() if w.ndim == tile_rank} == \
        {name for name in params if name == "wte" or name.endswith("_w")}
    widened = generate_weights.widened(stored)
    for name, w in generate_weights.widened(plain).items():
        np.testing.assert_array_equal(widened[name], w, err_msg=name)


@pytest.mark.parametrize("weights_format", generate_weights.FORMATS)
def test_a_packed_weight_computes_what_the_plain_one_does(params, weights_format):
    """model.py on packed weights (the JAX side of the CPU's module: its
    products and the embedding's rows) against the plain layout."""
    tokens = jnp.asarray([[1, 17, 40, 255]], jnp.int32)
    logits = {packed: model.forward({k: jnp.asarray(v) for k, v in generate_weights.computed(
        generate_weights.converted(params, weights_format, packed)).items()}, TINY, tokens)[0]
        for packed in (False, True)}
    np.testing.assert_allclose(np.asarray(logits[True]), np.asarray(logits[False]), rtol=1e-5, atol=1e-5)


def test_an_int8_weight_is_within_half_a_step_of_the_float32_one(params):
    w = params["h.0.mlp.in_w"]
    stored = generate_weights.converted(params, "int8")
    scale = stored["h.0.mlp.in_w" + generate_weights.INT8_SCALE].astype(np.float32)[:, None]
    assert np.all(np.abs(stored["h.0.mlp.in_w"].astype(np.float32) * scale - w) <= scale / 2 * 1.001)
    # Every row uses the whole range: its largest weight is +-127.
    assert np.all(np.abs(stored["h.0.mlp.in_w"]).max(axis=1) == 127)


def test_the_padded_vocabulary_stays_zero(params):
    stored = generate_weights.converted(params, "int8")
    assert not stored["wte"][TINY.vocab_size:].any()
    assert np.all(np.isfinite(generate_weights.widened(stored)["wte"]))


def test_converting_what_the_module_holds_again_changes_nothing(params):
    """After fine-tuning, the runtime reopens the generation module on weights
    read back from a module; a generation module's own weights, widened and
    converted again, must be the same bytes."""
    stored = generate_weights.converted(params, "int8")
    again = generate_weights.converted(generate_weights.widened(stored), "int8")
    for name, w in stored.items():
        np.testing.assert_array_equal(again[name], w, err_msg=name)


def test_an_int8_projection_stays_close_to_the_float32_one():
    """The whole int8 product, activations quantized per token too, against
    float32 numpy on GPT-2-like numbers: each of the two quantizations adds
    about 0.8 % of noise (a step of 1/127 of the row's largest value)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 768)).astype(np.float32)
    w = (rng.standard_normal((3072, 768)) * 0.02).astype(np.float32)
    stored = generate_weights.converted({"h.0.mlp.in_w": w}, "int8")
    weights = {k: jnp.asarray(v) for k, v in generate_weights.computed(stored).items()}
    got = np.asarray(model._linear(weights, "h.0.mlp.in_w", jnp.asarray(x)))
    expected = x @ w.T
    error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert 5e-3 < error < 2e-2
