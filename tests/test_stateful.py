"""stateful: JAX functions -> one IREE module, state computed at load or carried between calls."""

import jax.numpy as jnp
import numpy as np
import pytest

from gpt2_iree import archive, compiler, stateful, toolchain
from gpt2_iree.targets import get_target

STATE = {
    "params": {"w": np.zeros(4, np.float32)},
    "half": {"w": np.zeros(4, np.float16)},
    "acc": {"total": np.zeros(4, np.float32)},
}
# Computed once, when the module loads: twice the archive's weight, in float16.
DOUBLE = stateful.Entry("double", lambda params: (({"w": (2 * params["w"]).astype(jnp.float16)},), ()),
                        reads=("params",), writes=("half",))
# Each call adds the float16 weight to a running total.
STEP = stateful.Entry("step", lambda half, acc: (({"total": acc["total"] + half["w"].astype(jnp.float32)},),
                                                  acc["total"]), reads=("half", "acc"), writes=("acc",))


def test_state_computed_at_load_is_constant_and_state_written_by_calls_is_kept(tmp_path):
    text = stateful.build_module("m", STATE, ("params",), [STEP], initializer=DOUBLE)
    # Only what an entry writes is mutable; the rest is constant once loaded.
    assert 'util.global private @params_w = #flow.parameter.named<"model"::"w"> : tensor<4xf32>' in text
    assert "util.global private @half_w : tensor<4xf16>" in text
    assert "util.global private mutable @acc_total = dense<0.0> : tensor<4xf32>" in text
    assert "util.initializer" in text

    import iree.runtime as rt

    (tmp_path / "m.mlir").write_text(text)
    compiler.compile_module(toolchain.iree_compile(), tmp_path / "m.mlir", get_target("cpu"), tmp_path / "m.vmfb",
                            tmp_path / "m.log")
    archive.write_irpa({"w": np.array([1, 2, 3, 4], np.float32)}, tmp_path / "m.irpa")
    index = rt.ParameterIndex()
    index.load(str(tmp_path / "m.irpa"))
    config = rt.Config("local-task")
    context = rt.SystemContext(config=config, vm_modules=[
        rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope="model")),
        rt.create_hal_module(config.vm_instance, config.device),
        rt.VmModule.mmap(config.vm_instance, str(tmp_path / "m.vmfb"))])
    step = context.modules.m.step
    assert np.asarray(step().to_host()).tolist() == [0, 0, 0, 0]
    assert np.asarray(step().to_host()).tolist() == [2, 4, 6, 8]
    assert np.asarray(step().to_host()).tolist() == [4, 8, 12, 16]


def test_a_group_written_at_load_and_by_a_call_is_refused():
    writes_half = stateful.Entry("overwrite", lambda half: ((half,), ()), reads=("half",), writes=("half",))
    with pytest.raises(ValueError, match=r"written both at load and by an entry: \['half'\]"):
        stateful.build_module("m", STATE, ("params",), [writes_half], initializer=DOUBLE)


def test_an_initializer_takes_no_arguments():
    with_argument = stateful.Entry("double", lambda params, x: ((params,), ()), (np.zeros(1, np.float32),),
                                   reads=("params",), writes=("half",))
    with pytest.raises(ValueError, match="takes no arguments and returns no result"):
        stateful.build_module("m", STATE, ("params",), [STEP], initializer=with_argument)
