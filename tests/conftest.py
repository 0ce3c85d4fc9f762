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
