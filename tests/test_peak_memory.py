"""peak_memory: the peak RSS of fine-tuning and of generation, each in a fresh process."""

import numpy as np
import pytest

from gpt2_iree import peak_memory
from gpt2_iree.errors import Gpt2IreeError


def test_each_measure_counts_its_own_process_not_the_callers(tiny_build):
    # bench measures while it holds JAX and both modules: none of that may count.
    held = np.ones(1 << 28, np.float32)  # 1 GiB, touched
    peaks = peak_memory.peak_rss_mb(tiny_build, "local-task")
    assert held.sum() == held.size
    assert set(peaks) == {"finetune", "generate"}
    # A fresh Python with iree.runtime and numpy is well above 20 MB; the tiny
    # model's weights are 1 MB, so no measure comes near the caller's GiB.
    assert all(20 < mb < 700 for mb in peaks.values()), peaks


def test_a_failing_measure_says_why(tmp_path):
    with pytest.raises(Gpt2IreeError, match=f"(?s)peak memory of finetune on {tmp_path}.*no manifest.json"):
        peak_memory.measure(tmp_path, "local-task", "finetune")
    with pytest.raises(ValueError, match="unknown measure 'decode'; valid: finetune, generate"):
        peak_memory.measure(tmp_path, "local-task", "decode")
