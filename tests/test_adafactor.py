"""adafactor: the same steps and state as optax.adafactor, for every kind of weight."""

import jax
import numpy as np
import optax
import pytest

from gpt2_iree import adafactor

SHAPES = {
    "wide": (160, 300),  # factored; v_row runs along axis 0
    "tall": (300, 160),  # factored; v_row runs along axis 1
    "square": (192, 192),  # factored; a tie, broken as optax breaks it
    "narrow": (100, 300),  # a dim under 128: kept whole
    "bias": (300,),
}


def _tree(rng, scale):
    return {name: (scale * rng.standard_normal(shape)).astype(np.float32) for name, shape in SHAPES.items()}


def test_matches_optax_step_for_step():
    steps = 3
    rng = np.random.default_rng(0)
    params = _tree(rng, 0.05)
    ours, theirs = adafactor.adafactor(), optax.adafactor(learning_rate=1.0)
    state_ours, state_theirs = ours.init(params), theirs.init(params)
    update_ours, update_theirs = jax.jit(ours.update), jax.jit(theirs.update)
    for _ in range(steps):
        grads = _tree(rng, 1e-3)
        u_ours, state_ours = update_ours(grads, state_ours, params)
        u_theirs, state_theirs = update_theirs(grads, state_theirs, params)
        for name in SHAPES:
            np.testing.assert_allclose(u_ours[name], u_theirs[name], rtol=1e-5, atol=1e-9, err_msg=name)
        for ours_leaf, theirs_leaf in zip(jax.tree.leaves(state_ours), jax.tree.leaves(state_theirs), strict=True):
            np.testing.assert_allclose(ours_leaf, theirs_leaf, rtol=1e-5)
        params = optax.apply_updates(params, u_theirs)
    assert int(state_ours[0].count) == steps


def test_a_weight_optax_would_factor_over_more_than_two_dims_is_refused():
    params = {"w": np.zeros((2, 128, 128), np.float32)}
    opt = adafactor.adafactor()
    with pytest.raises(ValueError, match=r"shape \(2, 128, 128\).*matrices only"):
        opt.update(params, opt.init(params), params)
