"""Drive the repo's doit graph in-process, as `doit` on the command line does."""

import importlib.util
import inspect
import io
import json
from pathlib import Path

from doit.cmd_base import NamespaceTaskLoader
from doit.doit_cmd import DoitMain

REPO = Path(__file__).resolve().parent.parent


class DodoLoader(NamespaceTaskLoader):
    """The repo's dodo.py, executed afresh when doit loads it, as `doit` does:
    after the command line's vars are set, which its DOIT_CONFIG reads."""

    def setup(self, opt_values):
        spec = importlib.util.spec_from_file_location("dodo", REPO / "dodo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self.namespace = dict(inspect.getmembers(module))


def doit_main(*args: str, **extra_config) -> int:
    return DoitMain(DodoLoader(), config_filenames=(), extra_config=extra_config).run(list(args))


def doit(*args: str) -> tuple[int, dict[str, str], dict[str, str]]:
    """Run doit with the JSON reporter: its exit code, each task's result
    ("success", "up-to-date", "fail") and the failed tasks' messages."""
    out = io.StringIO()
    code = doit_main("--reporter", "json", *args, run={"outfile": out})
    tasks = json.loads(out.getvalue())["tasks"]
    return code, {t["name"]: t["result"] for t in tasks}, {t["name"]: t["error"] for t in tasks if t["error"]}


def ran(results: dict[str, str]) -> set[str]:
    """The stages that ran (not the `compile`/`verify` groups, which have no action)."""
    return {name for name, result in results.items() if result == "success"} - {"compile", "verify"}
