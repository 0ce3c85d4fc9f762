import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-network", action="store_true", help="run tests that need the internet")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-network"):
        return
    skip = pytest.mark.skip(reason="needs the internet; pass --run-network")
    for item in items:
        if "network" in item.keywords:
            item.add_marker(skip)


def export_tiny(root, batch: int = 1, optimizer: str = "adafactor", tuning: dict | None = None,
                weights_format: str = "float16"):
    """The tiny model's assets and build inputs under `root`, as the assets and
    export stages write them (no module compiled); the build directory."""
    from gpt2_iree import export, models

    models.write_tiny_model(root / "assets")
    export.build(root / "build", "tiny", root / "assets", "pretrained", None,
                 {"batch": batch, "prompt_len": 64, "context": 128, "seq_len": 128}, optimizer, tuning,
                 weights_format)
    return root / "build"


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """The tiny model exported, nothing compiled: for what reads only the archive and manifest."""
    return export_tiny(tmp_path_factory.mktemp("tiny-export"))


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """A built tiny model (cpu and metal modules, each whole and for generation), made once per test session
    with the same library calls the doit stages make."""
    from gpt2_iree import compiler, toolchain
    from gpt2_iree.targets import get_target

    build_dir = export_tiny(tmp_path_factory.mktemp("tiny"))
    for name in ("cpu", "metal"):
        compiler.compile_target(toolchain.iree_compile(), build_dir, get_target(name))
    return build_dir


@pytest.fixture(scope="session")
def toolchain_json(tmp_path_factory):
    """The toolchain record of the installed wheels, as the toolchain stage writes it."""
    from gpt2_iree import toolchain
    from gpt2_iree.targets import TARGETS

    path = tmp_path_factory.mktemp("toolchain") / "toolchain.json"
    toolchain.write_record(path, {name: target.backend for name, target in TARGETS.items()})
    return path


@pytest.fixture(scope="session")
def vulkan():
    """Skip where this host has no Vulkan device; fail instead where
    GPT2_IREE_REQUIRE_VULKAN is set (CI installs Mesa's lavapipe, and must not
    pass by skipping every GPU test if that install ever breaks)."""
    from gpt2_iree.devices import available_devices

    if "vulkan" not in available_devices():
        if os.environ.get("GPT2_IREE_REQUIRE_VULKAN"):
            pytest.fail("GPT2_IREE_REQUIRE_VULKAN is set but iree.runtime finds no Vulkan device "
                        "(apt-get install -y mesa-vulkan-drivers libvulkan1)")
        pytest.skip("no Vulkan device (apt-get install -y mesa-vulkan-drivers libvulkan1 gives Mesa's lavapipe)")
    return "vulkan"


@pytest.fixture(scope="session")
def tiny_vulkan_build(tiny_build, vulkan):
    """tiny_build with its vulkan modules too."""
    from gpt2_iree import compiler, toolchain
    from gpt2_iree.targets import get_target

    compiler.compile_target(toolchain.iree_compile(), tiny_build, get_target("vulkan"))
    return tiny_build


@pytest.fixture(scope="session")
def tiny_batch_build(tmp_path_factory):
    """The tiny model built for batch=2 (cpu modules only)."""
    from gpt2_iree import compiler, toolchain
    from gpt2_iree.targets import get_target

    build_dir = export_tiny(tmp_path_factory.mktemp("tiny-batch"), batch=2)
    compiler.compile_target(toolchain.iree_compile(), build_dir, get_target("cpu"))
    return build_dir


@pytest.fixture(scope="session")
def tiny_int8_build(tmp_path_factory):
    """The tiny model built with generate_weights=int8 (cpu modules only)."""
    from gpt2_iree import compiler, toolchain
    from gpt2_iree.targets import get_target

    build_dir = export_tiny(tmp_path_factory.mktemp("tiny-int8"), weights_format="int8")
    compiler.compile_target(toolchain.iree_compile(), build_dir, get_target("cpu"))
    return build_dir


# LoRA's settings in the tests: both targets, so every adapted projection is covered.
TINY_LORA = {"rank": 8, "alpha": 16.0, "targets": ["attn", "mlp"]}


@pytest.fixture(scope="session")
def tiny_lora_build(tmp_path_factory):
    """The tiny model built with tuning=lora (TINY_LORA, AdamW; cpu module only)."""
    from gpt2_iree import compiler, toolchain
    from gpt2_iree.targets import get_target

    build_dir = export_tiny(tmp_path_factory.mktemp("tiny-lora"), optimizer="adamw", tuning=TINY_LORA)
    compiler.compile_target(toolchain.iree_compile(), build_dir, get_target("cpu"))
    return build_dir


@pytest.fixture(scope="session")
def tiny_lora_int8_build(tmp_path_factory):
    """tiny_lora_build's LoRA on an int8 base (generate_weights=int8; cpu module only)."""
    from gpt2_iree import compiler, toolchain
    from gpt2_iree.targets import get_target

    build_dir = export_tiny(tmp_path_factory.mktemp("tiny-lora-int8"), optimizer="adamw", tuning=TINY_LORA,
                            weights_format="int8")
    compiler.compile_target(toolchain.iree_compile(), build_dir, get_target("cpu"))
    return build_dir


@pytest.fixture(scope="session")
def english_tiny_model(tmp_path_factory):
    """The tiny model after 300 AdamW steps on English-like text, as a Hugging
    Face directory: a base that has learned something, as LoRA needs. (On the
    random tiny model LoRA cannot get far: with its final norm and tied
    embeddings frozen, its logits stay within about +-1.3.)"""
    import jax
    import numpy as np
    from english import paragraphs

    from gpt2_iree import model, models, weights
    from gpt2_iree.tokenizer import Tokenizer, write_byte_tokenizer

    out = tmp_path_factory.mktemp("english-tiny")
    write_byte_tokenizer(out / "tokenizer.json")
    cfg, S, B = model.GPT2Config(**models.TINY_SHAPE), 128, 4
    tokens = np.asarray(Tokenizer(out / "tokenizer.json").encode(paragraphs(60_000)), np.int32)
    params, optimizer = model.init_params(cfg), model.make_optimizer("adamw")
    step = jax.jit(lambda p, o, x, y: model.train_step(p, o, cfg, optimizer, x, y, np.full(B, S, np.int32), 3e-3))
    opt_state, rng = optimizer.init(params), np.random.default_rng(0)
    for _ in range(300):
        starts = rng.integers(0, len(tokens) - S - 1, B)
        windows = np.stack([tokens[s:s + S + 1] for s in starts])
        params, opt_state, _ = step(params, opt_state, windows[:, :-1], windows[:, 1:])
    weights.save_hf_model({k: np.asarray(v) for k, v in params.items()}, cfg, out, out / "tokenizer.json")
    return out
