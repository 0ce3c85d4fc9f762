"""Time the compiled modules against `jax.jit` of the same functions on the same weights.

Every phase runs at the module's own shapes (manifest "shapes": batch B,
prefill chunk K, context C, fine-tuning window S), and both sides are driven
by the same host code (generation.Rows; JAX through reference.JaxReference):

* prefill: one prefill call of a full chunk (B, K) at position 0, in ms;
* long prefill: a prompt of LONG_PROMPT tokens (at most C), in ms: IREE in
  chunks of K, JAX in one call. It is the time to the first token;
* decode: after a chunk's prefill (not timed), DECODE_STEPS greedy steps; the
  time of the steps over their number is ms per token, tokens/s = 1000 / ms * B.
  Each step brings its token to the host on both sides, as a generation loop
  must to stream or stop;
* decode late: the same from position LATE_POSITION (or near the end of a
  shorter context), where a step reads most of the cache;
* decode sampled: the early decode at temperature 0.8, top-k 50, top-p 0.95 (IREE);
* finetune: one optimizer step on random text (B, S) at learning rate 1e-4, in s;
* peak memory (IREE only): the peak RSS of a fine-tuning step and of
  generation, each in a process of its own (peak_memory.py), in MB.

Every number is the median of `repeats` runs after `warmup` untimed ones (the
warm-up also absorbs JAX's jit compilation), and after more while a run still
grows the process, IREE and JAX taking turns run by run. Each engine's first
fine-tuning steps in a process that holds the other take 300-600 MB more
memory, faulting in fresh pages (124M: 0.6-0.8 s a step, for two rounds); one
warm-up left those in the timed runs, and the ratio wrong. JAX results are
brought to the host before the clock stops; so are the module's. The JAX side
threads its training state from step to step as the module does in its
globals, and runs optax's Adafactor, its fastest; the module runs the rewrite
in adafactor.py (the same step; `verify` holds the two together). Both sides
share this process, so both run with `module.reuse_freed_memory`.

IREE prefills and decodes on the build's generation module where it has one
for the device (float16 weights; see export.py), as `Session.generate` does;
decode is also timed on the whole (float32) module. JAX runs float32 weights:
with float16 ones XLA upcasts every weight in every call and is 7x slower.

A decode step of batch 1 must read every weight once, and late in the
context the K/V cache up to its position too: the floors are those bytes at
this machine's memory bandwidth as one thread's copy reads it
(`measure_bandwidth_gbs`). They are a reference line, not a wall: a pure
read on every core goes faster (on the 2-vCPU Intel Xeon of
docs/PERFORMANCE.md, a copy 23-25 GB/s, two threads' sums 29, llama.cpp's
float16 decode 33), and a CPU whose cache holds part of the weights too.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from gpt2_iree import host_cpu, peak_memory
from gpt2_iree.files import replace_atomically
from gpt2_iree.generate_weights import INT8_SCALE

DECODE_STEPS = 32
LONG_PROMPT = 512
LATE_POSITION = 900
FINETUNE_LR = 1e-4
# Warm-up rounds go on while a run grows the process by more than this.
WARM_GROWTH = 16 << 20
MAX_WARMUP = 8
METRICS = (  # result key, row label, unit
    ("prefill_ms", "prefill", "ms"),
    ("long_prefill_ms", "long prefill (time to first token)", "ms"),
    ("decode_ms_per_token", "decode", "ms/token"),
    ("decode_late_ms_per_token", "decode late in the context", "ms/token"),
    ("finetune_s_per_step", "finetune", "s/step"),
)


def measure_bandwidth_gbs(megabytes: int = 256, repeats: int = 7) -> float:
    """Memory bandwidth in GB/s: median of `np.copyto` between two ~256 MB float32
    arrays, counting the bytes read plus the bytes written."""
    n = megabytes * (1 << 20) // 4
    src = np.ones(n, np.float32)
    dst = np.zeros(n, np.float32)  # both touched, so no page fault is timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / statistics.median(times) / 1e9


def _growth_of(run) -> int:
    """The bytes that one call of `run` left the process holding beyond what it held before."""
    before = peak_memory.resident_bytes()
    run()
    return peak_memory.resident_bytes() - before


def _paired_medians(*runs, repeats: int, warmup: int) -> tuple[float, ...]:
    """Medians of `repeats` runs of each of `runs`, after `warmup` runs of each,
    and further rounds (MAX_WARMUP in all) while a run of the last round grew
    the process by more than WARM_GROWTH: it was still taking the memory it
    keeps, faulting in fresh pages, which a steady run does not pay. A run
    returns the seconds it measured. They take turns run by run, so a slow
    spell on a shared machine slows all of them rather than one."""
    rounds, warming = 0, True
    while rounds < warmup or (warmup and warming and rounds < MAX_WARMUP):
        warming = max(_growth_of(run) for run in runs) > WARM_GROWTH
        rounds += 1
    times = [[run() for run in runs] for _ in range(repeats)]
    return tuple(statistics.median(column) for column in zip(*times))


def _clocked(fn):
    """`fn` as a run for `_paired_medians`: the seconds one whole call of it takes."""
    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return run


def _pair(iree: float, jax_value: float) -> dict:
    return {"iree": iree, "jax": jax_value, "ratio": iree / jax_value}


def run_benchmark(build_dir: Path, device: str | None = None, repeats: int = 5, warmup: int = 1,
                  with_peers: bool = False, log=print) -> dict:
    """Prefill, decode and fine-tuning time of the build's modules on `device`
    (the runtime's default when None) and of JAX on its default backend;
    `with_peers`, also PyTorch's fine-tuning step (peers.py)."""
    import jax
    import jax.numpy as jnp

    from gpt2_iree import generate_weights, lora, model, peers
    from gpt2_iree.generation import Rows
    from gpt2_iree.module import Module, has_generation_module
    from gpt2_iree.reference import JaxReference
    from gpt2_iree.sampling import Sampling

    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    module = Module(Path(build_dir), device)
    manifest = module.manifest
    generator = (Module(Path(build_dir), module.device, generation=True)
                 if has_generation_module(module.build_dir, manifest, module.target) else module)
    # What the weights a decode step reads are stored as (the whole module's: float32).
    dtype = np.dtype(generate_weights.of_build(manifest) if generator.generation or "base" in manifest else np.float32)
    cfg = model.GPT2Config(**manifest["config"])
    shapes = model.Shapes(**manifest["shapes"])
    optimizer = manifest["optimizer"]
    B, K, C, S = shapes.batch, shapes.prompt_len, shapes.context, shapes.seq_len
    steps = max(1, min(DECODE_STEPS, C - K))
    long_prompt = min(LONG_PROMPT, C)
    late = max(K, min(LATE_POSITION, C - steps - 1))
    log(f"bench: {manifest['model']} (B={B}, K={K}, context {C}, S={S}, {optimizer}) on IREE {module.device} "
        f"vs JAX {jax.default_backend()}; medians of {repeats} after {warmup} warm-up, more while a run "
        f"still grows the process; IREE generates with {dtype.name} weights")

    tuning = lora.from_manifest(manifest)
    trained = {name: jnp.asarray(v) for name, v in module.archive_weights().items()}
    # JAX at its fastest: on the plain layout, whatever the module reads.
    base = {name: jnp.asarray(v) for name, v in
            generate_weights.computed(generate_weights.unpacked(module.stored_base() or {})).items()}

    def network(trained, base=base):
        return lora.computed_weights(trained, base, tuning)

    params = network(trained)
    # What a decode step reads, counted as float32 (the floors scale it to the module's dtype).
    weight_bytes = sum(v.size * 4 for name, v in (base or trained).items() if not name.endswith(INT8_SCALE))
    reference = JaxReference(manifest, params, generator.cache_dtype)

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, (B, late), dtype=np.int32).tolist()
    text = rng.integers(0, cfg.vocab_size, (B, S), dtype=np.int32)
    target = np.roll(text, -1, axis=1)
    text_lengths = np.full((B,), S - 1, np.int32)
    lr = np.float32(FINETUNE_LR)

    def prefill_run(target_module, tokens: int):
        rows = Rows(target_module)

        def run() -> float:
            for row in range(B):
                rows.start(row, Sampling())
            start = time.perf_counter()
            rows.feed({row: prompt[row][:tokens] for row in range(B)})
            return time.perf_counter() - start
        return run

    def decode_run(target_module, position: int, sampling: Sampling = Sampling()):
        """`steps` decode steps after a prefill of `position` tokens (not timed)."""
        rows = Rows(target_module)

        def run() -> float:
            for row in range(B):
                rows.start(row, sampling)
            rows.feed({row: prompt[row][:position] for row in range(B)})
            start = time.perf_counter()
            for _ in range(steps):
                rows.step(set(range(B)))
            return (time.perf_counter() - start) / steps
        return run

    # --- prefill: a chunk, then a long prompt (JAX in one call of its length) ---
    iree_prefill, jax_prefill = _paired_medians(prefill_run(generator, K), prefill_run(reference, K),
                                                repeats=repeats, warmup=warmup)
    log(f"  prefill   IREE {iree_prefill * 1e3:9.3f} ms   JAX {jax_prefill * 1e3:9.3f} ms   ({K} tokens)")
    long_reference = JaxReference(manifest, params, generator.cache_dtype, long_prompt)
    iree_long, jax_long = _paired_medians(prefill_run(generator, long_prompt), prefill_run(long_reference, long_prompt),
                                          repeats=repeats, warmup=warmup)
    log(f"  long prefill IREE {iree_long * 1e3:9.3f} ms   JAX {jax_long * 1e3:9.3f} ms   ({long_prompt} tokens; "
        f"IREE in chunks of {K}: its time to the first token)")

    # --- decode, early and late in the context ---
    if tuning:  # one module, on float16 weights: there is no float32 one to time beside it
        iree_decode_s, jax_decode_s = _paired_medians(decode_run(generator, K), decode_run(reference, K),
                                                      repeats=repeats, warmup=warmup)
        iree_decode_f32_s = None
    else:
        iree_decode_s, iree_decode_f32_s, jax_decode_s = _paired_medians(
            decode_run(generator, K), decode_run(module, K), decode_run(reference, K), repeats=repeats,
            warmup=warmup)
    f32 = f"; float32: {iree_decode_f32_s * 1e3:.3f}" if iree_decode_f32_s else ""
    log(f"  decode    IREE {iree_decode_s * 1e3:9.3f} ms/token ({dtype.name} weights{f32})   "
        f"JAX {jax_decode_s * 1e3:9.3f} ms/token ({steps} steps from position {K})")
    iree_late_s, jax_late_s = _paired_medians(decode_run(generator, late), decode_run(reference, late),
                                              repeats=repeats, warmup=warmup)
    log(f"  decode late IREE {iree_late_s * 1e3:9.3f} ms/token   JAX {jax_late_s * 1e3:9.3f} ms/token "
        f"({steps} steps from position {late})")
    sampled = Sampling(temperature=0.8, top_k=50, top_p=0.95)
    (iree_sampled_s,) = _paired_medians(decode_run(generator, K, sampled), repeats=repeats, warmup=warmup)
    log(f"  decode sampled IREE {iree_sampled_s * 1e3:9.3f} ms/token (temperature 0.8, top-k 50, top-p 0.95; "
        f"greedy {iree_decode_s * 1e3:.3f})")

    # --- finetune: both sides carry their weights and optimizer state forward ---
    optimizer_reference = model.make_optimizer(optimizer)
    # The base is an argument, not a constant that XLA would fold.
    jax_step = jax.jit(lambda p, o, b, x, t, n, r: model.train_step(
        p, o, cfg, optimizer_reference, x, t, n, r, network=lambda trained: network(trained, b)))
    state = {"params": trained, "opt": optimizer_reference.init(trained)}

    def jax_finetune_run():
        new_params, new_opt, _ = jax.block_until_ready(
            jax_step(state["params"], state["opt"], base, text, target, text_lengths, lr))
        state["params"], state["opt"] = new_params, new_opt

    iree_finetune, jax_finetune = _paired_medians(
        _clocked(lambda: module.finetune(text, target, text_lengths, FINETUNE_LR)), _clocked(jax_finetune_run),
        repeats=repeats, warmup=warmup)
    log(f"  finetune  IREE {iree_finetune:9.4f} s/step   JAX {jax_finetune:9.4f} s/step")

    bandwidth = measure_bandwidth_gbs()
    floor_f32_ms = weight_bytes / (bandwidth * 1e9) * 1e3
    floor_ms = floor_f32_ms * dtype.itemsize / 4
    # The K and V (float32) of every layer up to the late steps' mean position.
    cache_bytes = B * cfg.n_layer * 2 * (late + steps // 2) * cfg.n_embd * 4
    late_floor_ms = floor_ms + cache_bytes / (bandwidth * 1e9) * 1e3
    log(f"  memory bandwidth {bandwidth:.1f} GB/s; decode floor {floor_ms:.4f} ms/token "
        f"({weight_bytes * dtype.itemsize / 4e6:.1f} MB of {dtype.name} weights; float32: {floor_f32_ms:.4f}); "
        f"late {late_floor_ms:.4f} (and {cache_bytes / 1e6:.1f} MB of cache)")

    peak = peak_memory.peak_rss_mb(build_dir, module.device)
    log(f"  peak RSS  finetune {peak['finetune']:.0f} MB, generate {peak['generate']:.0f} MB "
        f"(each in a process of its own)")
    peer = peers.measure(build_dir, repeats) if with_peers else None
    if peer:
        log(f"  {peer['engine']}: finetune {peer['finetune_s_per_step']:.4f} s/step, "
            f"peak RSS {peer['peak_rss_mb']:.0f} MB ({peer['threads']} threads, a process of its own)")

    return {
        "prefill_ms": _pair(iree_prefill * 1e3, jax_prefill * 1e3),
        "long_prefill_ms": _pair(iree_long * 1e3, jax_long * 1e3) | {"tokens": long_prompt},
        "decode_ms_per_token": _pair(iree_decode_s * 1e3, jax_decode_s * 1e3),
        "decode_late_ms_per_token": _pair(iree_late_s * 1e3, jax_late_s * 1e3) | {"position": late},
        "decode_sampled_ms_per_token": {"iree": iree_sampled_s * 1e3},
        "decode_float32_ms_per_token": _pair(iree_decode_f32_s * 1e3, jax_decode_s * 1e3) if iree_decode_f32_s
        else None,
        "finetune_s_per_step": _pair(iree_finetune, jax_finetune),
        "tokens_per_s": {"iree": B / iree_decode_s, "jax": B / jax_decode_s},
        "generation_weights": dtype.name,
        "bandwidth_gbs": bandwidth,
        "decode_floor_ms": floor_ms,
        "decode_late_floor_ms": late_floor_ms,
        "decode_float32_floor_ms": floor_f32_ms,
        "peak_rss_mb": peak,
        **({"peers": {"pytorch": peer}} if peer else {}),
        "model": manifest["model"],
        "config": {**manifest["config"], **manifest["shapes"], "optimizer": optimizer,
                   "tuning": manifest.get("tuning", {"mode": "full"})},
        "device": module.device,
        "cpu": host_cpu.describe_cpu(),
        "repeats": repeats,
    }


def _num(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def format_table(result: dict) -> str:
    """The result as a table: one row per phase, IREE and JAX times and their ratio."""
    c = result["config"]
    rows = [(f"{label} ({unit})", _num(result[key]["iree"]), _num(result[key]["jax"]),
             f"{result[key]['ratio']:.2f}x") for key, label, unit in METRICS]
    f32 = result["decode_float32_ms_per_token"]
    rows[3:3] = [("  tokens/s", _num(result["tokens_per_s"]["iree"]), _num(result["tokens_per_s"]["jax"]), ""),
                 *([("decode, float32 module (ms/token)", _num(f32["iree"]), _num(f32["jax"]),
                     f"{f32['ratio']:.2f}x")] if f32 else []),
                 ("decode, sampled (ms/token)", _num(result["decode_sampled_ms_per_token"]["iree"]), "", "")]
    header = ("", "IREE", "JAX", "IREE/JAX")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(row) -> str:
        return "  ".join([row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])])

    tuning = c.get("tuning", {"mode": "full"})
    shape = (f"B={c.get('batch')}, K={c.get('prompt_len')}, context {c.get('context')}, S={c.get('seq_len')}, "
             f"{c.get('optimizer')}" + (f", LoRA rank {tuning['rank']} on {'+'.join(tuning['targets'])}"
                                        if tuning["mode"] == "lora" else ""))
    dtype = result["generation_weights"]
    out = [f"{result['model']} ({shape}) on IREE {result['device']} vs jax.jit; "
           f"medians of {result['repeats']}; IREE/JAX < 1 means IREE is faster",
           f"CPU: {result['cpu']['model']}, SIMD {' '.join(result['cpu']['simd']) or 'unknown'}",
           f"IREE prefills and decodes with {dtype} weights, JAX with float32 (its fastest)",
           line(header), *(line(r) for r in rows),
           f"memory bandwidth: {result['bandwidth_gbs']:.1f} GB/s",
           f"decode floor (every weight read once per token): {result['decode_floor_ms']:.4g} ms/token with "
           f"{dtype} weights, {result['decode_float32_floor_ms']:.4g} with float32; IREE decode is "
           f"{result['decode_ms_per_token']['iree'] / result['decode_floor_ms']:.1f}x its floor",
           f"late in the context (position {result['decode_late_ms_per_token']['position']}, the cache read too): "
           f"floor {result['decode_late_floor_ms']:.4g} ms/token; IREE decode is "
           f"{result['decode_late_ms_per_token']['iree'] / result['decode_late_floor_ms']:.1f}x it",
           f"long prefill: {result['long_prefill_ms']['tokens']} tokens",
           f"peak RSS, each in a process of its own: a fine-tuning step {result['peak_rss_mb']['finetune']:.0f} MB, "
           f"generation {result['peak_rss_mb']['generate']:.0f} MB"]
    if "peers" in result:
        peer = result["peers"]["pytorch"]
        out.append(f"{peer['engine']}, the same step: {peer['finetune_s_per_step']:.4g} s/step "
                   f"(IREE/PyTorch {result['finetune_s_per_step']['iree'] / peer['finetune_s_per_step']:.2f}x), "
                   f"peak RSS {peer['peak_rss_mb']:.0f} MB "
                   f"(IREE/PyTorch {result['peak_rss_mb']['finetune'] / peer['peak_rss_mb']:.2f}x)")
    return "\n".join(out)


def plot(result: dict, path: Path) -> None:
    """A PNG of IREE vs JAX per phase (one subplot each: their units differ),
    with the decode floor drawn on the decode subplot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 4))
    for ax, (key, label, unit) in zip(axes, METRICS):
        values = [result[key]["iree"], result[key]["jax"]]
        bars = ax.bar(["IREE", "JAX"], values, color=["tab:blue", "tab:orange"])
        ax.bar_label(bars, labels=[_num(v) for v in values])
        ax.set_title(label)
        ax.set_ylabel(unit)
        floor = {"decode_ms_per_token": "decode_floor_ms", "decode_late_ms_per_token": "decode_late_floor_ms"}
        if key in floor:
            ax.axhline(result[floor[key]], color="tab:red", linestyle="--",
                       label=f"bandwidth floor ({result['generation_weights']} weights"
                             f"{', cache' if key != 'decode_ms_per_token' else ''}): {_num(result[floor[key]])} ms")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize="small", frameon=False)
        ax.margins(y=0.15)
    fig.suptitle(f"{result['model']} on IREE {result['device']} vs jax.jit (median of {result['repeats']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)
