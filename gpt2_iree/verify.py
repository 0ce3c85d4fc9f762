"""Prove the compiled modules right: run them against the JAX reference on the same weights.

For a target this host executes, every entry point is compared with the same
JAX functions the module was lowered from: greedy tokens must be equal, and
logits, KV cache, losses, fine-tuned weights, the optimizer's state and
`eval_loss` within TOLERANCE relative (norm of the difference over norm of the
reference); and a step from weights and optimizer state written back with
set_params/set_opt_state must repeat the step taken straight on, as a resumed
checkpoint does. The generation module is
compared with JAX on the same float16-rounded weights, to the same tolerance;
what the rounding itself costs is reported beside. For a target this host
cannot run, the artifacts are checked structurally instead.
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


def _check_generation(module, params: dict, seed: int) -> dict:
    """encode and up to DECODE_STEPS decode steps on `module` and on JAX with
    `params`: the tokens, whether they are equal, and the relative errors."""
    import jax

    from gpt2_iree import model

    cfg = model.GPT2Config(**module.manifest["config"])
    shapes = model.Shapes(**module.manifest["shapes"])
    B, K, S = shapes.batch, shapes.prompt_len, shapes.seq_len
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
    return {
        "tokens": [t.tolist() for t in tokens],
        "tokens_equal": all(np.array_equal(a, b) for a, b in zip(tokens, ref_tokens)),
        "decode_steps": steps,
        "relative_errors": {"encode_logits": encode_err["logits"], "encode_kv": encode_err["kv"],
                            "decode_logits": decode_err["logits"], "decode_kv": decode_err["kv"]},
    }


def check_parity(module, seed: int = 0) -> dict:
    """Run encode, decode and finetune on `module` (a runtime.Module) and on JAX."""
    import jax
    import jax.numpy as jnp

    from gpt2_iree import model

    manifest = module.manifest
    cfg = model.GPT2Config(**manifest["config"])
    B, S = manifest["shapes"]["batch"], manifest["shapes"]["seq_len"]
    params = {name: jnp.asarray(v) for name, v in module.archive_weights().items()}
    generation = _check_generation(module, params, seed)

    rng = np.random.default_rng(seed + 1)
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
    module_opt = module.get_opt_state()
    opt_err = relative_error(*(np.concatenate([np.ravel(v).astype(np.float64) for v in leaves] or [np.zeros(0)])
                               for leaves in (module_opt.values(), jax.tree.leaves(opt_state))))
    eval_err = relative_error(module.eval_loss(text, target, text_lengths),
                              model.loss_fn(params, cfg, text, target, text_lengths))

    errors = generation["relative_errors"] | {
        "finetune_loss": max(relative_error(a, b) for a, b in zip(losses, ref_losses)),
        "finetune_params": params_err,
        "opt_state": opt_err,
        "eval_loss": eval_err,
        "resumed_step": _resumed_step_error(module, tuned, module_opt, (text, target, text_lengths)),
    }
    return generation | {
        "kind": "parity",
        "device": module.device,
        "tolerance": TOLERANCE,
        "losses": losses,
        "reference_losses": ref_losses,
        "relative_errors": errors,
        "worst_param_tensor": {"name": worst, "relative_error": per_tensor[worst]},
        "passed": generation["tokens_equal"] and all(e <= TOLERANCE for e in errors.values()),
    }


def _resumed_step_error(module, params: dict, opt_state: dict, batch: tuple) -> float:
    """A step from restored weights and optimizer state against the same step
    taken straight on: what a checkpoint's resume relies on. Their largest
    relative error over the loss and the weights (0 when the restore is exact)."""
    loss = module.finetune(*batch, LEARNING_RATE)
    stepped = module.get_params()
    module.set_params(params)
    module.set_opt_state(opt_state)
    again = module.finetune(*batch, LEARNING_RATE)
    restepped = module.get_params()
    return max(relative_error(again, loss), *(relative_error(restepped[n], stepped[n]) for n in stepped))


def check_generation_parity(module, seed: int = 0) -> dict:
    """Run encode and decode on the generation `module` and on JAX with the same
    float16-rounded weights; also report what the rounding costs: the relative
    error of the reference's logits against float32 weights."""
    import jax
    import jax.numpy as jnp

    from gpt2_iree import model

    cfg = model.GPT2Config(**module.manifest["config"])
    shapes = model.Shapes(**module.manifest["shapes"])
    dtype = module.manifest["generate"]["weights_dtype"]
    weights = module.archive_weights()
    params = {name: jnp.asarray(v.astype(dtype).astype(np.float32)) for name, v in weights.items()}
    report = _check_generation(module, params, seed)
    B, K = shapes.batch, shapes.prompt_len
    prompt = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, K), dtype=np.int32)
    lengths = np.full((B,), K, np.int32)
    encode = jax.jit(lambda p: model.encode(p, cfg, shapes, prompt, lengths)[0]["logits"][:, :cfg.vocab_size])
    return report | {
        "kind": "parity",
        "device": module.device,
        "tolerance": TOLERANCE,
        "weights_dtype": dtype,
        "rounding_cost": {"encode_logits": relative_error(encode(params), encode(weights))},
        "passed": report["tokens_equal"] and all(e <= TOLERANCE for e in report["relative_errors"].values()),
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


def verify_build(build_dir: Path, target_name: str, report_path: Path, toolchain_json: Path) -> dict:
    """The verify stage: parity where this host runs the target; where it lacks
    the target's device but has Vulkan, parity of the target's kernels compiled
    for Vulkan (`targets.on_vulkan`) beside the structural check; else the
    structural check alone.

    The report is written either way (it is how a failure is read); a failed
    check then raises, so doit marks the stage failed and retries it next run.
    """
    from gpt2_iree import compiler, export, targets
    from gpt2_iree.devices import available_devices
    from gpt2_iree.files import write_json
    from gpt2_iree.module import Module
    from gpt2_iree.toolchain import read_record, runtime_tool

    build_dir = Path(build_dir)
    target = targets.get_target(target_name)
    have = available_devices()
    record = read_record(toolchain_json)

    def parity(generation: bool, device: str, target: str) -> dict:
        module = Module(build_dir, device=device, generation=generation, target=target)
        return check_generation_parity(module) if generation else check_parity(module)

    def structure(generation: bool) -> dict:
        return check_structure(build_dir / targets.vmfb_name(target_name, generation), target.executable_format,
                               list(export.GENERATE_FUNCTIONS if generation else export.FUNCTIONS),
                               runtime_tool("iree-dump-module"))

    if target.runtime_driver in have and target_name != "ios":
        def check(generation: bool) -> dict:
            return parity(generation, target.runtime_driver, target_name)
    elif target.gpu and "vulkan" in have and "vulkan-spirv" in record["target_backends"]:
        stand_in = targets.on_vulkan(target)
        compiler.compile_target(record["iree_compile"], build_dir, stand_in)

        def check(generation: bool) -> dict:
            shape = structure(generation)
            report = parity(generation, "vulkan", stand_in.name)
            return report | {"kind": "parity-on-vulkan", "module": targets.vmfb_name(stand_in.name, generation),
                             "structure": shape, "passed": report["passed"] and shape["passed"]}
    else:
        check = structure

    report = check(generation=False)
    if target.has_generation_module:
        report["generation"] = check(generation=True)
        report["passed"] = report["passed"] and report["generation"]["passed"]
    report["target"] = target_name
    write_json(Path(report_path), report)
    print(summary(report))
    if not report["passed"]:
        raise VerifyError(f"verify:{target_name} failed; see {report_path}")
    return report


def summary(report: dict) -> str:
    """One line for the whole module's check, and one for the generation module's."""
    def structure(r: dict) -> str:
        return (f"structure {'ok' if r['passed'] else 'FAILED'} ({r['executable_format']}, "
                f"{len(r['exported'])} functions, checks {r['checks']})")

    def line(r: dict, what: str) -> str:
        if r["kind"] == "structure":
            return f"{what}: {structure(r)}"
        errors = ", ".join(f"{k} {v:.1e}" for k, v in r["relative_errors"].items())
        weights = ""
        if "weights_dtype" in r:
            weights = (f" with {r['weights_dtype']} weights (rounding them moved the logits "
                       f"{r['rounding_cost']['encode_logits']:.1e})")
        where = f"{r['device']}, running {r['module']}" if r["kind"] == "parity-on-vulkan" else r["device"]
        text = (f"{what}: parity with JAX{weights} {'ok' if r['passed'] else 'FAILED'} on {where} "
                f"(tokens equal: {r['tokens_equal']}; relative errors: {errors}; tolerance {r['tolerance']:g})")
        return f"{text}; {structure(r['structure'])}" if "structure" in r else text

    lines = [line(report, report["target"])]
    if "generation" in report:
        lines.append(line(report["generation"], f"{report['target']} generation module"))
    return "\n".join(lines)
