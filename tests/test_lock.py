"""tasks/lock.py: two `doit` runs of one configuration at once both succeed, the second after the first."""

import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_two_doit_runs_of_one_configuration_at_once_both_succeed(tmp_path):
    command = [sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(tmp_path), "model=tiny",
               "targets=cpu", "seq_len=48"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # the first is building
    second = subprocess.run(command, capture_output=True, text=True, timeout=900)
    out, err = first.communicate(timeout=900)
    assert first.returncode == 0, out + err
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Traceback" not in err + second.stderr
    assert "another doit run holds the build of build/tiny/pretrained-b1-k64-c128-s48-adafactor; waiting" in second.stderr
    # It waited for the first to finish, and found everything the first built up to date.
    assert "-- verify:cpu" in second.stdout and ".  export" not in second.stdout
