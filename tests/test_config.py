"""Config validation: every bad var fails with the value and the valid choices."""

import pytest

from tasks.config import BuildConfig, parse_config


def test_defaults():
    cfg = parse_config({})
    assert (cfg.model, cfg.weights, cfg.targets) == ("gpt2", "pretrained", ("metal", "ios", "cpu"))
    assert (cfg.batch, cfg.prompt_len, cfg.seq_len, cfg.optimizer) == (1, 8, 64, "adafactor")
    assert str(cfg.build_dir) == "build/gpt2/pretrained-b1-k8-s64-adafactor"


def test_every_setting_keys_the_build_dir():
    base = parse_config({"model": "tiny"})
    for var, value in [("weights", "random"), ("batch", "2"), ("prompt_len", "4"),
                       ("seq_len", "32"), ("optimizer", "sgd")]:
        assert parse_config({"model": "tiny", var: value}).build_dir != base.build_dir, var
    assert parse_config({"model": "tiny", "targets": "cpu"}).build_dir == base.build_dir


@pytest.mark.parametrize("var, value, named, expected", [
    ("model", "gpt3", "model=gpt3", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, tiny"),
    ("weights", "trained", "weights='trained'", "pretrained, random"),
    ("targets", "cpu,webgpu", "targets='webgpu'", "cpu, metal, ios, vulkan, cuda"),
    ("targets", ",", "targets=','", "names no target"),
    ("optimizer", "adam", "optimizer='adam'", "adafactor, sgd, adamw"),
    ("batch", "0", "batch='0'", "positive integer"),
    ("batch", "two", "batch='two'", "positive integer"),
    ("seq_len", "2048", "seq_len='2048'", "1..1024"),
    ("prompt_len", "-1", "prompt_len='-1'", "1..1024"),
])
def test_bad_values_name_value_and_choices(var, value, named, expected):
    with pytest.raises(ValueError) as err:
        parse_config({var: value})
    assert named in str(err.value)
    assert expected in str(err.value)


def test_prompt_longer_than_seq_len():
    with pytest.raises(ValueError, match="prompt_len=16 is longer than seq_len=8"):
        parse_config({"prompt_len": "16", "seq_len": "8"})


def test_seq_len_beyond_model_positions():
    with pytest.raises(ValueError, match="tiny's 128 positions"):
        parse_config({"model": "tiny", "seq_len": "256"})


def test_unknown_var_is_refused():
    with pytest.raises(ValueError, match="unknown doit var modle; valid: model, weights"):
        parse_config({"modle": "tiny"})


def test_local_model_directory(tmp_path):
    with pytest.raises(ValueError, match="lacks config.json, model.safetensors, tokenizer.json"):
        parse_config({"model": str(tmp_path)})
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    cfg = parse_config({"model": str(tmp_path)})
    assert cfg.is_local_dir and cfg.model_dir == tmp_path.resolve()
    assert cfg.model_key.startswith(f"local-{tmp_path.name}-")
    # The lock of a user's directory lives in build/, never in their directory.
    assert cfg.assets_lock.parts[0] == "build"


def test_random_hub_weights_need_no_download():
    assert not parse_config({"weights": "random"}).needs_assets
    assert parse_config({"model": "tiny", "weights": "random"}).needs_assets


def test_config_is_frozen():
    cfg = parse_config({})
    assert isinstance(cfg, BuildConfig)
    with pytest.raises(AttributeError):
        cfg.model = "tiny"


def test_optimizer_choices_match_the_model():
    # tasks/ keeps its own copy so that loading the graph never imports jax.
    from gpt2_iree import model
    from tasks.config import OPTIMIZERS

    assert OPTIMIZERS == model.OPTIMIZERS
