"""The generation module's weights, made from float32 ones: float16, or int8 (doit's `generate_weights=`).

A LoRA build's frozen base is stored the same way: its one module generates
on it and tunes its adapters on it (`model._int8_times` has a gradient for x).

int8 stores every matmul weight (each block's 2-D `*_w` and the tied
embedding `wte`) as symmetric int8 with one float16 scale per output row,
`name + INT8_SCALE`; biases, norms and positions stay float16. A scale
per row, not per group of 32 along the contraction: `model._int8_times`
quantizes each token's activations to int8 as well and runs one
int8 x int8 -> int32 product, which a scale per group would split into a
product per group (docs/PERFORMANCE.md, "8-bit weights").

The archive stays float32 and the export writes the converted weights into
the generation module's own archive, as the runtime converts tuned weights
into its arena, tensor by tensor (`entry`), with no float32 copy beside them.

`packed`: matrices stored in the CPU's tiles (packed.py), as the CPU's
generation module, or a LoRA build's module there, reads them. A packed
LoRA base (`lora_base`) stores the tied embedding plain as well (PLAIN_WTE).
"""

from __future__ import annotations

import numpy as np

from gpt2_iree import packed as packing

FORMATS = ("float16", "int8")
# An int8 weight `name` (out, in) has its scales in entry `name + INT8_SCALE`.
# Defined here, not in model.py, so that the runtime reads a generation
# module's weights without importing JAX (125 MB resident and ~2 s).
INT8_SCALE = ".int8_scale"
# A LoRA step's gradient for x through the LM head reads `wte` as (in, out):
# from the tiles, IREE transposes a whole copy (77 MB of float16 for 124M),
# which lives across the step's peak. So a packed LoRA base also stores
# `wte` plain, which a step reads (`computed(..., step=True)`: its rows and
# model._frozen_lm_head) and generation does not: a process touches the copy
# it uses, as the pages of a mapped archive count only once read.
PLAIN_WTE = "wte.plain"
FLOAT16 = np.dtype("float16")
INT8 = np.dtype("int8")


def of_build(manifest: dict) -> str:
    """The format of what a build generates with: its generation module's
    weights, or a LoRA build's frozen base (which its one module also tunes on)."""
    return (manifest["base"] if "base" in manifest else manifest["generate"])["weights_dtype"]


def as_read_by(stored: dict, packed_weights: bool) -> dict:
    """A manifest's entry for constant weights ("generate", or a LoRA build's
    "base") as a target's module reads them: a target with `packed_weights`
    (targets.Target) gets the packed module's mlir, archive and source
    digest where the build has one. "packed" says which it got."""
    if packed_weights and "packed" in stored:
        return stored | stored["packed"] | {"packed": True}
    return stored | {"packed": False}


def _quantized(name: str, shape: tuple[int, ...], weights_format: str) -> bool:
    return weights_format == "int8" and len(shape) == 2 and (name.endswith("_w") or name == "wte")


def _packed(name: str, shape: tuple[int, ...], packed: bool) -> bool:
    return packed and packing.packable(name, shape)


def layout(shapes: dict[str, tuple[int, ...]], weights_format: str, packed: bool = False,
           lora_base: bool = False) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every entry the generation module reads, or
    with `lora_base` a LoRA build's module, for float32 weights of `shapes`."""
    out = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        dtype = INT8 if _quantized(name, shape, weights_format) else FLOAT16
        out[name] = (packing.packed_shape(shape, dtype) if _packed(name, shape, packed) else shape, dtype)
        if dtype == INT8:
            out[name + INT8_SCALE] = ((shape[0],), FLOAT16)
    if lora_base and _packed("wte", tuple(shapes["wte"]), packed):
        out[PLAIN_WTE] = (tuple(shapes["wte"]), FLOAT16)
    return out


def _row_scales(w: np.ndarray) -> np.ndarray:
    """Each row's largest magnitude over 127, float16; 1 for a row of zeros
    (the padded vocabulary's), which then stays zero."""
    largest = np.abs(w).max(axis=1)
    return np.where(largest > 0, largest / 127, 1).astype(FLOAT16)


def entry(weights: dict[str, np.ndarray], name: str, weights_format: str, packed: bool = False) -> np.ndarray:
    """Entry `name` of `layout`, made from the float32 `weights`. A weight is
    quantized with its float16-rounded scales, so that q * scale is what it
    was rounded to."""
    if name.endswith(INT8_SCALE):
        return _row_scales(weights[name.removesuffix(INT8_SCALE)])
    if name == PLAIN_WTE:
        return weights["wte"].astype(FLOAT16)
    w = weights[name]
    if _quantized(name, w.shape, weights_format):
        scale = _row_scales(w).astype(np.float32)[:, None]
        stored = np.clip(np.rint(w / scale), -127, 127).astype(INT8)
    else:
        stored = w.astype(FLOAT16)
    return packing.pack(stored) if _packed(name, w.shape, packed) else stored


def converted(weights: dict[str, np.ndarray], weights_format: str, packed: bool = False,
              lora_base: bool = False) -> dict[str, np.ndarray]:
    """All of `layout`'s entries for `weights`, as the generation archive (or
    with `lora_base` a LoRA build's base) holds them."""
    shapes = {name: w.shape for name, w in weights.items()}
    return {name: entry(weights, name, weights_format, packed)
            for name in layout(shapes, weights_format, packed, lora_base)}


def computed(stored: dict[str, np.ndarray], step: bool = False) -> dict[str, np.ndarray]:
    """What the module computes with, from what it stores: int8 as it is, a
    packed matrix as it is (`model.packed_times` widens it inside the
    product), other float16 widened to float32; PLAIN_WTE, float16 as
    well, only for a fine-tuning `step`. numpy arrays (the weights a JAX reference
    runs on) or JAX's traced ones (the export's entry points)."""
    return {name: w if w.dtype == INT8 or w.ndim > 2 or name == PLAIN_WTE else w.astype(np.float32)
            for name, w in stored.items() if step or name != PLAIN_WTE}


def unpacked(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the module stores, each packed matrix back in its plain layout
    (and PLAIN_WTE, the same as `wte` so, left out)."""
    return {name: packing.unpack(w) if w.ndim > 2 else w for name, w in stored.items() if name != PLAIN_WTE}


def widened(stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 weights from what the module stores: int8 times its scales,
    float16 widened (and unpacked); the weights a float32 module would
    compute the same with."""
    def float32(name: str, w: np.ndarray) -> np.ndarray:
        if name + INT8_SCALE in stored:
            return w.astype(np.float32) * stored[name + INT8_SCALE].astype(np.float32)[:, None]
        return w.astype(np.float32)
    stored = unpacked(stored)
    return {name: float32(name, w) for name, w in stored.items() if not name.endswith(INT8_SCALE)}
