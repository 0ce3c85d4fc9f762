"""assets: the model's files (config.json, model.safetensors, tokenizer.json)."""

from doit.tools import config_changed

from gpt2_iree import models
from tasks.actions import call
from tasks.config import load_config


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
            "uptodate": [config_changed({"repo": cfg.hub.repo_id, "revision": cfg.hub.revision})],
            "verbosity": 2,  # the download's progress bars
        }
    if cfg.model == models.TINY:
        return {
            "actions": [call("gpt2_iree.models:make_tiny_assets", cfg.model_dir, cfg.assets_lock)],
            "targets": [cfg.assets_lock, *files],
            "uptodate": [config_changed({"shape": models.TINY_SHAPE})],
            "clean": True,
        }
    return {
        "actions": [call("gpt2_iree.models:lock_model_dir", cfg.model_dir, cfg.assets_lock)],
        "file_dep": files,
        "targets": [cfg.assets_lock],
        "clean": True,
    }
