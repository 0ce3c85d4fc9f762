"""`gpt2-iree` as a user runs it, on the tiny model: every command and every bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from english import paragraphs

from gpt2_iree.cli import main

REPO = Path(__file__).resolve().parent.parent
SENTENCE = "The quick brown fox jumps over the lazy dog."
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def gpt2_iree(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a fresh process, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "gpt2_iree.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_generate_prints_the_completion(tiny_build, capsys):
    assert main(["generate", "--build-dir", str(tiny_build), "--prompt", "Hello", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and len(out.rstrip("\n")) > len("Hello")


@pytest.mark.parametrize("build", ["tiny_build", "tiny_int8_build", "tiny_lora_build"])
def test_generate_never_imports_jax(build, request):
    """Generating runs the compiled module alone: JAX would add about 125 MB
    to its peak memory and 2 s to its start (docs/PERFORMANCE.md)."""
    build_dir = request.getfixturevalue(build)
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "gpt2_iree.cli", "generate", "--build-dir",
                             str(build_dir), "--prompt", "Hello", "--max-new-tokens", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")}
    assert "gpt2_iree.module" in imported and "jax" not in imported


def _json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_a_long_prompt_generates_and_seeded_sampling_repeats(tiny_build, capsys):
    build = ["--build-dir", str(tiny_build), "--max-new-tokens", "16"]
    assert main(["generate", *build, "--prompt", "Once upon a time, " * 11]) == 0  # 198 characters
    out = capsys.readouterr()
    assert out.out.startswith("Once upon a time, ") and "the model sees its last 64" in out.err
    runs = []
    for seed in ("7", "7", "8"):
        assert main(["generate", *build, "--prompt", "Once upon a time", "--temperature", "0.9", "--top-k", "20",
                     "--seed", seed, "--json"]) == 0
        runs.append(_json_lines(capsys.readouterr().out)[0])
    assert runs[0] == runs[1] and runs[0]["tokens"] != runs[2]["tokens"]
    assert set(runs[0]) == {"prompt", "completion", "tokens", "stop_reason", "device"}
    assert runs[0]["stop_reason"] in ("eot", "stop", "length") and runs[0]["device"] == "local-task"


def test_a_batch_completes_every_prompt_as_it_would_alone(tiny_batch_build, tmp_path, capsys):
    prompts = ["Hello", "Once upon a time", "abc"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    sampling = ["--temperature", "0.9", "--top-k", "20", "--seed", "3", "--max-new-tokens", "24"]
    assert main(["generate", "--build-dir", str(tiny_batch_build), "--prompts-file", str(tmp_path / "prompts.txt"),
                 *sampling, "--json"]) == 0
    together = _json_lines(capsys.readouterr().out)
    assert [r["prompt"] for r in together] == prompts
    for result in together:
        assert main(["generate", "--build-dir", str(tiny_batch_build), "--prompt", result["prompt"], *sampling,
                     "--json"]) == 0
        assert _json_lines(capsys.readouterr().out) == [result]


def test_interactive_lines_continue_one_cache(tiny_build):
    from gpt2_iree.session import Session

    lines = ["Once upon a time", " there was"]
    result = subprocess.run([sys.executable, "-m", "gpt2_iree.cli", "generate", "--build-dir", str(tiny_build),
                             "--interactive", "--max-new-tokens", "12"], input="\n".join(lines) + "\n",
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    session = Session(tiny_build)
    expected = ["".join(session.generate(line, 12, resume=i > 0)) for i, line in enumerate(lines)]
    assert result.stdout == "".join(f"{text}\n" for text in expected)
    assert expected[1] != "".join(Session(tiny_build).generate(lines[1], 12))  # the second line saw the first


def test_finetune_then_generate_with_saved_weights(tiny_build, tmp_path):
    tuned, plot, hf = tmp_path / "tuned.irpa", tmp_path / "loss.png", tmp_path / "hf"
    result = gpt2_iree("finetune", "--build-dir", str(tiny_build), "--text", SENTENCE, "--steps", "30",
                       "--lr", "0.1", "--max-new-tokens", "64", "--out", str(tuned), "--plot", str(plot),
                       "--export-hf", str(hf))
    assert result.returncode == 0, result.stderr
    first, last = (float(x) for x in result.stdout.split("loss: ")[1].split(" over")[0].split(" -> "))
    assert last * 10 < first
    assert f"after:  {SENTENCE}" in result.stdout
    assert "finetune" in result.stderr and "step" in result.stderr  # the progress bar
    assert plot.read_bytes().startswith(PNG_MAGIC)
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]

    # A fresh process with the saved weights completes the sentence from its first words.
    again = gpt2_iree("generate", "--build-dir", str(tiny_build), "--prompt", "The quic", "--max-new-tokens", "64",
                      "--params", str(tuned))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == SENTENCE

    # The exported Hugging Face directory rebuilds through doit and generates the same.
    work = tmp_path / "work"
    work.mkdir()
    built = subprocess.run([sys.executable, "-m", "doit", "-f", str(REPO / "dodo.py"), "-d", str(work),
                            f"model={hf}", "targets=cpu"], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    build_dir = next((work / "build").glob("local-hf-*/pretrained-b1-k64-c128-s128-adafactor"))
    rebuilt = gpt2_iree("generate", "--build-dir", str(build_dir), "--prompt", "The quic", "--max-new-tokens", "64")
    assert rebuilt.stdout == again.stdout


def test_inspect_vmfb_and_irpa(tiny_build, capsys):
    assert main(["inspect", str(tiny_build / "gpt2-metal.vmfb")]) == 0
    out = capsys.readouterr().out
    for name in ("prefill", "decode_64", "decode_128", "decode_greedy_64", "seed", "finetune", "eval_loss", "get_params", "set_params",
                 "get_opt_state", "set_opt_state", "get_state", "metal-msl-fb"):
        assert name in out
    assert main(["inspect", str(tiny_build / "gpt2.irpa")]) == 0
    assert "h.0.attn.qkv_w" in capsys.readouterr().out


def test_bench_writes_json_and_png(tiny_build, tmp_path, capsys):
    report, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    assert main(["bench", "--build-dir", str(tiny_build), "--device", "local-task", "--repeats", "2",
                 "--json", str(report), "--plot", str(chart)]) == 0
    result = json.loads(report.read_text())
    for key in ("prefill_ms", "decode_ms_per_token", "finetune_s_per_step"):
        assert set(result[key]) == {"iree", "jax", "ratio"}
    assert result["model"] == "tiny" and result["device"] == "local-task"
    assert chart.read_bytes().startswith(PNG_MAGIC)
    assert "decode" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["generate", "--prompt", "Hi", "--temperature", "-0.5"], "temperature -0.5 is invalid; valid: 0 (greedy) or more"),
    (["generate", "--prompt", "Hi", "--top-p", "0"], "top_p 0.0 is invalid; valid: (0, 1]"),
    (["generate", "--prompt", "Hi", "--top-p", "1.5"], "top_p 1.5 is invalid; valid: (0, 1]"),
    (["generate", "--prompt", "Hi", "--top-k", "-1"], "top_k -1 is invalid; valid: 0 (off) or more"),
    (["generate", "--prompts-file", "/nonexistent/prompts.txt"], "--prompts-file /nonexistent/prompts.txt"),
    (["generate"], "give --prompt TEXT (repeatable), --prompts-file FILE or --interactive"),
    (["generate", "--prompt", "Hi", "--device", "metal"], "device 'metal' is not available here"),
    (["finetune", "--text", "  "], "text 1 is empty"),
    (["finetune", "--text", SENTENCE, "--text", "  "], "text 2 is empty"),  # each --text is read
    (["finetune", "--text-file", "/nonexistent/texts.txt"], "--text-file /nonexistent/texts.txt: no such file"),
    (["finetune", "--text", "x" * 300, "--steps", "10", "--warmup-steps", "10"],
     "--warmup-steps 10 is out of range for a run of 10 steps; valid: 0 to 9"),
    (["finetune", "--text", "x" * 600, "--val-fraction", "0.95"], "--val-fraction 0.95 holds 5 of the text's 5 windows"),
    (["finetune", "--text", SENTENCE, "--resume", "/nonexistent"], "--resume /nonexistent: no checkpoint there"),
    (["generate", "--prompt", "Hi", "--params", "/nonexistent.irpa"], "/nonexistent.irpa does not exist"),
])
def test_bad_input_is_a_clear_error(tiny_build, capsys, args, message):
    assert main([*args, "--build-dir", str(tiny_build)]) == 2
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in err
    assert out == ""  # refused before any work


def test_unbuilt_build_dir_says_which_doit_builds_it(tmp_path, capsys):
    assert main(["generate", "--prompt", "Hi", "--build-dir", str(tmp_path)]) == 2
    assert "is not built yet" in capsys.readouterr().err


def test_inspect_of_a_non_module_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "junk.vmfb").write_bytes(b"junk")
    assert main(["inspect", str(tmp_path / "junk.vmfb")]) == 2
    assert "junk.vmfb" in capsys.readouterr().err


def test_a_reader_that_leaves_early_ends_the_command_quietly(tiny_build):
    # `gpt2-iree inspect X.vmfb | head`: a pipe whose reader has gone.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run([sys.executable, "-m", "gpt2_iree.cli", "inspect", str(tiny_build / "gpt2-cpu.vmfb")],
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=600)
    finally:
        os.close(write_end)
    assert result.returncode == 128 + signal.SIGPIPE
    assert result.stderr == ""


def test_every_command_runs_on_vulkan(tiny_vulkan_build, tmp_path):
    build, tuned, numbers = str(tiny_vulkan_build), tmp_path / "tuned.irpa", tmp_path / "bench.json"
    result = gpt2_iree("finetune", "--build-dir", build, "--device", "vulkan", "--text", SENTENCE, "--steps", "30",
                       "--lr", "0.1", "--max-new-tokens", "64", "--out", str(tuned))
    assert result.returncode == 0, result.stderr
    assert f"after:  {SENTENCE}" in result.stdout
    again = gpt2_iree("generate", "--build-dir", build, "--device", "vulkan", "--prompt", "The quic",
                      "--max-new-tokens", "64", "--params", str(tuned))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == SENTENCE
    bench = gpt2_iree("bench", "--build-dir", build, "--device", "vulkan", "--repeats", "1", "--json", str(numbers))
    assert bench.returncode == 0, bench.stderr
    assert json.loads(numbers.read_text())["device"] == "vulkan"


@pytest.fixture(scope="module")
def notes(tmp_path_factory):
    """About 20 KB of text whose every paragraph is longer than the tiny model's seq_len (128 tokens)."""
    path = tmp_path_factory.mktemp("notes") / "notes.txt"
    path.write_text(paragraphs(20_000))
    assert min(len(p) for p in path.read_text().split("\n\n")) > 128
    return path


