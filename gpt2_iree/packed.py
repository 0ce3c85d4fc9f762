"""Matrices stored pre-packed for the CPU's matmul kernels, and the products that read them.

The CPU's generation module once stored its float16 weights as they are,
(out, in), and IREE's data tiling packed each one at load into tiles of
TILE output rows, the layout its kernels stream: a second copy of the
weights beside the mapped archive (600 MB peak for 124M against 372).
IREE 3.13's own way to pack at build time, `iree-encode-parameters`, is not
in the wheels, and its encoder packs each weight once per entry point.

So the export packs them: a matrix (out, in) is stored (out / TILE, in,
TILE), tile t holding rows t * TILE ... t * TILE + TILE - 1, each column of
the tile contiguous. `model.packed_times` multiplies by one, and JAX runs it
as written, an einsum over the tiles; in the CPU's export its body becomes
`linalg.mmt4d` (`lowered`), the op data tiling itself produces, which IREE
then compiles to the same kernels. Nothing is packed at load and the archive
is mapped as it is. A LoRA build's float16 base is stored the same way: its
module could not be data-tiled at all, and decoded on untiled products.
GPUs read the plain layout: data tiling doesn't apply there.
"""

from __future__ import annotations

import re

import numpy as np

# Output rows per tile: one AVX-512 vector of float32 (two of AVX2, four of NEON).
TILE = 16
# Rows of x per tile, where they fill one (a prefill chunk); else each row is its own.
ROW_TILE = 16


def packable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether weight `name` of float32 `shape` is stored packed: each block's
    matrices and the tied embedding, whose rows fill whole tiles."""
    return len(shape) == 2 and (name.endswith("_w") or name == "wte") and shape[0] % TILE == 0


def packed_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    out, inner = shape
    return out // TILE, inner, TILE


def pack(w: np.ndarray) -> np.ndarray:
    """(out, in) -> (out / TILE, in, TILE)."""
    out, inner = w.shape
    return np.ascontiguousarray(w.reshape(out // TILE, TILE, inner).transpose(0, 2, 1))


def unpack(packed: np.ndarray) -> np.ndarray:
    """(out / TILE, in, TILE) -> (out, in): `pack`'s inverse."""
    tiles, inner, tile = packed.shape
    return packed.transpose(0, 2, 1).reshape(tiles * tile, inner)


def lowered(module_text: str, function: str) -> str:
    """`module_text` with the body of every function named `function` (as the
    export renames JAX's functions, `<entry>$<function>`, or with JAX's `_N`
    suffix) replaced by its linalg.mmt4d form (`_mmt4d_body`)."""
    from iree.compiler import ir

    name = re.compile(rf"(.*\$)?{re.escape(function)}(_\d+)?")
    ctx = ir.Context()
    module = ir.Module.parse(module_text, ctx)
    replaced = 0
    for op in list(module.body.operations):
        sym = op.attributes["sym_name"] if "sym_name" in op.attributes else None
        if sym is None or not name.fullmatch(ir.StringAttr(sym).value):
            continue
        fn_type = ir.FunctionType(ir.TypeAttr(op.attributes["function_type"]).value)
        x, w = (ir.RankedTensorType(t) for t in fn_type.inputs)
        body = _mmt4d_body(ir.StringAttr(sym).value, x.shape, w.shape)
        parsed = ir.Module.parse(body, ctx)  # kept alive until its function has moved out
        parsed.body.operations[0].move_before(op)
        op.erase()
        replaced += 1
    if not replaced:
        raise ValueError(f"no function {function!r} to lower: does the module read packed weights?")
    return str(module)


