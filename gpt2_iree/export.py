"""GPT-2 as stateful IREE modules: the entry points and the files they make.

The module `@gpt2` (gpt2.mlir) exports, with SAMPLING = temperature[B] f32,
top_k[B] i32, top_p[B] f32 (one setting per row; temperature 0 is greedy) and
POSITIONS = B scalars i32, passed by value (each row's length: where its next
K/V goes; the host keeps them, so that no call waits to read one back):
  prefill(chunk[B,K] i32, lengths[B] i32, POSITIONS, SAMPLING) -> next token[B,1]
      appends a chunk of each row's prompt to the KV cache at its position
  decode_<W>(active[B] i32, POSITIONS, SAMPLING) -> next token[B,1]   one step for the
      active rows, attending over the first W cache slots; one entry per window W of
      `Shapes.decode_windows`
  decode_greedy_<W>(active[B] i32, POSITIONS) -> next token[B,1]   the same step, greedy for
      every row and without the sampler (generation.Rows calls it when no
      active row samples); the generators stay as they were
  seed(seeds[B] i32, rows[B] i32)            restarts the generator of the rows flagged
  finetune(text[B,S], target[B,S], lengths[B], learning_rate) -> loss
  eval_loss(text[B,S], target[B,S], lengths[B]) -> loss          changes nothing
  get_params() -> every weight;  set_params(every weight)
  get_opt_state() -> the optimizer's state;  set_opt_state(that state)
  get_state() -> the last step's logits, the KV cache and the generators (for verification)
and keeps the weights, KV cache, generators and optimizer state in globals
between calls.

The module `@gpt2_generate` (gpt2-generate.mlir) exports only the generation
entries (prefill, decode_<W>, decode_greedy_<W>, seed, get_state), at half the memory traffic: its
weights are float16, from an archive of their own (gpt2-generate.irpa) that is
mapped and read in place, and no call changes them. The CPU's module,
gpt2-generate-packed.mlir, reads its float16 or int8 matrices from an
archive of its own too (gpt2-generate-packed.irpa), stored in the tiles its
kernels stream (packed.py): a 124M float16 decode step takes 16.5 ms
there, faster than data tiling made it (19; 25 untiled), without the
packed copy data tiling made at load.
After fine-tuning, the runtime opens it again on the new weights, made
float16 (and packed) on the host.

A LoRA build (`tuning`) has `@gpt2` alone, with the same entry points: its
`params` are the adapters (gpt2.irpa), and a `base` group that no entry
writes holds the model's weights, float16 or int8 as a generation module's
(generate_weights.py), from base.irpa; on float16, the CPU's module is
gpt2-packed.mlir, on the base packed (base-packed.irpa), which holds the
tied embedding plain too, for fine-tuning (generate_weights.PLAIN_WTE).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gpt2_iree import generate_weights, lora, model, packed, stateful
from gpt2_iree.archive import write_irpa
from gpt2_iree.files import replace_atomically, sha256_file, write_json, write_text
from gpt2_iree.generation import decode_function
from gpt2_iree.targets import packed_name, packs_weights

MODULE_NAME = "gpt2"
GENERATE_MODULE_NAME = "gpt2_generate"
GENERATE_DTYPE = np.dtype("float16")
MODULE_MLIR = "gpt2.mlir"
GENERATE_MLIR = "gpt2-generate.mlir"
GENERATE_ARCHIVE = "gpt2-generate.irpa"


def generate_functions(shapes: model.Shapes) -> list[str]:
    """The entry points of `@gpt2_generate`, in order."""
    return ["prefill", *(decode_function(window, greedy) for greedy in (False, True)
                         for window in shapes.decode_windows), "seed", "get_state"]


def functions(shapes: model.Shapes) -> list[str]:
    """The entry points of `@gpt2`, in order."""
    return [*generate_functions(shapes)[:-1], "finetune", "eval_loss", "get_params", "set_params", "get_opt_state",
            "set_opt_state", "get_state"]


def _i32(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def cache_dtype(tuning: lora.Lora | None) -> np.dtype:
    """What `@gpt2` keeps K and V in: float16 in a LoRA build, whose point is
    memory, as `@gpt2_generate` always does (80 MB of float32 for 124M at
    context 1024, a fifth of what generation holds); else float32, the
    dtype it trains in."""
    return GENERATE_DTYPE if tuning else np.dtype("float32")


def generation_state(cfg: model.GPT2Config, shapes: model.Shapes, kv_dtype: np.dtype = np.dtype("float32")) -> dict:
    """The state groups of generation: the KV cache (K and V in `kv_dtype`, and
    each row's position, last token and logits), and apart from it the rows'
    generators, which a greedy step leaves as they were.

    K and V have no initial value (their shapes stand for them): IREE then
    allocates them without writing, so a process that only fine-tunes never
    touches their pages (80 MB of float32 for 124M at context 1024), and
    `seed` zeroes a row's before generation reads them (model.started)."""
    cache, rng = _split(model.empty_cache(cfg, shapes, kv_dtype))
    kv = set(model.kv_names(cfg))
    return {"cache": {name: jax.ShapeDtypeStruct(v.shape, v.dtype) if name in kv else v for name, v in cache.items()},
            "rng": rng}


def state_names(cfg: model.GPT2Config, shapes: model.Shapes) -> list[str]:
    """What get_state returns, in order: the cache's leaves, then the generators'."""
    return [name for group in generation_state(cfg, shapes).values() for name in sorted(group)]


def _split(cache: dict) -> tuple[dict, dict]:
    return {k: v for k, v in cache.items() if k != "key"}, {"key": cache["key"]}


def _generation(cfg: model.GPT2Config, shapes: model.Shapes, weights: tuple[str, ...],
                network) -> dict[str, stateful.Entry]:
    """prefill, decode_<W>, seed and get_state, reading the weights from the
    state groups `weights` and computing in float32 with `network(*those
    groups)`: the weights as model.py takes them."""
    B, K = shapes.batch, shapes.prompt_len
    sampling = (jax.ShapeDtypeStruct((B,), jnp.float32), _i32(B), jax.ShapeDtypeStruct((B,), jnp.float32))
    positions = tuple(stateful.Scalar() for _ in range(B))
    n = len(weights)

    def prefill(*args):
        cache, rng, chunk, lengths, *rest = args[n:]
        new, token = model.prefill(network(*args[:n]), cfg, shapes, cache | rng, chunk, lengths, rest[:B],
                                   tuple(rest[B:]))
        return _split(new), token[:, None]

    def decoder(window: int):
        def decode(*args):
            cache, rng, active, *rest = args[n:]
            new, token = model.decode(network(*args[:n]), cfg, shapes, cache | rng, window, active, rest[:B],
                                      tuple(rest[B:]))
            return _split(new), token[:, None]
        return decode

    def greedy_decoder(window: int):
        def decode(*args):
            cache, rng, active, *positions = args[n:]
            new, token = model.decode(network(*args[:n]), cfg, shapes, cache | rng, window, active, positions, None)
            return _split(new)[:1], token[:, None]
        return decode

    def seed(cache, rng, seeds, rows):
        return _split(model.started(cfg, cache | rng, seeds, rows)), ()

    state = (*weights, "cache", "rng")
    table = {
        "prefill": stateful.Entry("prefill", prefill, (_i32(B, K), _i32(B), *positions, *sampling),
                                  reads=state, writes=("cache", "rng")),
        "seed": stateful.Entry("seed", seed, (_i32(B), _i32(B)), reads=("cache", "rng"), writes=("cache", "rng")),
        "get_state": stateful.Entry("get_state", lambda cache, rng: ((), (cache, rng)), reads=("cache", "rng")),
    }
    for window in shapes.decode_windows:
        name = decode_function(window)
        table[name] = stateful.Entry(name, decoder(window), (_i32(B), *positions, *sampling), reads=state,
                                     writes=("cache", "rng"))
        name = decode_function(window, greedy=True)
        table[name] = stateful.Entry(name, greedy_decoder(window), (_i32(B), *positions), reads=state,
                                     writes=("cache",))
    return table


def _avals(tree):
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), tree)


