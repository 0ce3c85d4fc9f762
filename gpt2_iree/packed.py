"""Matrices stored pre-packed for the CPU's matmul kernels, and the products that read them.

The CPU's generation module once stored its float16 weights as they are,
(out, in), and IREE's data tiling packed each one at load into tiles of
TILE output rows, the layout its kernels stream: a second copy of the
weights beside the mapped archive (600 MB peak for 124M against 372).
IREE 3.13's own way to pack at build time, `iree-encode-parameters`, is not
in the wheels, and its encoder packs each weight once per entry point.

So the export packs them: a float16 matrix (out, in) is stored (out /
TILE, in, TILE), tile t holding rows t * TILE ... t * TILE + TILE - 1, each
column of the tile contiguous; an int8 one (out / TILE, in / INT8_PAIR,
TILE, INT8_PAIR), its columns in pairs. `model.packed_times` and
`model.packed_int8_times` multiply by one, and JAX runs them as written,
einsums over the tiles; in the CPU's export their bodies become
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
# int8 columns per tile: the pairs that AVX-512 VNNI's int8 dot product sums
# into each int32 lane, the tile IREE's data tiling gives int8 on this CPU.
INT8_PAIR = 2


def packable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether weight `name` of float32 `shape` is stored packed: each block's
    matrices and the tied embedding, whose rows fill whole tiles (and
    columns whole pairs, for int8)."""
    return (len(shape) == 2 and (name.endswith("_w") or name == "wte") and shape[0] % TILE == 0
            and shape[1] % INT8_PAIR == 0)


def packed_shape(shape: tuple[int, ...], dtype: np.dtype) -> tuple[int, ...]:
    out, inner = shape
    if dtype == np.int8:
        return out // TILE, inner // INT8_PAIR, TILE, INT8_PAIR
    return out // TILE, inner, TILE


def pack(w: np.ndarray) -> np.ndarray:
    """(out, in) -> (out / TILE, in, TILE), or for int8 (out / TILE, in /
    INT8_PAIR, TILE, INT8_PAIR)."""
    out, inner = w.shape
    if w.dtype == np.int8:
        return np.ascontiguousarray(w.reshape(out // TILE, TILE, inner // INT8_PAIR, INT8_PAIR).transpose(0, 2, 1, 3))
    return np.ascontiguousarray(w.reshape(out // TILE, TILE, inner).transpose(0, 2, 1))


def unpack(packed):
    """`pack`'s inverse: (out, in). numpy arrays or JAX's."""
    if packed.ndim == 4:
        tiles, pairs, tile, pair = packed.shape
        return packed.transpose(0, 2, 1, 3).reshape(tiles * tile, pairs * pair)
    tiles, inner, tile = packed.shape
    return packed.transpose(0, 2, 1).reshape(tiles * tile, inner)


def lowered(module_text: str, functions: tuple[str, ...]) -> str:
    """`module_text` with the body of every function named one of `functions`
    (as the export renames JAX's functions, `<entry>$<function>`, or with
    JAX's `_N` suffix) replaced by its linalg.mmt4d form (`_mmt4d_body`)."""
    from iree.compiler import ir

    name = re.compile(rf"(.*\$)?({'|'.join(map(re.escape, functions))})(_\d+)?")
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
        raise ValueError(f"no function of {functions} to lower: does the module read packed weights?")
    return str(module)


def _mmt4d_body(name: str, x_shape: list[int], w_shape: list[int]) -> str:
    """A private function, as linalg.mmt4d: x (..., in) float32 times a packed
    float16 weight (out / TILE, in, TILE) -> (..., out) float32, the weight
    widened inside the product, never materialised in float32; or int8 x
    times a packed int8 weight (out / TILE, in / INT8_PAIR, TILE, INT8_PAIR)
    -> int32, which mmt4d sign-extends. x's rows are packed by ROW_TILE
    where they fill whole tiles (a prefill chunk), else one by one (a decode
    step), tile shapes IREE's CPU kernels take."""
    *lead, inner = x_shape
    int8 = len(w_shape) == 4
    tiles, tile = w_shape[0], w_shape[2]
    pair = w_shape[3] if int8 else 1
    x_type, w_type, acc_type, zero = ("i8", "i8", "i32", "0") if int8 else ("f32", "f16", "f32", "0.0")
    rows, out = int(np.prod(lead)), tiles * tile
    row_tile = ROW_TILE if rows % ROW_TILE == 0 else 1
    row_tiles = rows // row_tile
    x_t = f"tensor<{'x'.join(map(str, x_shape))}x{x_type}>"
    w_t = f"tensor<{'x'.join(map(str, w_shape))}x{w_type}>"
    r_t = f"tensor<{'x'.join(map(str, [*lead, out]))}x{acc_type}>"
    xp_t = f"tensor<{row_tiles}x{inner // pair}x{row_tile}x{pair}x{x_type}>"
    acc_t = f"tensor<{row_tiles}x{tiles}x{row_tile}x{tile}x{acc_type}>"
    if int8:
        operand, operand_t, widened = "%w", w_t, ""
    else:
        w4_t, operand_t = (f"tensor<{tiles}x{inner}x{tile}x1x{t}>" for t in ("f16", "f32"))
        identity = "affine_map<(a, b, c, d) -> (a, b, c, d)>"
        operand, widened = "%wf", f"""
  %w4 = tensor.expand_shape %w [[0], [1], [2, 3]] output_shape [{tiles}, {inner}, {tile}, 1] : {w_t} into {w4_t}
  %wf_init = tensor.empty() : {operand_t}
  %wf = linalg.generic {{indexing_maps = [{identity}, {identity}],
                        iterator_types = ["parallel", "parallel", "parallel", "parallel"]}}
      ins(%w4 : {w4_t}) outs(%wf_init : {operand_t}) {{
  ^bb0(%h: f16, %unused: f32):
    %f = arith.extf %h : f16 to f32
    linalg.yield %f : f32
  }} -> {operand_t}"""
    return f"""
func.func private @"{name}"(%x: {x_t}, %w: {w_t}) -> {r_t} {{
  {_reshaped("%rows", "%x", x_t, f"tensor<{rows}x{inner}x{x_type}>", len(lead))}
  %xp_init = tensor.empty() : {xp_t}
  %xp = linalg.pack %rows inner_dims_pos = [0, 1] inner_tiles = [{row_tile}, {pair}] into %xp_init
      : tensor<{rows}x{inner}x{x_type}> -> {xp_t}{widened}
  %zero = arith.constant {zero} : {acc_type}
  %acc_init = tensor.empty() : {acc_t}
  %acc0 = linalg.fill ins(%zero : {acc_type}) outs(%acc_init : {acc_t}) -> {acc_t}
  %acc = linalg.mmt4d ins(%xp, {operand} : {xp_t}, {operand_t}) outs(%acc0 : {acc_t}) -> {acc_t}
  %y_init = tensor.empty() : tensor<{rows}x{out}x{acc_type}>
  %y = linalg.unpack %acc inner_dims_pos = [0, 1] inner_tiles = [{row_tile}, {tile}] into %y_init
      : {acc_t} -> tensor<{rows}x{out}x{acc_type}>
  {_reshaped("%r", "%y", f"tensor<{rows}x{out}x{acc_type}>", r_t, len(lead), [*lead, out])}
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
