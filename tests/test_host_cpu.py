"""host_cpu: the CPU that benchmark figures and the cpu target's flags are for."""

import platform

from gpt2_iree import host_cpu


def test_the_cpu_is_named_with_the_simd_features_that_pick_kernels():
    cpu = host_cpu.describe_cpu()
    assert cpu["model"]
    assert set(cpu["simd"]) <= set(host_cpu.SIMD_FEATURES)
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        assert "avx" in cpu["simd"]  # every x86-64 CPU that JAX's wheels run on has it
        assert "(family " in cpu["model"]
        assert cpu["vendor"] in ("GenuineIntel", "AuthenticAMD")
