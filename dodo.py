"""The gpt2-iree build graph: `doit list` shows the stages, `doit` builds and verifies.

Configure with doit vars, e.g. `doit model=tiny targets=cpu seq_len=128`;
tasks/config.py lists every var, its default and its valid values.
"""

from tasks.assets import task_assets  # noqa: F401
from tasks.compile import task_compile  # noqa: F401
from tasks.config import load_config
from tasks.export import task_export  # noqa: F401
from tasks.iree_source import task_iree_build, task_iree_source  # noqa: F401
from tasks.lock import hold
from tasks.toolchain import task_toolchain  # noqa: F401
from tasks.verify import task_verify  # noqa: F401
from tasks.xcframework import is_default as xcframework_is_default, task_xcframework  # noqa: F401

_config = load_config()
_config.state_file.parent.mkdir(parents=True, exist_ok=True)
hold(_config.state_file.with_suffix(".lock"), _config.build_dir)

DOIT_CONFIG = {
    "default_tasks": ["verify", *(["xcframework"] if xcframework_is_default(_config) else [])],
    # sqlite3: two doit processes at once must not corrupt the state (dbm/json do).
    "backend": "sqlite3",
    "dep_file": str(_config.state_file),
    "verbosity": 1,
}
