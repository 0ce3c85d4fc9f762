"""Prove the compiled modules right: run them against the JAX reference on the same weights.

For a target this host executes, the module is driven as Session drives it
(generation.Rows) and compared with JAX: a chunked prefill and greedy decode
steps across a context shift against JAX's full causal forward (tokens equal;
logits and KV cache within TOLERANCE relative: norm of the difference over
norm of the reference, for the cache less one step of its dtype per value);
sampled steps against the same sampler run by JAX (tokens equal), and top-k
1 against greedy; fine-tuning losses, weights, the
optimizer's state and `eval_loss` within TOLERANCE; and a step from weights
and optimizer state written back with set_params/set_opt_state must repeat
the step taken straight on, as a resumed checkpoint does. The generation
module is compared with JAX on the same float16-rounded weights, to the same
tolerance, or on the same int8 ones, to INT8_TOLERANCE or NOISE_MARGIN times
what float32 rounding moves in JAX's own int8 result, whichever is larger;
what the rounding itself costs is reported beside. For a target
this host cannot run, the artifacts are checked structurally, and where the
host has Vulkan, the target's kernels compiled for it run the parity checks
too (`targets.on_vulkan`). A LoRA build's module is compared with JAX
running the same adapters on the same float16 or int8 base (`lora.network`),
its generation checked after the fine-tuning steps, once the adapters matter.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np

from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.generate_weights import INT8_SCALE

TOLERANCE = 1e-4
# An int8 generation module rounds every activation to int8, and a value that
# lies within float32's noise of a rounding boundary can round up in the
# module's chunked prefill and down in JAX's whole forward: one step of 1/127
# of a token's largest value, which moved tiny's K/V 5.5e-4 on every target.
# A wrong kernel moves them by O(1); the int8 rounding itself moves tiny's
# logits 1.2e-2.
INT8_TOLERANCE = 5e-3
# A larger model amplifies such a flip into every later layer: a random 124M
# model's int8 logits move 2.7e-2 when its input moves by float32 rounding,
# in JAX alone. So an int8 check measures that move (`_rounding_noise`) and
# allows the module this many times it; where it exceeds the tolerance,
# tokens, which any such move can change, are reported and not required.
NOISE_MARGIN = 2.0
DECODE_STEPS = 16
SAMPLED_STEPS = 32
FINETUNE_STEPS = 3
# The default fine-tuning rate of the CLI: on the 124M shape the loss moves
# ~1.0 a step, so a module that skipped or botched the update fails at once.
LEARNING_RATE = 1e-3


class VerifyError(Gpt2IreeError):
    pass


def relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def cache_error(actual, expected, cache_dtype: np.dtype) -> float:
    """relative_error of a cache's K or V, less one step of `cache_dtype` per
    value. A value within float32's noise of a float16 rounding boundary
    rounds to one neighbour in the module and to the other in JAX: 124M's
    correct float16 cache differed by 9.8e-5 so, against a tolerance of 1e-4.
    A wrong kernel moves values by far more than a step (2^-11 relative)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    step = np.spacing(np.abs(expected).astype(cache_dtype)).astype(np.float64)
    beyond = np.maximum(np.abs(actual - expected) - step, 0.0)
    return float(np.linalg.norm(beyond) / max(np.linalg.norm(expected), 1e-30))


def _forward(params, cfg, tokens: list[int], length: int, cache_dtype: np.dtype) -> tuple[np.ndarray, dict]:
    """JAX's full causal forward over one sequence, an independent path from the
    cache, attending over K/V rounded to `cache_dtype` as the module's cache
    holds them: the last position's logits, and every position's K/V by layer.
    Padded to `length` (what is causal never sees the padding) so that one
    compiled forward serves every sequence."""
    from gpt2_iree import model

    def run(cfg, cache_dtype, p, t):
        kv = {}
        return model.forward(p, cfg, t, kv, cache_dtype)[0], {k: v[0] for k, v in kv.items()}

    padded = np.zeros((1, length), np.int32)
    padded[0, :len(tokens)] = tokens
    logits, kv = _jitted(run, static=2)(cfg, cache_dtype, params, padded)
    n = len(tokens)
    return np.asarray(logits[n - 1]), {k: np.asarray(v[:n]) for k, v in kv.items()}


_JITTED: dict = {}


def _jitted(fn, static: int = 1):
    """One jax.jit per function's code, reused across calls (a new closure each
    call would recompile). `fn` takes the model's config (and `static` - 1 more
    arguments) first, as static arguments: a closure over them would keep the
    first call's."""
    import jax

    return _JITTED.setdefault(fn.__code__, jax.jit(fn, static_argnums=tuple(range(static))))


