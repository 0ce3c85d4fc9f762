"""gpt2_iree.files: a file is replaced whole or not at all, whoever else writes it."""

import threading

import numpy as np
import pytest

from gpt2_iree.files import replace_atomically, write_text


def test_two_writers_of_one_file_at_once_both_finish(tmp_path):
    target = tmp_path / "gpt2-cpu.vmfb"
    both_writing = threading.Barrier(2)
    temps, errors = [], []

    def writer(text: str) -> None:
        def write(tmp):
            temps.append(tmp)
            tmp.write_text(text)
            both_writing.wait(timeout=10)  # each has its temporary file now
        try:
            replace_atomically(target, write)
        except Exception as err:  # noqa: BLE001 - the test reports any failure
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(text,)) for text in ("a" * 1000, "b" * 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and temps[0] != temps[1]
    assert target.read_text() in ("a" * 1000, "b" * 1000)
    assert [p.name for p in tmp_path.iterdir()] == ["gpt2-cpu.vmfb"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "tuned.irpa"
    write_text(target, "the weights")

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_atomically(target, fail)
    assert target.read_text() == "the weights"
    assert [p.name for p in tmp_path.iterdir()] == ["tuned.irpa"]


def test_a_replaced_file_has_the_mode_the_umask_gives(tmp_path):
    import os

    from safetensors.numpy import save_file

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "manifest.json", "{}")
        # save_file makes its file anew, owner-only: the user's umask still wins.
        replace_atomically(tmp_path / "adapter_model.safetensors",
                           lambda tmp: save_file({"w": np.zeros(2, np.float32)}, str(tmp)))
    finally:
        os.umask(old)
    assert (tmp_path / "manifest.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o644
