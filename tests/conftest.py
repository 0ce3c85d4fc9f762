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


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """A built tiny model (cpu and metal modules, each whole and for generation), made once per test session
    with the same library calls the doit stages make."""
    from gpt2_iree import compiler, export, models, toolchain
    from gpt2_iree.targets import get_target

    root = tmp_path_factory.mktemp("tiny")
    model_dir, build_dir = root / "assets", root / "build"
    models.write_tiny_model(model_dir)
    export.build(build_dir, "tiny", model_dir, "pretrained", None,
                 {"batch": 1, "prompt_len": 64, "context": 128, "seq_len": 128}, "adafactor")
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
    from gpt2_iree import compiler, export, models, toolchain
    from gpt2_iree.targets import get_target

    root = tmp_path_factory.mktemp("tiny-batch")
    models.write_tiny_model(root / "assets")
    export.build(root / "build", "tiny", root / "assets", "pretrained", None,
                 {"batch": 2, "prompt_len": 64, "context": 128, "seq_len": 128}, "adafactor")
    compiler.compile_target(toolchain.iree_compile(), root / "build", get_target("cpu"))
    return root / "build"