def _cache_errors(state: dict, rows, params, cfg, cache_dtype: np.dtype) -> dict:
    """Largest relative error of each row's last logits and K/V (the slots its
    history fills) against `_forward` on that history."""
    logits_err, kv_err = 0.0, 0.0
    for row in range(rows.batch):
        logits, kv = _forward(params, cfg, rows.history[row], rows.context, cache_dtype)
        logits_err = max(logits_err, relative_error(state["logits"][row, :cfg.vocab_size], logits[:cfg.vocab_size]))
        n = len(rows.history[row])
        kv_err = max(kv_err, *(cache_error(state[k][row, :n], kv[k], cache_dtype) for k in kv))
    return {"logits": logits_err, "kv": kv_err}


def _check_generation(module, params: dict, seed: int) -> dict:
    """Chunked prefill, DECODE_STEPS greedy decode steps across a context shift,
    and SAMPLED_STEPS sampled ones, on `module` and on JAX with `params`.

    Prefill and decode are compared with JAX's full causal forward, which
    knows nothing of caches, chunks or windows: greedy tokens equal, logits and
    K/V within TOLERANCE. Sampling is compared with the same sampler run by JAX
    (`JaxReference`): tokens equal for the same seeds and settings; and top_k=1
    must be greedy.
    """
    from gpt2_iree import model
    from gpt2_iree.generation import Rows
    from gpt2_iree.reference import JaxReference
    from gpt2_iree.sampling import Sampling

    cfg = model.GPT2Config(**module.manifest["config"])
    shapes = model.Shapes(**module.manifest["shapes"])
    B, T = shapes.batch, shapes.context
    rng = np.random.default_rng(seed)
    # Prompts that end a few steps short of a full context, not a whole number
    # of chunks, of different lengths per row: the decode steps then cross a
    # context shift, and every row pads its last chunk differently.
    lengths = [max(1, T - DECODE_STEPS // 2 - b) for b in range(B)]
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    rows = Rows(module)
    for row in range(B):
        rows.start(row, Sampling())
    rows.feed(dict(enumerate(prompts)))
    kv_dtype = module.cache_dtype
    errors = {f"prefill_{k}": v for k, v in _cache_errors(module.get_state(), rows, params, cfg, kv_dtype).items()}
    int8 = any(name.endswith(INT8_SCALE) for name in params)
    noise = {"rounding_noise": _rounding_noise(params, cfg, prompts[0], T, kv_dtype)} if int8 else {}

    visible = [list(p) for p in prompts]  # what each row's model sees, as llama.cpp's context shift keeps it
    tokens, reference = [], []
    for _ in range(DECODE_STEPS):
        for row in range(B):
            visible[row].append(rows.pending[row])
            if len(visible[row]) > T:
                visible[row] = visible[row][-(T // 2):]
        expected = [int(np.argmax(_forward(params, cfg, v, T, kv_dtype)[0][:cfg.vocab_size])) for v in visible]
        step = rows.step(set(range(B)))
        tokens.append([step[row] for row in range(B)])
        reference.append(expected)
    errors |= {f"decode_{k}": v for k, v in _cache_errors(module.get_state(), rows, params, cfg, kv_dtype).items()}

    settings = Sampling(temperature=0.8, top_k=50, top_p=0.95, seed=seed + 7)
    per_row = [dataclasses.replace(settings, seed=settings.seed + row) for row in range(B)]
    sampled = {name: _generated(target, prompts, per_row, SAMPLED_STEPS)
               for name, target in (("module", module), ("jax", JaxReference(module.manifest, params, kv_dtype)))}
    top1_tokens = _generated(module, prompts, [Sampling(temperature=1.0, top_k=1, seed=seed)] * B, DECODE_STEPS)
    greedy_tokens = _generated(module, prompts, [Sampling()] * B, DECODE_STEPS)

    return noise | {
        "cache_dtype": kv_dtype.name,
        "prompt_lengths": lengths,
        "tokens": tokens,
        "tokens_equal": tokens == reference,
        "decode_steps": DECODE_STEPS,
        "sampled": {"settings": dataclasses.asdict(settings), "steps": SAMPLED_STEPS, "tokens": sampled["module"],
                    "equal_to_jax": sampled["module"] == sampled["jax"],
                    "top_k_1_is_greedy": top1_tokens == greedy_tokens},
        "relative_errors": errors,
    }


def _generated(target, prompts: list[list[int]], settings: list, steps: int) -> list[list[int]]:
    """`steps` tokens of every row of `target` (a Module or a JaxReference) from
    `prompts`, each row with its own Sampling: per step, the rows' tokens."""
    from gpt2_iree.generation import Rows

    rows = Rows(target)
    for row, setting in enumerate(settings):
        rows.start(row, setting)
    every = set(range(len(prompts)))
    steps_out = [rows.feed(dict(enumerate(prompts)))] + [rows.step(every) for _ in range(steps - 1)]
    return [[step[row] for row in range(len(prompts))] for step in steps_out]


def _judged(report: dict, tolerance: float) -> dict:
    """`report` with the `tolerance` it is held to (raised to NOISE_MARGIN
    times its `rounding_noise`, where it has one) and whether it `passed`."""
    noise = report.get("rounding_noise", 0.0)
    allowed = max(tolerance, NOISE_MARGIN * noise)
    sampled = report["sampled"]
    tokens_required = noise <= tolerance
    tokens = report["tokens_equal"] and sampled["equal_to_jax"]
    return report | {"tolerance": allowed, "tokens_required": tokens_required,
                     "passed": ((tokens or not tokens_required) and sampled["top_k_1_is_greedy"]
                                and all(e <= allowed for e in report["relative_errors"].values()))}


def _rounding_noise(params, cfg, tokens: list[int], length: int, cache_dtype: np.dtype) -> float:
    """How far JAX's own last logits and K/V over `tokens` move when its
    input moves by float32 rounding (the position embeddings by about an ulp):
    the most two correct int8 implementations can be expected to differ by."""
    wpe = np.asarray(params["wpe"])
    nudge = np.float32(2.0 ** -22) * np.random.default_rng(0).standard_normal(wpe.shape, np.float32)
    (logits, kv), (moved_logits, moved_kv) = (_forward(p, cfg, tokens, length, cache_dtype)
                                              for p in (params, params | {"wpe": wpe * (1 + nudge)}))
    return max(relative_error(moved_logits[:cfg.vocab_size], logits[:cfg.vocab_size]),
               *(relative_error(moved_kv[k], kv[k]) for k in kv))


def check_parity(module, seed: int = 0) -> dict:
    """Run the generation entry points and finetune on `module` (a module.Module) and on JAX."""
    import jax
    import jax.numpy as jnp

    from gpt2_iree import generate_weights, lora, model

    manifest = module.manifest
    cfg = model.GPT2Config(**manifest["config"])
    B, S = manifest["shapes"]["batch"], manifest["shapes"]["seq_len"]
    tuning = lora.from_manifest(manifest)
    base = {name: jnp.asarray(v) for name, v in generate_weights.computed(module.stored_base() or {}).items()}
    base_format = generate_weights.of_build(manifest) if tuning else None
    tolerance = INT8_TOLERANCE if base_format == "int8" else TOLERANCE

    def network(trained, base=base):
        return lora.computed_weights(trained, base, tuning)

    params = {name: jnp.asarray(v) for name, v in module.archive_weights().items()}
    # Fresh adapters change nothing (B is zero): a LoRA build's generation is
    # checked after fine-tuning, on the adapters the module then holds.
    generation = None if tuning else _check_generation(module, params, seed)

    rng = np.random.default_rng(seed + 1)
    text = rng.integers(0, cfg.vocab_size, (B, S), dtype=np.int32)
    target = np.roll(text, -1, axis=1)
    text_lengths = np.array([max(1, S - 1 - b) for b in range(B)], np.int32)
    optimizer = model.make_optimizer(manifest["optimizer"])
    opt_state = optimizer.init(params)
    # The base is an argument, not a constant that XLA would fold for seconds.
    step = jax.jit(lambda p, o, b, lr: model.train_step(p, o, cfg, optimizer, text, target, text_lengths, lr,
                                                        network=lambda trained: network(trained, b)))
    losses, ref_losses = [], []
    for _ in range(FINETUNE_STEPS):
        losses.append(module.finetune(text, target, text_lengths, LEARNING_RATE))
        params, opt_state, loss = step(params, opt_state, base, np.float32(LEARNING_RATE))
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
                              model.loss_fn(network(params), cfg, text, target, text_lengths))
    resumed = _resumed_step_error(module, tuned, module_opt, (text, target, text_lengths))
    if tuning:
        generation = _check_generation(module, network({k: jnp.asarray(v) for k, v in module.get_params().items()}),
                                       seed)

    errors = generation["relative_errors"] | {
        "finetune_loss": max(relative_error(a, b) for a, b in zip(losses, ref_losses)),
        "finetune_params": params_err,
        "opt_state": opt_err,
        "eval_loss": eval_err,
        "resumed_step": resumed,
    }
    return _judged(generation | {
        "kind": "parity",
        "device": module.device,
        "tuning": manifest.get("tuning", {"mode": "full"}),
        **({"base_dtype": base_format} if tuning else {}),
        "losses": losses,
        "reference_losses": ref_losses,
        "relative_errors": errors,
        "worst_param_tensor": {"name": worst, "relative_error": per_tensor[worst]},
    }, tolerance)


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


def rounding_cost(cfg, rounded: dict, exact: dict, length: int, cache_dtype: np.dtype, seed: int = 0) -> dict:
    """What computing with `rounded` weights and a cache of `cache_dtype`
    instead of the `exact` float32 ones costs, at every position of one random
    sequence of `length` tokens: the logits' relative error, and how often the
    greedy token stays the same."""
    from gpt2_iree import model

    tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, length), dtype=np.int32)
    forward = _jitted(lambda cfg, kv_dtype, p, t: model.forward(p, cfg, t, None, kv_dtype)[0, :, :cfg.vocab_size],
                      static=2)
    with_rounded, with_exact = (np.asarray(forward(cfg, kv_dtype, p, tokens))
                                for p, kv_dtype in ((rounded, cache_dtype), (exact, np.dtype("float32"))))
    return {"positions": length, "logits": relative_error(with_rounded, with_exact),
            "greedy_agreement": float(np.mean(with_rounded.argmax(-1) == with_exact.argmax(-1)))}


def check_generation_parity(module, seed: int = 0) -> dict:
    """Run the generation entry points on the generation `module` and on JAX
    with the same weights, float16-rounded or int8 (generate_weights.py),
    stored and computed with as the module does (packed, packed.py, where the
    module is); also report what the rounding costs
    over a whole context (`rounding_cost`)."""
    import jax.numpy as jnp

    from gpt2_iree import generate_weights, model

    cfg = model.GPT2Config(**module.manifest["config"])
    dtype = module.manifest["generate"]["weights_dtype"]
    weights = module.archive_weights()
    params = {name: jnp.asarray(v) for name, v in generate_weights.computed(
        generate_weights.converted(weights, dtype, module.reads_packed_weights)).items()}
    report = _check_generation(module, params, seed)
    tolerance = INT8_TOLERANCE if dtype == "int8" else TOLERANCE
    return _judged(report | {
        "kind": "parity",
        "device": module.device,
        "weights_dtype": dtype,
        "rounding_cost": rounding_cost(cfg, params, weights, module.manifest["shapes"]["context"],
                                       module.cache_dtype, seed),
    }, tolerance)


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
    from gpt2_iree import compiler, targets
    from gpt2_iree.devices import available_devices
    from gpt2_iree.files import write_json
    from gpt2_iree.module import Module, read_manifest
    from gpt2_iree.toolchain import read_record, runtime_tool

    build_dir = Path(build_dir)
    build_manifest = read_manifest(build_dir)
    target = targets.get_target(target_name)
    have = available_devices()
    record = read_record(toolchain_json)

    def parity(generation: bool, device: str, target: str) -> dict:
        module = Module(build_dir, device=device, generation=generation, target=target)
        return check_generation_parity(module) if generation else check_parity(module)

    def structure(generation: bool) -> dict:
        return check_structure(build_dir / targets.vmfb_name(target_name, generation), target.executable_format,
                               build_manifest["generate"]["functions"] if generation else build_manifest["functions"],
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
    if "generate" in build_manifest and target.has_generation_module:
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

    def noise(r: dict) -> str:
        if "rounding_noise" not in r:
            return ""
        return (f", JAX's own int8 logits and K/V move {r['rounding_noise']:.1e} when its input moves by float32 "
                f"rounding{'' if r['tokens_required'] else ', so tokens are not required to match'}")

    def line(r: dict, what: str) -> str:
        if r["kind"] == "structure":
            return f"{what}: {structure(r)}"
        errors = ", ".join(f"{k} {v:.1e}" for k, v in r["relative_errors"].items())
        weights = ""
        if "weights_dtype" in r:
            cost = r["rounding_cost"]
            weights = (f" with {r['weights_dtype']} weights and {r['cache_dtype']} K/V (rounding them moved the "
                       f"logits {cost['logits']:.1e} "
                       f"and kept {cost['greedy_agreement']:.1%} of {cost['positions']} greedy tokens)")
        where = f"{r['device']}, running {r['module']}" if r["kind"] == "parity-on-vulkan" else r["device"]
        sampled = r["sampled"]
        tuning = r.get("tuning", {"mode": "full"})
        if tuning["mode"] == "lora":
            weights = (f" (LoRA rank {tuning['rank']}, alpha {tuning['alpha']:g}, on {'+'.join(tuning['targets'])}, "
                       f"{r['base_dtype']} base, {r['cache_dtype']} K/V)")
        text = (f"{what}: parity with JAX{weights} {'ok' if r['passed'] else 'FAILED'} on {where} "
                f"(greedy tokens equal: {r['tokens_equal']}; sampled tokens equal: {sampled['equal_to_jax']}; "
                f"top-k 1 greedy: {sampled['top_k_1_is_greedy']}; relative errors: {errors}; "
                f"tolerance {r['tolerance']:.1e}{noise(r)})")
        return f"{text}; {structure(r['structure'])}" if "structure" in r else text

    lines = [line(report, report["target"])]
    if "generation" in report:
        lines.append(line(report["generation"], f"{report['target']} generation module"))
    return "\n".join(lines)
