"""assets: the model's files (config.json, model.safetensors, tokenizer.json)."""

import json

from gpt2_iree import models
from tasks.actions import call, remove_outputs
from tasks.config import load_config


def locked(lock_path, model_dir, expected: dict) -> bool:
    """Up to date while the lock describes `expected` (repo and revision, or the
    tiny model's source) and every file has its locked size. It reads the lock,
    not doit's per-configuration state, so switching configs never re-fetches."""
    try:
        lock = json.loads(lock_path.read_text())
    except (OSError, ValueError):
        return False
    if any(lock.get(key) != value for key, value in expected.items()):
        return False
    files = lock.get("files", {})
    return all(name in files and (model_dir / name).is_file()
               and (model_dir / name).stat().st_size == files[name]["size"] for name in models.MODEL_FILES)


def task_assets():
    """Model files: download the pinned Hub revision, generate tiny, or lock a local dir"""
    cfg = load_config()
    if not cfg.needs_assets:
        return {"actions": [], "doc": "nothing to fetch: weights=random needs no download"}
    files = [cfg.model_dir / f for f in models.MODEL_FILES]
    if cfg.hub:
        return {
            "actions": [call("gpt2_iree.models:fetch_hub_model", cfg.model, cfg.model_dir, cfg.hf_endpoint)],
            "targets": [cfg.assets_lock, *files],
            "uptodate": [(locked, [cfg.assets_lock, cfg.model_dir,
                                   {"repo_id": cfg.hub.repo_id, "revision": cfg.hub.revision}])],
            "verbosity": 2,  # the download's progress bars
        }
    if cfg.model == models.TINY:
        return {
            "actions": [call("gpt2_iree.models:make_tiny_assets", cfg.model_dir, cfg.assets_lock)],
            "targets": [cfg.assets_lock, *files],
            "uptodate": [(locked, [cfg.assets_lock, cfg.model_dir, {"source": models.TINY_SOURCE}])],
            # Generated, so cleaned like any build output; downloads are kept.
            "clean": [(remove_outputs, [cfg.model_dir, [cfg.assets_lock.name, *models.MODEL_FILES]])],
        }
    return {
        "actions": [call("gpt2_iree.models:lock_model_dir", cfg.model_dir, cfg.assets_lock)],
        "file_dep": files,
        "targets": [cfg.assets_lock],
        "clean": True,
    }
