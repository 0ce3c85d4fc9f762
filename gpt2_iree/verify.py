"""Prove a compiled module right: run it against the JAX reference on the same weights.

For a target this host executes, every entry point is compared with the same
JAX functions the module was lowered from: greedy tokens must be equal, and
logits, KV cache, losses and fine-tuned weights within TOLERANCE relative
(norm of the difference over norm of the reference). For a target this host
cannot run, the artifact is checked structurally instead.
"""

from __future__ import annotations

import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np

from gpt2_iree.errors import Gpt2IreeError

TOLERANCE = 1e-4
DECODE_STEPS = 8
FINETUNE_STEPS = 3
# The default fine-tuning rate of the CLI: on the 124M shape the loss moves
# ~1.0 a step, so a module that skipped or botched the update fails at once.
LEARNING_RATE = 1e-3


class VerifyError(Gpt2IreeError):
    pass


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def _compare_state(module_state: dict, jax_state: dict, vocab_size: int) -> dict:
    """Largest relative error of the KV cache (any layer) and of the real-vocab logits."""
    kv = max(relative_error(module_state[k], jax_state[k]) for k in jax_state if k[0] in "kv")
    logits = relative_error(module_state["logits"][:, :vocab_size], np.asarray(jax_state["logits"])[:, :vocab_size])
    return {"kv": kv, "logits": logits}


def check_parity(module, seed: int = 0) -> dict:
    """Run encode, decode and finetune on `module` (a runtime.Module) and on JAX."""
    import jax
    import jax.numpy as jnp

    from gpt2_iree import model

    manifest = module.manifest
    cfg = model.GPT2Config(**manifest["config"])
    shapes = model.Shapes(**manifest["shapes"])
    B, K, S = shapes.batch, shapes.prompt_len, shapes.seq_len
    params = {name: jnp.asarray(v) for name, v in module.archive_weights().items()}
    rng = np.random.default_rng(seed)

    # Rows of different lengths exercise the padding paths of encode and decode.
    prompt = rng.integers(0, cfg.vocab_size, (B, K), dtype=np.int32)
    lengths = np.array([max(1, K - b) for b in range(B)], np.int32)
    tokens = [module.encode(prompt, lengths)[:, 0]]
    state = module.get_state()
    cache, token = jax.jit(lambda p, x, n: model.encode(p, cfg, shapes, x, n))(params, prompt, lengths)
    ref_tokens = [np.asarray(token)]
    encode_err = _compare_state(state, cache, cfg.vocab_size)

    steps = min(DECODE_STEPS, S - K)
    decode = jax.jit(lambda p, c: model.decode(p, cfg, shapes, c))
    for _ in range(steps):
        tokens.append(module.decode()[:, 0])
        cache, token = decode(params, cache)
        ref_tokens.append(np.asarray(token))
    decode_err = _compare_state(module.get_state(), cache, cfg.vocab_size)
    tokens_equal = all(np.array_equal(a, b) for a, b in zip(tokens, ref_tokens))

    text = rng.integers(0, cfg.vocab_size, (B, S), dtype=np.int32)
    target = np.roll(text, -1, axis=1)
    text_lengths = np.array([max(1, S - 1 - b) for b in range(B)], np.int32)
    optimizer = model.make_optimizer(manifest["optimizer"])
    opt_state = optimizer.init(params)
    step = jax.jit(lambda p, o, lr: model.train_step(p, o, cfg, optimizer, text, target, text_lengths, lr))
    losses, ref_losses = [], []
    for _ in range(FINETUNE_STEPS):
        losses.append(module.finetune(text, target, text_lengths, LEARNING_RATE))
        params, opt_state, loss = step(params, opt_state, np.float32(LEARNING_RATE))
        ref_losses.append(float(loss))
    tuned = module.get_params()
    names = sorted(params)
    # All weights as one vector: a tensor whose gradient is zero in exact
    # arithmetic (the key bias: softmax ignores a constant shift) gets an
    # Adafactor update normalised from rounding noise, which no two
    # implementations share; its share of the whole is what matters.
    params_err = relative_error(np.concatenate([tuned[n].ravel() for n in names]),
                                np.concatenate([np.asarray(params[n]).ravel() for n in names]))
    per_tensor = {n: relative_error(tuned[n], params[n]) for n in names}
    worst = max(per_tensor, key=per_tensor.get)

    errors = {
        "encode_logits": encode_err["logits"], "encode_kv": encode_err["kv"],
        "decode_logits": decode_err["logits"], "decode_kv": decode_err["kv"],
        "finetune_loss": max(relative_error(a, b) for a, b in zip(losses, ref_losses)),
        "finetune_params": params_err,
    }
    return {
        "kind": "parity",
        "device": module.device,
        "tolerance": TOLERANCE,
        "tokens": [t.tolist() for t in tokens],
        "tokens_equal": tokens_equal,
        "decode_steps": steps,
        "losses": losses,
        "reference_losses": ref_losses,
        "relative_errors": errors,
        "worst_param_tensor": {"name": worst, "relative_error": per_tensor[worst]},
        "passed": tokens_equal and all(e <= TOLERANCE for e in errors.values()),
    }


