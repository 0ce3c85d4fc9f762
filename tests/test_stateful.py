"""stateful: JAX functions -> one IREE module, its parameters constant, state written by calls carried between them."""

import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_iree import archive, compiler, stateful, toolchain
from gpt2_iree.targets import get_target

STATE = {
    "params": {"w": np.zeros(4, np.float16)},
    "acc": {"total": np.zeros(4, np.float32)},
}
# Each call adds the float16 weight to a running total.
STEP = stateful.Entry("step", lambda params, acc: (({"total": acc["total"] + params["w"].astype(jnp.float32)},),
                                                    acc["total"]), reads=("params", "acc"), writes=("acc",))


def test_parameters_no_call_writes_are_constant_and_state_written_by_calls_is_kept(tmp_path):
    text = stateful.build_module("m", STATE, ("params",), [STEP])
    # Only what an entry writes is mutable; the rest is constant once loaded.
    assert 'util.global private @params_w = #flow.parameter.named<"model"::"w"> : tensor<4xf16>' in text
    assert "util.global private mutable @acc_total = dense<0.0> : tensor<4xf32>" in text

    import iree.runtime as rt

    (tmp_path / "m.mlir").write_text(text)
    compiler.compile_module(toolchain.iree_compile(), tmp_path / "m.mlir", get_target("cpu"), tmp_path / "m.vmfb",
                            tmp_path / "m.log")
    archive.write_irpa({"w": np.array([1, 2, 3, 4])}, tmp_path / "m.irpa", dtype=np.float16)
    index = rt.ParameterIndex()
    index.load(str(tmp_path / "m.irpa"))
    config = rt.Config("local-task")
    context = rt.SystemContext(config=config, vm_modules=[
        rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope="model")),
        rt.create_hal_module(config.vm_instance, config.device),
        rt.VmModule.mmap(config.vm_instance, str(tmp_path / "m.vmfb"))])
    step = context.modules.m.step
    assert np.asarray(step().to_host()).tolist() == [0, 0, 0, 0]
    assert np.asarray(step().to_host()).tolist() == [1, 2, 3, 4]
    assert np.asarray(step().to_host()).tolist() == [2, 4, 6, 8]
