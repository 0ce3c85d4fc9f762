"""doit vars -> one validated, frozen BuildConfig that names every path.

Every value is checked when the graph is loaded, before any task runs, and a
bad one stops doit with the value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import shlex
from pathlib import Path

from doit import doit_cmd
from doit.exceptions import InvalidCommand

import gpt2_iree
from gpt2_iree import models, source_build
from gpt2_iree.targets import TARGETS

# Relative to the working directory, which doit sets to the dodo.py's folder
# (the repo root); tests run the graph from a temporary directory instead.
BUILD = Path("build")
ASSETS = Path("assets")
STATE = Path(".doit")
# toolchain=source's IREE: one checkout, build and install for every configuration.
IREE = source_build.Tree(BUILD / "iree")
LIBRARY = Path(gpt2_iree.__file__).resolve().parent
WEIGHTS = ("pretrained", "random")
OPTIMIZERS = ("adafactor", "sgd", "adamw")  # gpt2_iree.model.OPTIMIZERS, without importing jax
DEFAULT_TARGETS = ("metal", "ios", "cpu")
TOOLCHAINS = ("wheel", "source")
TUNINGS = ("full", "lora")
LORA_TARGETS = ("attn", "mlp")  # gpt2_iree.lora.TARGETS, without importing jax
GENERATE_WEIGHTS = ("float16", "int8")  # gpt2_iree.generate_weights.FORMATS, without importing jax

# name -> (default, one-line help); `doit help` users read this table too.
VARS = {
    "model": ("gpt2", f"{' | '.join(models.MODEL_NAMES)} | a local Hugging Face GPT-2 directory"),
    "weights": ("pretrained", " | ".join(WEIGHTS)),
    "targets": (",".join(DEFAULT_TARGETS), f"comma list of {', '.join(TARGETS)}"),
    "batch": ("1", "independent sequences generated (and texts fine-tuned) at once"),
    "prompt_len": ("64", "prefill chunk: prompt tokens per prefill call, at most context"),
    "context": ("", "KV cache positions: the longest prompt plus completion (default: the model's n_positions)"),
    "seq_len": ("128", "fine-tuning window in tokens, at most the model's n_positions"),
    "optimizer": ("", f"{' | '.join(OPTIMIZERS)} (default: adafactor; with tuning=lora, adamw)"),
    "tuning": ("full", "full (fine-tune every weight) | lora (adapters on a frozen base, one module)"),
    "lora_rank": ("8", "tuning=lora: the adapters' rank"),
    "lora_alpha": ("16", "tuning=lora: the adapters' alpha (they are scaled by alpha / rank)"),
    "lora_targets": ("attn", "tuning=lora: attn (q/k/v and attention output) | mlp (both MLP matrices) | attn,mlp"),
    "generate_weights": ("float16", "float16 | int8 (the weights generation reads: the generation module's, or "
                                    "tuning=lora's frozen base; int8 with a float16 scale per output channel, "
                                    "activations int8 per token)"),
    "hf_endpoint": ("", "Hugging Face mirror URL (or env GPT2_IREE_HF_ENDPOINT)"),
    "toolchain": ("wheel", f"{' | '.join(TOOLCHAINS)} (IREE built from iree_repo at iree_ref)"),
    "iree_repo": ("", f"toolchain=source: git URL or local clone of IREE (default {source_build.DEFAULT_REPO})"),
    "iree_ref": ("", "toolchain=source: branch, tag or full commit (default: the installed "
                     "iree-base-compiler's release tag, e.g. v3.13.0)"),
}


@dataclasses.dataclass(frozen=True)
class BuildConfig:
    model: str               # a name from models.MODEL_NAMES, or a directory path
    weights: str
    targets: tuple[str, ...]
    batch: int
    prompt_len: int
    context: int
    seq_len: int
    optimizer: str
    hf_endpoint: str | None
    toolchain: str = "wheel"
    # tuning=lora: {"rank", "alpha", "targets"}; None fine-tunes every weight.
    lora: dict | None = None
    generate_weights: str = "float16"
    iree_repo: str | None = None  # toolchain=source only, as are iree_ref
    iree_ref: str | None = None

    @property
    def hub(self) -> models.HubModel | None:
        return models.HUB_MODELS.get(self.model)

    @property
    def is_local_dir(self) -> bool:
        return self.model not in models.MODEL_NAMES

    @property
    def model_key(self) -> str:
        """A directory name for the model: its name, or a local dir's name and path hash."""
        if not self.is_local_dir:
            return self.model
        path = str(Path(self.model).resolve())
        return f"local-{Path(path).name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"

    @property
    def needs_assets(self) -> bool:
        """Random weights of a Hub model need nothing downloaded."""
        return not (self.hub and self.weights == "random")

    @property
    def model_dir(self) -> Path:
        """Where config.json, model.safetensors and tokenizer.json are."""
        if self.is_local_dir:
            return Path(self.model).resolve()
        return ASSETS / self.model

    @property
    def assets_lock(self) -> Path:
        """The small file that stands for the (big) model files downstream.
        A local directory is the user's: its lock lives in build/, not there."""
        if self.is_local_dir:
            return BUILD / self.model_key / "assets.lock.json"
        return self.model_dir / "assets.lock.json"

    @property
    def config_key(self) -> str:
        """Also keys the toolchain: a source build's outputs (and doit state) are
        never taken for the wheels', so switching back and forth finds both up to date."""
        key = f"{self.weights}-b{self.batch}-k{self.prompt_len}-c{self.context}-s{self.seq_len}-{self.optimizer}"
        if self.lora:
            key += f"-lora-r{self.lora['rank']}-a{_exact(self.lora['alpha'])}-{'+'.join(self.lora['targets'])}"
        if self.generate_weights != "float16":
            key += f"-gen-{self.generate_weights}"
        return key if self.toolchain == "wheel" else f"{key}-{self.toolchain}"

    @property
    def toolchain_json(self) -> Path:
        """The toolchain record: which iree-compile and which IREE Python packages."""
        return BUILD / ("toolchain.json" if self.toolchain == "wheel" else f"toolchain-{self.toolchain}.json")

    @property
    def build_dir(self) -> Path:
        return BUILD / self.model_key / self.config_key

    @property
    def state_file(self) -> Path:
        """doit's dependency database for this configuration. doit keeps state by
        task name, so one shared database would see `export` of another config's
        files as a change; one per configuration keeps every config up to date.
        Outside build/, which `doit clean` empties."""
        return STATE / self.model_key / f"{self.config_key}.sqlite3"

    def shapes(self) -> dict:
        return {"batch": self.batch, "prompt_len": self.prompt_len, "context": self.context, "seq_len": self.seq_len}

    def doit_vars(self) -> str:
        """The vars, but `targets`, that give this configuration again, the
        defaults left out: `doit <these> targets=...` builds into this build_dir.
        (The manifest keeps them, for the runtime's "build it with" hints.)"""
        values = {"model": self.model, "weights": self.weights, **self.shapes(), "optimizer": self.optimizer,
                  "generate_weights": self.generate_weights, "toolchain": self.toolchain,
                  "iree_repo": self.iree_repo, "iree_ref": self.iree_ref}
        if self.lora:
            values |= {"tuning": "lora", "lora_rank": self.lora["rank"], "lora_alpha": _exact(self.lora["alpha"]),
                       "lora_targets": ",".join(self.lora["targets"])}
        return " ".join(f"{name}={shlex.quote(str(value))}" for name, value in values.items()
                        if value is not None and str(value) != VARS[name][0])


