"""stateful: JAX functions -> one IREE module, its parameters constant, state written by calls carried between them."""

import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_iree import archive, compiler, stateful, toolchain
from gpt2_iree.peak_memory import resident_bytes
from gpt2_iree.targets import compile_command, get_target

STATE = {
    "params": {"w": np.zeros(4, np.float16)},
    "acc": {"total": np.zeros(4, np.float32)},
}
# Each call adds the float16 weight to a running total.
STEP = stateful.Entry("step", lambda params, acc: (({"total": acc["total"] + params["w"].astype(jnp.float32)},),
                                                    acc["total"]), reads=("params", "acc"), writes=("acc",))


def _open(tmp_path, text: str, params: dict):
    """The compiled module `text`, its parameters `params` (written as float16), on the CPU."""
    import iree.runtime as rt

    (tmp_path / "m.mlir").write_text(text)
    compiler.compile_module(toolchain.iree_compile(), tmp_path / "m.mlir", get_target("cpu"), tmp_path / "m.vmfb",
                            tmp_path / "m.log")
    archive.write_irpa(params, tmp_path / "m.irpa", dtype=np.float16)
    index = rt.ParameterIndex()
    index.load(str(tmp_path / "m.irpa"))
    config = rt.Config("local-task")
    context = rt.SystemContext(config=config, vm_modules=[
        rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope="model")),
        rt.VmModule.mmap(config.vm_instance, str(tmp_path / "m.vmfb"))])
    return context.modules.m


def test_parameters_no_call_writes_are_constant_and_state_written_by_calls_is_kept(tmp_path):
    text = stateful.build_module("m", STATE, ("params",), [STEP])
    # Only what an entry writes is mutable; the rest is constant once loaded.
    assert 'util.global private @params_w = #flow.parameter.named<"model"::"w"> : tensor<4xf16>' in text
    assert "util.global private mutable @acc_total = dense<0.0> : tensor<4xf32>" in text

    step = _open(tmp_path, text, {"w": np.array([1, 2, 3, 4])}).step
    assert np.asarray(step().to_host()).tolist() == [0, 0, 0, 0]
    assert np.asarray(step().to_host()).tolist() == [1, 2, 3, 4]
    assert np.asarray(step().to_host()).tolist() == [2, 4, 6, 8]


def test_state_given_as_a_shape_costs_no_memory_until_a_call_writes_it(tmp_path):
    # What keeps a process that only fine-tunes from paying for the KV cache:
    # uninitialised state is allocated, not written, so its pages stay untouched.
    rows = 256  # 64 MB of float32
    state = {"params": {"w": np.zeros(4, np.float16)},
             "buf": {"rows": jax.ShapeDtypeStruct((rows, 1 << 16), np.float32)}}
    write = stateful.Entry("write", lambda buf, row, value: (({"rows": jax.lax.dynamic_update_slice(
        buf["rows"], jnp.broadcast_to(value, (1, 1 << 16)), (row, 0))},), ()),
        (jax.ShapeDtypeStruct((), np.int32), jax.ShapeDtypeStruct((), np.float32)), reads=("buf",), writes=("buf",))
    read = stateful.Entry("read", lambda buf, row: ((), jax.lax.dynamic_index_in_dim(buf["rows"], row, 0, False)[:4]),
                          (jax.ShapeDtypeStruct((), np.int32),), reads=("buf",))
    text = stateful.build_module("m", state, ("params",), [write, read])
    assert "util.global private mutable @buf_rows : tensor<256x65536xf32>\n" in text

    before = resident_bytes()
    module = _open(tmp_path, text, {"w": np.zeros(4)})
    module.write(np.int32(3), np.float32(2.5))
    assert resident_bytes() - before < 32 << 20
    assert np.asarray(module.read(np.int32(3)).to_host()).tolist() == [2.5] * 4


def test_state_with_no_initial_value_must_be_written_by_an_entry():
    state = {"params": {"w": np.zeros(4, np.float16)}, "buf": {"x": jax.ShapeDtypeStruct((4,), np.float32)}}
    read = stateful.Entry("read", lambda buf: ((), buf["x"]), reads=("buf",))
    with pytest.raises(ValueError, match="'buf_x' has no initial value, and no entry writes it"):
        stateful.build_module("m", state, ("params",), [read])


def test_a_scalar_argument_is_a_host_value_so_a_call_writing_at_it_never_waits_midway(tmp_path):
    # The KV cache's write position: given by value, IREE records the copy at
    # that offset at once; as a tensor, the call would submit work, wait for
    # the device and read the offset back before recording the rest.
    state = {"params": {"w": np.zeros(4, np.float16)}, "buf": {"rows": np.zeros((8, 4), np.float32)}}
    write = stateful.Entry("write", lambda params, buf, row, value: (({"rows": jax.lax.dynamic_update_slice(
        buf["rows"], (value + params["w"].astype(jnp.float32))[None], (row, 0), allow_negative_indices=False)},),
        jnp.sum(buf["rows"])), (stateful.Scalar(), jax.ShapeDtypeStruct((4,), np.float32)),
        reads=("params", "buf"), writes=("buf",))
    read = stateful.Entry("read", lambda buf: ((), buf["rows"]), reads=("buf",))
    text = stateful.build_module("m", state, ("params",), [write, read])
    assert "func.func @write(%arg0: i32, %arg1: tensor<4xf32>)" in text

    module = _open(tmp_path, text, {"w": np.ones(4)})
    module.write(5, np.full(4, 2, np.float32))
    assert np.asarray(module.read().to_host())[:, 0].tolist() == [0, 0, 0, 0, 0, 3, 0, 0]

    vm = tmp_path / "m.vm.mlir"
    argv = compile_command(toolchain.iree_compile(), get_target("cpu"), tmp_path / "m.mlir", vm)
    subprocess.run([*argv, "--compile-to=vm"], check=True, capture_output=True)
    body = vm.read_text().split("vm.func private @write(")[1].split("vm.func ")[0]
    assert len(re.findall(r"vm\.call[\w.]* @hal\.fence\.await", body)) == 1  # the call's end, nothing before it
