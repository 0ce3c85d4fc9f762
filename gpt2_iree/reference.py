"""The module's generation entry points, run by JAX: the reference that verify and bench drive.

`JaxReference` has the methods of module.Module that generation.Rows calls
(prefill, decode, seed, get_state) and runs model.py's functions with
`jax.jit`, so the same host logic drives the compiled module and JAX.
"""

from __future__ import annotations

import numpy as np


class JaxReference:
    """prefill, decode, seed and get_state of a module with `manifest`, run by
    JAX on `params` (a dict of arrays, as the module's weights), with K and V
    kept in `cache_dtype` (the module's `Module.cache_dtype`)."""

    def __init__(self, manifest: dict, params: dict, cache_dtype: np.dtype, prompt_len: int | None = None):
        import dataclasses

        import jax

        from gpt2_iree import model

        cfg, shapes = model.GPT2Config(**manifest["config"]), model.Shapes(**manifest["shapes"])
        if prompt_len:  # another prefill chunk than the module's: JAX prefills a long prompt in one call
            shapes = dataclasses.replace(shapes, prompt_len=prompt_len)
            manifest = manifest | {"shapes": dataclasses.asdict(shapes), "decode_windows": list(shapes.decode_windows)}
        self.manifest, self.params = manifest, params
        self.cache = model.empty_cache(cfg, shapes, cache_dtype)
        self._prefill = jax.jit(lambda p, c, x, n, s, t: model.prefill(p, cfg, shapes, c, x, n, s, t))
        self._decode = jax.jit(lambda p, c, w, a, s, t: model.decode(p, cfg, shapes, c, w, a, s, t),
                               static_argnums=2)
        self._started = jax.jit(lambda c, s, r: model.started(cfg, c, s, r))

    def prefill(self, chunk, lengths, starts, sampling):
        self.cache, token = self._prefill(self.params, self.cache, chunk, lengths, _scalars(starts), sampling)
        return np.asarray(token)

    def decode(self, window, active, positions, sampling):
        self.cache, token = self._decode(self.params, self.cache, window, active, _scalars(positions), sampling)
        return np.asarray(token)

    def seed(self, seeds, rows):
        self.cache = self._started(self.cache, seeds, rows)

    def get_state(self):
        return {name: np.asarray(value) for name, value in self.cache.items()}


def _scalars(positions) -> tuple[np.ndarray, ...]:
    """One int32 scalar per row, as model.py takes positions (the module, by value)."""
    return tuple(np.int32(p) for p in positions)