def _stored(params: dict, weights_format: str, packed_weights: bool = False, lora_base: bool = False) -> dict:
    """The avals of what a module stores of `params` in `weights_format`
    (`packed_weights`: packed.py's layout; `lora_base`: as a LoRA base)."""
    layout = generate_weights.layout({k: np.shape(v) for k, v in params.items()}, weights_format, packed_weights,
                                     lora_base)
    return {name: jax.ShapeDtypeStruct(shape, dtype) for name, (shape, dtype) in layout.items()}


def entries(cfg: model.GPT2Config, shapes: model.Shapes, optimizer: str, params,
            tuning: lora.Lora | None = None) -> list[stateful.Entry]:
    """The entry points of `@gpt2`, in `functions` order. `params` are what
    finetune trains: every weight, or with `tuning` the LoRA adapters, read
    with the `base` group that no entry writes."""
    B, S = shapes.batch, shapes.seq_len
    opt_state = jax.eval_shape(model.make_optimizer(optimizer).init, params)
    batch = (_i32(B, S), _i32(B, S), _i32(B))
    frozen = ("base",) if tuning else ()

    def network(*groups, step: bool = False):
        """The frozen groups and the trained params -> the weights model.py
        computes with (`step`: a fine-tuning step's, generate_weights.computed)."""
        return lora.network(generate_weights.computed(groups[0], step), groups[1], tuning) if tuning else groups[0]

    def finetune(*args):
        *frozen_groups, params, opt_state, text, target, lengths, learning_rate = args
        params, opt_state, loss = model.train_step(
            params, opt_state, cfg, model.make_optimizer(optimizer, for_iree=True), text, target, lengths,
            learning_rate, network=lambda trained: network(*frozen_groups, trained, step=True))
        return (params, opt_state), loss

    def eval_loss(*args):
        return (), model.loss_fn(network(*args[:len(frozen) + 1], step=True), cfg, *args[len(frozen) + 1:])

    table = _generation(cfg, shapes, (*frozen, "params"), network) | {
        "finetune": stateful.Entry("finetune", finetune,
                                   (*batch, jax.ShapeDtypeStruct((), jnp.float32)),
                                   reads=(*frozen, "params", "opt"), writes=("params", "opt")),
        "eval_loss": stateful.Entry("eval_loss", eval_loss, batch, reads=(*frozen, "params")),
        "get_params": stateful.Entry("get_params", lambda params: ((), params), reads=("params",)),
        "set_params": stateful.Entry("set_params", lambda new: ((new,), ()), (_avals(params),), writes=("params",)),
        # A checkpoint holds the optimizer's state, so that a resumed run takes
        # the very steps the uninterrupted one would have.
        "get_opt_state": stateful.Entry("get_opt_state", lambda opt: ((), opt), reads=("opt",)),
        "set_opt_state": stateful.Entry("set_opt_state", lambda new: ((new,), ()), (opt_state,),
                                        writes=("opt",)),
    }
    return [table[name] for name in functions(shapes)]


