"""The gpt2-iree build graph: `doit list` shows the stages, `doit` builds and verifies.

Configure with doit vars, e.g. `doit model=tiny targets=cpu seq_len=128`;
tasks/config.py lists every var, its default and its valid values.
"""

from tasks.assets import task_assets  # noqa: F401
from tasks.compile import task_compile  # noqa: F401
from tasks.config import load_config
from tasks.export import task_export  # noqa: F401
from tasks.iree_source import task_iree_build, task_iree_source  # noqa: F401
from tasks.toolchain import task_toolchain  # noqa: F401
from tasks.verify import task_verify  # noqa: F401
from tasks.xcframework import task_xcframework  # noqa: F401

_state = load_config().state_file
_state.parent.mkdir(parents=True, exist_ok=True)

DOIT_CONFIG = {
    "default_tasks": ["verify"],
    # sqlite3: two doit processes at once must not corrupt the state (dbm/json do).
    "backend": "sqlite3",
    "dep_file": str(_state),
    "verbosity": 1,
}