def _mmt4d_body(name: str, x_shape: list[int], w_shape: list[int]) -> str:
    """A private function: x (..., in) float32 times a packed float16 weight
    (out / TILE, in, TILE) -> (..., out) float32, as linalg.mmt4d. Its rows
    are packed by ROW_TILE where they fill whole tiles (a prefill chunk), else
    one by one (a decode step), tile shapes IREE's CPU kernels take; the
    weight is widened inside the product, never materialised in float32."""
    *lead, inner = x_shape
    tiles, _, tile = w_shape
    rows, out = int(np.prod(lead)), tiles * tile
    row_tile = ROW_TILE if rows % ROW_TILE == 0 else 1
    row_tiles = rows // row_tile
    x_t = f"tensor<{'x'.join(map(str, x_shape))}xf32>"
    w_t = f"tensor<{tiles}x{inner}x{tile}xf16>"
    r_t = f"tensor<{'x'.join(map(str, [*lead, out]))}xf32>"
    xp_t = f"tensor<{row_tiles}x{inner}x{row_tile}x1xf32>"
    w4_t = f"tensor<{tiles}x{inner}x{tile}x1xf16>"
    wf_t = f"tensor<{tiles}x{inner}x{tile}x1xf32>"
    acc_t = f"tensor<{row_tiles}x{tiles}x{row_tile}x{tile}xf32>"
    identity = "affine_map<(a, b, c, d) -> (a, b, c, d)>"
    return f"""
func.func private @"{name}"(%x: {x_t}, %w: {w_t}) -> {r_t} {{
  {_reshaped("%rows", "%x", x_t, f"tensor<{rows}x{inner}xf32>", len(lead))}
  %xp_init = tensor.empty() : {xp_t}
  %xp = linalg.pack %rows inner_dims_pos = [0, 1] inner_tiles = [{row_tile}, 1] into %xp_init
      : tensor<{rows}x{inner}xf32> -> {xp_t}
  %w4 = tensor.expand_shape %w [[0], [1], [2, 3]] output_shape [{tiles}, {inner}, {tile}, 1] : {w_t} into {w4_t}
  %wf_init = tensor.empty() : {wf_t}
  %wf = linalg.generic {{indexing_maps = [{identity}, {identity}],
                        iterator_types = ["parallel", "parallel", "parallel", "parallel"]}}
      ins(%w4 : {w4_t}) outs(%wf_init : {wf_t}) {{
  ^bb0(%h: f16, %unused: f32):
    %f = arith.extf %h : f16 to f32
    linalg.yield %f : f32
  }} -> {wf_t}
  %zero = arith.constant 0.0 : f32
  %acc_init = tensor.empty() : {acc_t}
  %acc0 = linalg.fill ins(%zero : f32) outs(%acc_init : {acc_t}) -> {acc_t}
  %acc = linalg.mmt4d ins(%xp, %wf : {xp_t}, {wf_t}) outs(%acc0 : {acc_t}) -> {acc_t}
  %y_init = tensor.empty() : tensor<{rows}x{out}xf32>
  %y = linalg.unpack %acc inner_dims_pos = [0, 1] inner_tiles = [{row_tile}, {tile}] into %y_init
      : {acc_t} -> tensor<{rows}x{out}xf32>
  {_reshaped("%r", "%y", f"tensor<{rows}x{out}xf32>", r_t, len(lead), [*lead, out])}
  return %r : {r_t}
}}
"""


def _reshaped(result: str, value: str, from_t: str, to_t: str, lead: int, expanded_shape: list[int] | None = None) -> str:
    """`result` = `value` with its `lead` leading dims collapsed into one, or,
    given the `expanded_shape`, expanded back out of it. One leading dim
    needs neither: the cast only renames the value."""
    groups = f"[[{', '.join(map(str, range(lead)))}], [{lead}]]"
    if lead == 1:
        return f"{result} = tensor.cast {value} : {from_t} to {to_t}"
    if expanded_shape is None:
        return f"{result} = tensor.collapse_shape {value} {groups} : {from_t} into {to_t}"
    return (f"{result} = tensor.expand_shape {value} {groups} output_shape [{', '.join(map(str, expanded_shape))}]"
            f" : {from_t} into {to_t}")