def finetune(build, *args):
    return gpt2_iree("finetune", "--build-dir", str(build), "--max-new-tokens", "8", *args)


def test_a_notes_file_fine_tunes_for_two_epochs_and_its_validation_loss_falls(tiny_build, notes, tmp_path):
    report, plot = tmp_path / "run.json", tmp_path / "loss.png"
    result = finetune(tiny_build, "--text-file", str(notes), "--epochs", "2", "--lr", "0.01", "--eval-every", "100",
                      "--json", str(report), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    run = json.loads(report.read_text())
    windows = -(-(len(notes.read_bytes()) + 1 - 1) // 128)  # bytes and end-of-text, 128 predictions a window
    train_windows = windows - round(0.1 * windows)
    assert len(run["train_loss"]) == 2 * train_windows
    steps = [step for step, _ in run["val_loss"]]
    assert steps == [0, *range(100, 2 * train_windows, 100), 2 * train_windows]
    assert run["val_loss"][-1][1] < run["val_loss"][0][1] - 0.5, run["val_loss"]
    assert run["tokens_per_s"] > 0
    assert "validation at step 0: loss" in result.stdout and "perplexity" in result.stdout
    assert "val=" in result.stderr  # the progress bar shows the last validation loss
    assert plot.read_bytes().startswith(PNG_MAGIC)


def test_a_run_resumed_from_its_checkpoint_takes_the_steps_of_an_uninterrupted_one(tiny_build, notes, tmp_path):
    common = ["--text-file", str(notes), "--lr", "0.01", "--eval-every", "5", "--seed", "3"]
    whole, first, second = (tmp_path / f"{name}.json" for name in ("whole", "first", "second"))
    assert finetune(tiny_build, *common, "--steps", "20", "--json", str(whole)).returncode == 0
    assert finetune(tiny_build, *common, "--steps", "10", "--checkpoint-dir", str(tmp_path / "ck"),
                    "--json", str(first)).returncode == 0
    resumed = finetune(tiny_build, *common, "--steps", "20", "--resume", str(tmp_path / "ck"), "--json", str(second))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after step 10" in resumed.stdout
    expected, got = json.loads(whole.read_text()), json.loads(second.read_text())
    np.testing.assert_allclose(got["train_loss"][10:], expected["train_loss"][10:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["train_loss"][:10], json.loads(first.read_text())["train_loss"])
    assert [s for s, _ in got["val_loss"]] == [0, 5, 10, 15, 20]
    np.testing.assert_allclose(np.array(got["val_loss"]), np.array(expected["val_loss"]), rtol=0, atol=1e-5)
    # The losses of steps 11-20 are not those of steps 1-10 again: the run went on.
    assert got["train_loss"][10:] != got["train_loss"][:10]


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_a_checkpoint_stops_within_seconds_and_the_checkpoint_resumes(tiny_build, notes, tmp_path,
                                                                                   sent):
    checkpoints = tmp_path / "ck"
    run = subprocess.Popen([sys.executable, "-m", "gpt2_iree.cli", "finetune", "--build-dir", str(tiny_build),
                            "--text-file", str(notes), "--steps", "1000000", "--save-every", "50",
                            "--checkpoint-dir", str(checkpoints)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint.json").is_file() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    assert (checkpoints / "checkpoint.json").is_file(), run.communicate()
    signalled = time.monotonic()
    run.send_signal(sent)
    out, err = run.communicate(timeout=10)
    assert time.monotonic() - signalled < 10
    assert run.returncode == 128 + sent, err
    last = err.strip().splitlines()[-1]
    assert f"interrupted by {sent.name} after step" in last and f"saved checkpoint {checkpoints}" in last
    assert f"--resume {checkpoints}" in last and "Traceback" not in err
    step = json.loads((checkpoints / "checkpoint.json").read_text())["run"]["step"]
    assert f"after step {step} of 1000000" in last
    resumed = finetune(tiny_build, "--text-file", str(notes), "--steps", str(step + 3), "--resume", str(checkpoints))
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming after step {step}" in resumed.stdout and f"over {step + 3} steps" in resumed.stdout


def test_a_bad_out_fails_in_seconds_before_any_training(tiny_build, notes):
    start = time.monotonic()
    result = finetune(tiny_build, "--text-file", str(notes), "--epochs", "50", "--out", "/missing/dir/tuned.irpa")
    assert time.monotonic() - start < 5
    # The error alone: no progress bar, so no step was taken.
    assert result.returncode == 2 and result.stderr.strip() == ("gpt2-iree finetune: error: --out /missing/dir/tuned.irpa: "
                                     "the directory /missing/dir does not exist")


@pytest.mark.parametrize("option, path, message", [
    ("--out", "/proc/tuned.irpa", "--out /proc/tuned.irpa: cannot write in /proc"),
    ("--json", "/missing/run.json", "--json /missing/run.json: the directory /missing does not exist"),
    ("--plot", "/missing/loss.png", "--plot /missing/loss.png: the directory /missing does not exist"),
    ("--export-hf", "/missing/hf", "--export-hf /missing/hf: the directory /missing does not exist"),
    ("--checkpoint-dir", "/missing/ck", "--checkpoint-dir /missing/ck: the directory /missing does not exist"),
])
def test_every_output_path_is_checked_before_any_work(tiny_build, capsys, option, path, message):
    assert main(["finetune", "--build-dir", str(tiny_build), "--text", SENTENCE, option, path]) == 2
    assert message in capsys.readouterr().err


def test_what_would_be_lost_is_refused(tiny_build, tmp_path, capsys):
    def refused(*args):
        assert main(["finetune", "--build-dir", str(tiny_build), "--text", SENTENCE, *args]) == 2
        return capsys.readouterr().err

    for own in ("gpt2.irpa", "gpt2-generate.irpa", "gpt2-generate-packed.irpa"):
        assert "is the build's own archive, its input" in refused("--out", str(tiny_build / own))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    assert "holds files an export does not write (thesis.tex)" in refused("--export-hf", str(tmp_path / "mine"))
    for _ in range(2):  # a previous export is written over
        assert main(["finetune", "--build-dir", str(tiny_build), "--text", SENTENCE, "--steps", "1",
                     "--export-hf", str(tmp_path / "hf")]) == 0
    assert main(["finetune", "--build-dir", str(tiny_build), "--text", SENTENCE, "--steps", "2",
                 "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    assert f"--checkpoint-dir {tmp_path / 'ck'} holds a checkpoint already" in refused(
        "--checkpoint-dir", str(tmp_path / "ck"))


def test_bench_with_a_bad_json_path_fails_before_benchmarking(tiny_build, capsys):
    start = time.monotonic()
    assert main(["bench", "--build-dir", str(tiny_build), "--json", "/missing/x.json"]) == 2
    assert time.monotonic() - start < 1
    err = capsys.readouterr().err
    assert err == "gpt2-iree bench: error: --json /missing/x.json: the directory /missing does not exist\n"


def test_damaged_files_are_one_line_errors(tiny_build, tmp_path):
    def one_line_error(*args):
        result = gpt2_iree(*args)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        return result.stderr

    (tmp_path / "cut.irpa").write_bytes((tiny_build / "gpt2.irpa").read_bytes()[:5000])
    assert "cut.irpa is not an IREE parameter archive, or not all of one" in one_line_error(
        "generate", "--build-dir", str(tiny_build), "--prompt", "Hi", "--params", str(tmp_path / "cut.irpa"))
    build = tmp_path / "build"
    shutil.copytree(tiny_build, build)
    (build / "gpt2-cpu.vmfb").write_bytes((tiny_build / "gpt2-cpu.vmfb").read_bytes()[:100_000])
    assert "gpt2-cpu.vmfb is not a loadable IREE module" in one_line_error(
        "finetune", "--build-dir", str(build), "--text", SENTENCE, "--device", "local-task")
    assert main(["finetune", "--build-dir", str(tiny_build), "--text", SENTENCE, "--steps", "2",
                 "--checkpoint-dir", str(tmp_path / "ck")]) == 0
    archive = next((tmp_path / "ck").glob("params-*.irpa"))
    archive.write_bytes(archive.read_bytes()[:-4096])
    assert f"{archive.name} is missing or damaged" in one_line_error(
        "finetune", "--build-dir", str(tiny_build), "--text", SENTENCE, "--steps", "4", "--resume", str(tmp_path / "ck"))


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="Linux's /proc")
def test_a_read_error_on_a_path_is_a_one_line_error(tiny_build, capsys):
    assert main(["finetune", "--build-dir", str(tiny_build), "--text-file", "/proc/self/mem"]) == 2
    assert capsys.readouterr().err == "gpt2-iree finetune: error: --text-file /proc/self/mem: Input/output error\n"