def exported_functions(dump: str) -> list[str]:
    """Function names from the "Exported Functions:" section of iree-dump-module."""
    section = dump.split("Exported Functions:", 1)[-1].split("\n\n", 1)[0]
    return re.findall(r"^\s+\[\s*\d+\]\s+(\w+)\(", section, re.MULTILINE)


def check_structure(vmfb: Path, executable_format: str, functions: list[str], dump_tool: str) -> dict:
    """What a module for a device we lack must hold: its executable format and all
    entry points; a Metal module must carry MSL source (`kernel void`)."""
    dump = subprocess.run([dump_tool, str(vmfb)], check=True, capture_output=True, text=True).stdout
    exported = exported_functions(dump)
    missing = [f for f in functions if f not in exported]
    checks = {"executable_format": executable_format in dump, "functions": not missing}
    if executable_format.startswith("metal"):
        with zipfile.ZipFile(vmfb) as archive:
            checks["msl_source"] = any(b"kernel void" in archive.read(n) for n in archive.namelist())
    return {
        "kind": "structure",
        "executable_format": executable_format,
        "exported": exported,
        "missing_functions": missing,
        "checks": checks,
        "passed": all(checks.values()),
    }


def verify_build(build_dir: Path, target_name: str, report_path: Path) -> dict:
    """The verify stage: parity where this host runs the target, else structure.

    The report is written either way (it is how a failure is read); a failed
    check then raises, so doit marks the stage failed and retries it next run.
    """
    from gpt2_iree import export, runtime, targets
    from gpt2_iree.files import write_json
    from gpt2_iree.toolchain import runtime_tool

    build_dir = Path(build_dir)
    target = targets.get_target(target_name)
    vmfb = build_dir / f"gpt2-{target_name}.vmfb"
    runnable = target.runtime_driver in runtime.available_devices() and target_name != "ios"
    if runnable:
        report = check_parity(runtime.Module(build_dir, device=target.runtime_driver))
    else:
        report = check_structure(vmfb, target.executable_format, list(export.FUNCTIONS),
                                 runtime_tool("iree-dump-module"))
    report["target"] = target_name
    write_json(Path(report_path), report)
    print(summary(report))
    if not report["passed"]:
        raise VerifyError(f"verify:{target_name} failed; see {report_path}")
    return report


def summary(report: dict) -> str:
    if report["kind"] == "structure":
        return (f"{report['target']}: structure {'ok' if report['passed'] else 'FAILED'} "
                f"({report['executable_format']}, {len(report['exported'])} functions, checks {report['checks']})")
    errors = ", ".join(f"{k} {v:.1e}" for k, v in report["relative_errors"].items())
    return (f"{report['target']}: parity with JAX {'ok' if report['passed'] else 'FAILED'} on {report['device']} "
            f"(tokens equal: {report['tokens_equal']}; relative errors: {errors}; tolerance {report['tolerance']:g})")
