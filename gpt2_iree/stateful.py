"""Pure JAX functions -> one IREE module whose state lives in globals.

iree-jax's `Program` API no longer runs on current JAX, and this is all of it
that we need: each entry point is lowered by `jax.jit(...).lower()` to
StableHLO text, its functions are renamed `<entry>$<name>` (JAX's private
helpers such as `@_where` collide across entries), and a public wrapper per
entry loads the state it reads from `util.global`s, calls the lowered body and
stores the state it writes. Parameters are globals initialised from a named
parameter archive (`#flow.parameter.named<"model"::"key">`), so the weights
ship in a `.irpa` beside the module instead of inside it. State that no entry
writes is constant, which lets IREE prepare it once, at load. State given only
by its shape and dtype starts uninitialised: IREE allocates it and writes
nothing, so its pages cost no memory until an entry writes them.

Every public function carries the module's source digest (`source_digest`)
in its reflection, which a compiled module keeps: the runtime compares it
with the manifest's, and so refuses a module compiled from another export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Callable

import jax
import numpy as np

from gpt2_iree.archive import PARAMETER_SCOPE
from gpt2_iree.inspection import SOURCE_DIGEST_KEY

_MLIR_TYPES = {
    np.dtype("float32"): "f32",
    np.dtype("float16"): "f16",
    np.dtype("int8"): "i8",
    np.dtype("int32"): "i32",
    np.dtype("int64"): "i64",
    np.dtype("bool"): "i1",
}


# What stands in the digest's place while the text is hashed.
_UNHASHED = f'{SOURCE_DIGEST_KEY} = "{"-" * 16}"'


@dataclasses.dataclass(frozen=True)
class Entry:
    """A public function of the module.

    `fn(*read_groups, *args)` returns `(written_groups, result)`: `read_groups`
    are the state groups named in `reads`, in order; `written_groups` is a tuple
    with one pytree per name in `writes`, shaped like that group's state.
    """

    name: str
    fn: Callable[..., tuple[tuple, Any]]
    args: tuple = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()


class Scalar:
    """An argument of an entry that the host passes by value (`i32`), not as a
    tensor: IREE then knows it when it records the call's commands. A value
    used as an offset (where a row's K/V is written) that came as a tensor
    lives on the device, and the call would wait for the device to read it
    back before it could record the rest of its work."""

    dtype = np.dtype("int32")
    shape = ()


def tensor_type(x) -> str:
    dims = "".join(f"{d}x" for d in x.shape)
    return f"tensor<{dims}{_MLIR_TYPES[np.dtype(x.dtype)]}>"


def _global_name(group: str, path) -> str:
    return re.sub(r"[^A-Za-z0-9_]+", "_", f"{group}{jax.tree_util.keystr(path)}").strip("_")


def _splat(value) -> str:
    """The `dense<...>` initialiser of a state leaf; state starts uniform (zeros)."""
    flat = np.asarray(value).reshape(-1)
    if flat.size and not np.all(flat == flat[0]):
        raise ValueError("non-parameter state must start as a splat (all elements equal)")
    first = flat[0] if flat.size else 0
    if flat.dtype == np.bool_:
        return "dense<true>" if first else "dense<false>"
    if np.issubdtype(flat.dtype, np.floating):
        return f"dense<{float(first)!r}>"
    return f"dense<{int(first)}>"


def _lower(entry: Entry, state: dict) -> tuple[str, list, list]:
    """Lower one entry to StableHLO text -> (text, input leaves, output leaves)."""
    read_trees = [state[g] for g in entry.reads]
    read_leaves, read_def = jax.tree.flatten(read_trees)
    arg_leaves, arg_def = jax.tree.flatten(entry.args)

    out_shapes = {}

    def flat_fn(*leaves):
        groups = jax.tree.unflatten(read_def, leaves[: len(read_leaves)])
        args = jax.tree.unflatten(arg_def, leaves[len(read_leaves):])
        written, result = entry.fn(*groups, *args)
        for name, tree in zip(entry.writes, written, strict=True):
            if jax.tree.structure(tree) != jax.tree.structure(state[name]):
                raise ValueError(f"entry {entry.name!r} writes {name!r} with a different structure")
        out_shapes["result"] = result
        return jax.tree.leaves(written) + jax.tree.leaves(result)

    avals = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in read_leaves + arg_leaves]
    text = jax.jit(flat_fn, keep_unused=True).lower(*avals).as_text()
    result_leaves = jax.tree.leaves(out_shapes["result"])
    return text, avals, result_leaves


def _rename_into(text: str, prefix: str, ctx) -> list[str]:
    """Parse lowered text, prefix every function name, make `main` private and
    strip JAX's argument/result attributes; return the functions as text."""
    from iree.compiler import ir

    module = ir.Module.parse(text, ctx)
    funcs = list(module.body.operations)
    for op in funcs:
        old = ir.StringAttr(op.attributes["sym_name"]).value
        new = f"{prefix}${old}"
        ir.SymbolTable.replace_all_symbol_uses(old, new, module.operation)
        ir.SymbolTable.set_symbol_name(op, new)
        ir.SymbolTable.set_visibility(op, "private")
        for attr in ("arg_attrs", "res_attrs"):
            if attr in op.attributes:
                del op.attributes[attr]
    return [str(op) for op in funcs]


def build_module(module_name: str, state: dict[str, Any], param_groups: tuple[str, ...], entries: list[Entry]) -> str:
    """The MLIR text of one module holding `state` as globals and `entries` as functions.

    `state` maps group name -> pytree of initial values (or of their shapes and
    dtypes). The groups named in `param_groups` must be flat dicts; their
    globals are read from the parameter archives under the dicts' keys. Every
    other leaf starts as the splat of its initial value (optimizer state
    starts at zero), or, given as a `jax.ShapeDtypeStruct`, uninitialised:
    an entry must write it before any reads it (the KV cache, which `seed`
    clears).

    A group is mutable if an entry writes it. The others are constant once the
    module has loaded, so IREE may transform them once, at load, instead of in
    every call (data tiling packs a constant weight there).
    """
    from iree.compiler import ir

    written = {group for entry in entries for group in entry.writes}
    globals_ = {}  # group -> [(global name, leaf)]
    lines = [f"module @{module_name} {{"]
    uninitialised = []
    for group, tree in state.items():
        leaves_with_paths = jax.tree_util.tree_flatten_with_path(tree)[0]
        globals_[group] = []
        mutable = " mutable" if group in written else ""
        for path, leaf in leaves_with_paths:
            name = _global_name(group, path)
            if group in param_groups:
                init = f' = #flow.parameter.named<"{PARAMETER_SCOPE}"::"{path[0].key}">'
            elif isinstance(leaf, jax.ShapeDtypeStruct):
                if not mutable:
                    raise ValueError(f"state {name!r} has no initial value, and no entry writes it")
                init = ""
                uninitialised.append((name, leaf))
            else:
                init = f" = {_splat(leaf)}"
            lines.append(f"  util.global private{mutable} @{name}{init} : {tensor_type(leaf)}")
            globals_[group].append((name, leaf))
    for name, leaf in uninitialised:
        lines += ["  util.initializer {",
                  f"    %empty = tensor.empty() : {tensor_type(leaf)}",
                  f"    util.global.store %empty, @{name} : {tensor_type(leaf)}",
                  "    util.return",
                  "  }"]

    ctx = ir.Context()
    bodies = []
    for entry in entries:
        text, in_avals, result_leaves = _lower(entry, state)
        bodies += _rename_into(text, entry.name, ctx)
        lines += _wrapper(entry, globals_, in_avals, result_leaves)
    lines += bodies
    lines.append("}")
    module_text = "\n".join(lines) + "\n"
    digest = hashlib.sha256(module_text.encode()).hexdigest()[:16]
    module_text = module_text.replace(_UNHASHED, f'{SOURCE_DIGEST_KEY} = "{digest}"')
    ir.Module.parse(module_text, ctx)  # fail here, with MLIR's message, not in iree-compile
    return module_text


def source_digest(module_text: str) -> str:
    """The digest that build_module stamped on the module `module_text`: 16
    hex digits of the sha256 of its text."""
    return re.search(f'{SOURCE_DIGEST_KEY} = "([0-9a-f]{{16}})"', module_text).group(1)


def _wrapper(entry: Entry, globals_: dict, in_avals: list, result_leaves: list) -> list[str]:
    """The public function: load read globals, call the body, store written
    globals. A `Scalar` argument becomes a 0-d tensor for the body."""
    reads = [g for group in entry.reads for g in globals_[group]]
    writes = [g for group in entry.writes for g in globals_[group]]
    arg_avals = in_avals[len(reads):]
    by_value = [isinstance(leaf, Scalar) for leaf in jax.tree.leaves(entry.args)]
    args = [f"%arg{i}: {_MLIR_TYPES[np.dtype(a.dtype)] if scalar else tensor_type(a)}"
            for i, (a, scalar) in enumerate(zip(arg_avals, by_value, strict=True))]
    results = ", ".join(tensor_type(r) for r in result_leaves)
    out = [f"  func.func @{entry.name}({', '.join(args)}) -> ({results}) "
           f"attributes {{iree.reflection = {{{_UNHASHED}}}}} {{"]
    operands = []
    for i, (name, leaf) in enumerate(reads):
        out.append(f"    %s{i} = util.global.load @{name} : {tensor_type(leaf)}")
        operands.append(f"%s{i}")
    for i, (a, scalar) in enumerate(zip(arg_avals, by_value)):
        if scalar:
            out.append(f"    %t{i} = tensor.from_elements %arg{i} : {tensor_type(a)}")
        operands.append(f"%t{i}" if scalar else f"%arg{i}")
    in_types = ", ".join(tensor_type(a) for a in in_avals)
    out_types = [tensor_type(leaf) for _, leaf in writes] + [tensor_type(r) for r in result_leaves]
    n_out = len(out_types)
    call = f"func.call @{entry.name}$main({', '.join(operands)}) : ({in_types}) -> ({', '.join(out_types)})"
    # No result at all: an entry over an empty group (SGD's optimizer state).
    out.append(f"    %r:{n_out} = {call}" if n_out > 1 else f"    %r = {call}" if n_out else f"    {call}")
    ref = (lambda i: f"%r#{i}") if n_out > 1 else (lambda i: "%r")
    for i, (name, leaf) in enumerate(writes):
        out.append(f"    util.global.store {ref(i)}, @{name} : {tensor_type(leaf)}")
    returned = [ref(len(writes) + i) for i in range(len(result_leaves))]
    out.append(f"    return {', '.join(returned)} : {results}" if returned else "    return")
    out.append("  }")
    return out
