"""`gpt2-iree` as a user runs it, on the tiny model: every command and every bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    for name in ("prefill", "decode_64", "decode_128", "seed", "finetune", "get_params", "set_params", "get_state",
                 "metal-msl-fb"):
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
    (["finetune", "--text", "x" * 200], "text 1 is 200 tokens"),
    (["finetune", "--text-file", "/nonexistent/texts.txt"], "--text-file /nonexistent/texts.txt: no such file"),
    (["generate", "--prompt", "Hi", "--params", "/nonexistent.irpa"], "/nonexistent.irpa does not exist"),
])
def test_bad_input_is_a_clear_error(tiny_build, capsys, args, message):
    assert main([*args, "--build-dir", str(tiny_build)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unbuilt_build_dir_says_which_doit_builds_it(tmp_path, capsys):
    assert main(["generate", "--prompt", "Hi", "--build-dir", str(tmp_path)]) == 2
    assert "is not built yet" in capsys.readouterr().err


def test_inspect_of_a_non_module_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "junk.vmfb").write_bytes(b"junk")
    assert main(["inspect", str(tmp_path / "junk.vmfb")]) == 2
    assert "junk.vmfb" in capsys.readouterr().err


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
