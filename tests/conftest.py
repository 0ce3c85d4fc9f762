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

    root = tmp_path_factory.mktemp("tiny")
    model_dir, build_dir = root / "assets", root / "build"
    models.write_tiny_model(model_dir)
    export.build(build_dir, "tiny", model_dir, "pretrained", None,
                 {"batch": 1, "prompt_len": 8, "seq_len": 64}, "adafactor")
    for name in ("cpu", "metal"):
        compiler.compile_target(toolchain.iree_compile(), build_dir, name)
    return build_dir