def initial_state(cfg: model.GPT2Config, shapes: model.Shapes, optimizer: str, params,
                  tuning: lora.Lora | None = None, base=None, weights_format: str = "float16",
                  packed_weights: bool = False) -> dict:
    return {
        **({"base": _stored(base, weights_format, packed_weights, lora_base=True)} if tuning else {}),
        "params": params,
        **generation_state(cfg, shapes, cache_dtype(tuning)),
        "opt": model.make_optimizer(optimizer).init(params),
    }


def opt_state_layout(optimizer: str, params) -> list[list]:
    """[name, shape, dtype] of each leaf of the optimizer's state, in the order
    get_opt_state returns them (names as JAX's key paths, e.g. `[0].v_row['wte']`)."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.eval_shape(model.make_optimizer(optimizer).init, params))[0]
    return [[jax.tree_util.keystr(path), list(np.shape(leaf)), np.dtype(leaf.dtype).name] for path, leaf in leaves]


def export_mlir(cfg: model.GPT2Config, shapes: model.Shapes, optimizer: str, params,
                tuning: lora.Lora | None = None, base=None, weights_format: str = "float16",
                packed_weights: bool = False) -> str:
    """The text of `@gpt2`. Only the shapes of `params` (and `base`) matter here.
    With `tuning`, `params` are the adapters and `base` the frozen weights,
    read from their archive in `weights_format` (`packed_weights`: packed.py's
    layout, multiplied by linalg.mmt4d: the CPU's module)."""
    state = initial_state(cfg, shapes, optimizer, params, tuning, base, weights_format, packed_weights)
    groups = ("base", "params") if tuning else ("params",)
    text = stateful.build_module(MODULE_NAME, state, groups, entries(cfg, shapes, optimizer, params, tuning))
    return packed.lowered(text, model.PACKED_PRODUCTS) if packed_weights else text


def export_generate_mlir(cfg: model.GPT2Config, shapes: model.Shapes, params, weights_format: str = "float16",
                         packed_weights: bool = False) -> str:
    """The text of `@gpt2_generate`: its `weights`, in `weights_format`
    (generate_weights.py), are read from an archive of their own
    (GENERATE_ARCHIVE). Converting float32 ones when the module loaded kept
    the float32 archive mapped beside the float16 copy and its packed layout:
    1,076 MB for 124M against 600. With `packed_weights` its float16 or
    int8 matrices are packed.py's, multiplied by linalg.mmt4d: the CPU's
    module."""
    state = {"weights": _stored(params, weights_format, packed_weights),
             **generation_state(cfg, shapes, GENERATE_DTYPE)}
    table = _generation(cfg, shapes, ("weights",), generate_weights.computed)
    text = stateful.build_module(GENERATE_MODULE_NAME, state, ("weights",),
                                 [table[n] for n in generate_functions(shapes)])
    return packed.lowered(text, model.PACKED_PRODUCTS) if packed_weights else text


def load_model(model_dir: Path | None, weights: str, shape: dict | None = None):
    """(config, params) from a Hugging Face directory, or seeded random weights.

    `weights="random"` takes the shape from `model_dir`'s config.json if given,
    else from `shape` (a Hub model's known shape, so nothing is downloaded).
    """
    from gpt2_iree import weights as hf

    cfg = hf.load_hf_config(model_dir) if model_dir else model.GPT2Config(**shape)
    if weights == "random":
        return cfg, {k: np.asarray(v) for k, v in model.init_params(cfg).items()}
    return cfg, hf.load_hf_params(model_dir, cfg)


BASE_ARCHIVE = "base.irpa"


def export_build(out_dir: Path, name: str, cfg: model.GPT2Config, params: dict, shapes: model.Shapes,
                 optimizer: str, weights: str, tokenizer: Path | None, tuning: lora.Lora | None = None,
                 weights_format: str = "float16", doit_vars: str = "") -> None:
    """Write the build directory's inputs into `out_dir`: gpt2.mlir, gpt2.irpa
    (what finetune trains), tokenizer.json and manifest.json; and
    gpt2-generate.mlir and its weights in `weights_format` (gpt2-generate.irpa), or with
    `tuning` (LoRA) base.irpa, the frozen weights in `weights_format`, which
    its one module both tunes and generates on; and where `packs_weights`,
    that module and its archive on the weights packed (packed.py).

    The manifest is what the runtime reads to open the build, and what later
    stages depend on instead of hashing the (large) archives again.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    trained = lora.init_adapters(cfg, tuning) if tuning else params

    def constant_weights_module(packed_weights: bool) -> str:
        """The text of the module that reads `params` as constants: a LoRA
        build's one module, else the generation module."""
        if tuning:
            return export_mlir(cfg, shapes, optimizer, trained, tuning, params, weights_format, packed_weights)
        return export_generate_mlir(cfg, shapes, params, weights_format, packed_weights)

    # That module and its archive of the weights; where packs_weights, both again
    # with the weights packed (packed.py), for the targets that read them so.
    mlir, archive = (MODULE_MLIR, BASE_ARCHIVE) if tuning else (GENERATE_MLIR, GENERATE_ARCHIVE)
    constant_text = constant_weights_module(packed_weights=False)
    write_text(out_dir / mlir, constant_text)
    write_irpa(generate_weights.converted(params, weights_format), out_dir / archive, dtype=None)
    packed_record = {}
    if packs_weights(weights_format, tuning is not None):
        packed_text = constant_weights_module(packed_weights=True)
        write_text(out_dir / packed_name(mlir), packed_text)
        write_irpa(generate_weights.converted(params, weights_format, packed=True, lora_base=tuning is not None),
                   out_dir / packed_name(archive), dtype=None)
        packed_record = {"packed": {"mlir": packed_name(mlir), "archive": packed_name(archive),
                                    "source_digest": stateful.source_digest(packed_text)}}
    module_text = constant_text if tuning else export_mlir(cfg, shapes, optimizer, trained)
    if not tuning:
        write_text(out_dir / MODULE_MLIR, module_text)
    write_irpa(trained, out_dir / "gpt2.irpa")
    if tokenizer:
        replace_atomically(out_dir / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer, tmp))
    # "packed": what a target with packed_weights reads instead (generate_weights.as_read_by).
    modules = {"base": {"archive": BASE_ARCHIVE, "weights_dtype": weights_format,
                        "params": [[k, list(params[k].shape)] for k in sorted(params)],
                        "sha256": sha256_file(out_dir / BASE_ARCHIVE), **packed_record}} if tuning else {
        "generate": {"module": GENERATE_MODULE_NAME, "mlir": GENERATE_MLIR, "functions": generate_functions(shapes),
                     "source_digest": stateful.source_digest(constant_text), "archive": GENERATE_ARCHIVE,
                     "weights_dtype": weights_format, "cache_dtype": GENERATE_DTYPE.name,
                     **packed_record}}
    write_json(out_dir / "manifest.json", {
        "model": name,
        "config": dataclasses.asdict(cfg),
        "shapes": dataclasses.asdict(shapes),
        "decode_windows": list(shapes.decode_windows),
        "cache_len": shapes.cache_len,
        "cache_dtype": cache_dtype(tuning).name,
        "optimizer": optimizer,
        "weights": weights,
        "tuning": tuning.as_manifest() if tuning else {"mode": "full"},
        "functions": functions(shapes),
        # What each module's compiled functions must carry (stateful.source_digest).
        "source_digest": stateful.source_digest(module_text),
        **modules,
        # get_params/set_params order: JAX flattens a dict in sorted key order.
        "params": [[k, list(trained[k].shape)] for k in sorted(trained)],
        # get_opt_state/set_opt_state order: the optimizer state's leaves, as JAX flattens them.
        "opt_state": opt_state_layout(optimizer, trained),
        "state": state_names(cfg, shapes),
        "irpa_sha256": sha256_file(out_dir / "gpt2.irpa"),
        "tokenizer": "tokenizer.json" if tokenizer else None,
        # The doit vars that built this directory (but targets): what a hint
        # to build a missing module prints, so that it builds this model.
        "doit_vars": doit_vars,
    })


def build(out_dir: Path, name: str, model_dir: Path | None, weights: str, shape: dict | None,
          shapes: dict, optimizer: str, tuning: dict | None = None, weights_format: str = "float16",
          doit_vars: str = "") -> None:
    """The export stage: load the model and write the build directory's inputs.
    `tuning` is None to train every weight, or LoRA's rank, alpha and targets;
    `weights_format` is the generation module's (generate_weights.FORMATS);
    `doit_vars` the vars that configured the build (tasks.config.BuildConfig.doit_vars)."""
    cfg, params = load_model(model_dir, weights, shape)
    for var in ("context", "seq_len"):
        if shapes[var] > cfg.n_positions:
            raise ValueError(f"{var}={shapes[var]} exceeds the model's {cfg.n_positions} positions")
    tokenizer = Path(model_dir) / "tokenizer.json" if model_dir else None
    export_build(Path(out_dir), name, cfg, params, model.Shapes(**shapes), optimizer, weights, tokenizer,
                 lora.Lora(tuning["rank"], tuning["alpha"], tuple(tuning["targets"])) if tuning else None,
                 weights_format, doit_vars)
