"""The original recipe's acceptance, on the real GPT-2 weights from Hugging Face.

Needs the internet: run with `pytest --run-network`. Builds `model=gpt2
targets=cpu` in a temporary directory through doit, as a user would.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_iree.session import Session

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpt2_build(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpt2")
    built = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(work),
                            "model=gpt2", "targets=cpu"], capture_output=True, text=True)
    assert built.returncode == 0, built.stdout + built.stderr
    return work / "build/gpt2/pretrained-b1-k64-c1024-s128-adafactor"


@pytest.mark.network
@pytest.mark.parametrize("prompt, completion", [
    ("zero one two three four", " five six seven"),
    ("when in the course", " of a long"),
])
def test_pretrained_gpt2_completes(gpt2_build, prompt, completion):
    tokens = len(Session(gpt2_build).tokenizer.encode(completion))
    assert "".join(Session(gpt2_build).generate(prompt, max_new_tokens=tokens)) == completion