def _exact(number: float) -> str:
    """`number` written short where that is exact (16, 0.5), else in full:
    never two values under one build key or var."""
    short = f"{number:g}"
    return short if float(short) == number else repr(number)


def _positive_int(name: str, text: str, maximum: int | None = None, bounded_by: str = "") -> int:
    """`text` as an integer in 1..maximum; `bounded_by` says what sets the maximum."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or (maximum is not None and value > maximum):
        bound = f"1..{maximum}{f' ({bounded_by})' if bounded_by else ''}" if maximum else "a positive integer"
        raise ValueError(f"{name}={text!r} is invalid; valid: {bound}")
    return value


def _n_positions(model: str) -> int:
    """The model's positions, without loading it: from the model table, or a
    local directory's config.json (checked to exist by then)."""
    if model in models.HUB_MODELS:
        return models.HUB_MODELS[model].n_positions
    if model == models.TINY:
        return models.TINY_SHAPE["n_positions"]
    try:
        return int(json.loads((Path(model) / "config.json").read_text())["n_positions"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"model={model}: config.json has no readable n_positions ({err})") from None


def _positive_number(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ValueError(f"{name}={text!r} is invalid; valid: a positive number")
    return value


def _lora(values: dict, raw: dict) -> dict | None:
    """LoRA's settings of tuning=lora, else None; lora_* vars given (`raw`) to
    tuning=full are a mistake, not something to ignore."""
    given = [f"{name}={raw[name]}" for name in ("lora_rank", "lora_alpha", "lora_targets") if name in raw]
    if _choice("tuning", values["tuning"], TUNINGS) == "full":
        if given:
            raise ValueError(f"{' '.join(given)} applies to tuning=lora only; add tuning=lora")
        return None
    targets = [t.strip() for t in values["lora_targets"].split(",") if t.strip()]
    if not targets or any(t not in LORA_TARGETS for t in targets):
        raise ValueError(f"lora_targets={values['lora_targets']!r} is invalid; valid: attn, mlp or attn,mlp")
    return {"rank": _positive_int("lora_rank", values["lora_rank"]),
            "alpha": _positive_number("lora_alpha", values["lora_alpha"]),
            # In one order whatever the order given: they name one configuration.
            "targets": [t for t in LORA_TARGETS if t in targets]}


def _choice(name: str, value: str, valid) -> str:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is invalid; valid: {', '.join(valid)}")
    return value


def parse_config(raw: dict[str, str]) -> BuildConfig:
    """Validate raw var strings (defaults filled in) into a BuildConfig; ValueError if bad."""
    unknown = sorted(set(raw) - set(VARS))
    if unknown:
        raise ValueError(f"unknown doit var {', '.join(unknown)}; valid: {', '.join(VARS)}")
    values = {name: raw.get(name, default) for name, (default, _) in VARS.items()}
    model = values["model"]
    if model not in models.MODEL_NAMES:
        models.check_model_dir(Path(model))
    targets = tuple(t.strip() for t in values["targets"].split(",") if t.strip())
    if not targets:
        raise ValueError(f"targets={values['targets']!r} names no target; valid: {', '.join(TARGETS)}")
    for target in targets:
        _choice("targets", target, TARGETS)
    positions = _n_positions(model)
    limit = f"{Path(model).name}'s n_positions"
    context = _positive_int("context", values["context"] or str(positions), positions, limit)
    prompt_len = _positive_int("prompt_len", values["prompt_len"], context, f"context={context}")
    seq_len = _positive_int("seq_len", values["seq_len"], positions, limit)
    toolchain = _choice("toolchain", values["toolchain"], TOOLCHAINS)
    lora = _lora(values, raw)
    generate_weights = _choice("generate_weights", values["generate_weights"], GENERATE_WEIGHTS)
    iree_repo = iree_ref = None
    if toolchain == "source":
        iree_repo = source_build.check_repo(values["iree_repo"] or source_build.DEFAULT_REPO)
        iree_ref = source_build.check_ref(
            values["iree_ref"] or source_build.default_ref(importlib.metadata.version("iree-base-compiler")))
    elif values["iree_repo"] or values["iree_ref"]:
        given = " ".join(f"{v}={values[v]}" for v in ("iree_repo", "iree_ref") if values[v])
        raise ValueError(f"{given} applies to toolchain=source only; add toolchain=source")
    return BuildConfig(
        model=model,
        weights=_choice("weights", values["weights"], WEIGHTS),
        targets=tuple(dict.fromkeys(targets)),
        batch=_positive_int("batch", values["batch"]),
        prompt_len=prompt_len,
        context=context,
        seq_len=seq_len,
        # LoRA's B starts at zero, and Adafactor scales each step by the weight's
        # size: B would barely move. AdamW's state for adapters is small.
        optimizer=_choice("optimizer", values["optimizer"] or ("adamw" if lora else "adafactor"), OPTIMIZERS),
        lora=lora,
        generate_weights=generate_weights,
        hf_endpoint=values["hf_endpoint"] or None,
        toolchain=toolchain,
        iree_repo=iree_repo,
        iree_ref=iree_ref,
    )


def load_config() -> BuildConfig:
    """The BuildConfig of this doit run's command-line vars."""
    # doit keeps every `name=value` of the command line here; reading them all
    # (not only the names we know) is what lets a typo such as `modle=` fail.
    raw = dict(doit_cmd._CMDLINE_VARS or {})
    try:
        return parse_config(raw)
    except ValueError as err:
        raise InvalidCommand(str(err)) from None
