"""Config validation: every bad var fails with the value and the valid choices."""

import re
import shlex

import pytest

from tasks.config import GENERATE_WEIGHTS, BuildConfig, parse_config


def test_defaults():
    cfg = parse_config({})
    assert (cfg.model, cfg.weights, cfg.targets) == ("gpt2", "pretrained", ("metal", "ios", "cpu"))
    assert (cfg.batch, cfg.prompt_len, cfg.context, cfg.seq_len, cfg.optimizer) == (1, 64, 1024, 128, "adafactor")
    assert str(cfg.build_dir) == "build/gpt2/pretrained-b1-k64-c1024-s128-adafactor"
    # The context defaults to the model's positions.
    assert parse_config({"model": "tiny"}).context == 128


def test_every_setting_keys_the_build_dir():
    base = parse_config({"model": "tiny"})
    for var, value in [("weights", "random"), ("batch", "2"), ("prompt_len", "4"), ("context", "64"),
                       ("seq_len", "32"), ("optimizer", "sgd"), ("tuning", "lora"),
                       ("generate_weights", "int8")]:
        assert parse_config({"model": "tiny", var: value}).build_dir != base.build_dir, var
    assert parse_config({"model": "tiny", "targets": "cpu"}).build_dir == base.build_dir


@pytest.mark.parametrize("raw", [{}, {"model": "tiny", "tuning": "lora", "lora_alpha": "0.123456789", "batch": "2"},
                                 {"model": "gpt2-medium", "weights": "random", "generate_weights": "int8",
                                  "optimizer": "sgd", "prompt_len": "8", "context": "256", "seq_len": "64"}])
def test_doit_vars_give_the_configuration_again(raw):
    # What the runtime's "build it with `doit ...`" hints print: the same build_dir, whatever the targets.
    cfg = parse_config(raw | {"targets": "cpu"})
    again = parse_config(dict(var.split("=", 1) for var in shlex.split(cfg.doit_vars())) | {"targets": "vulkan"})
    assert again.build_dir == cfg.build_dir and again.lora == cfg.lora
    assert "targets=" not in cfg.doit_vars()


@pytest.mark.parametrize("var, value, named, expected", [
    ("model", "gpt3", "model=gpt3", "gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, tiny"),
    ("weights", "trained", "weights='trained'", "pretrained, random"),
    ("targets", "cpu,webgpu", "targets='webgpu'", "cpu, metal, ios, vulkan, cuda"),
    ("targets", ",", "targets=','", "names no target"),
    ("optimizer", "adam", "optimizer='adam'", "adafactor, sgd, adamw"),
    ("batch", "0", "batch='0'", "positive integer"),
    ("batch", "two", "batch='two'", "positive integer"),
    ("seq_len", "2048", "seq_len='2048'", "1..1024 (gpt2's n_positions)"),
    ("context", "2048", "context='2048'", "1..1024 (gpt2's n_positions)"),
    ("context", "0", "context='0'", "1..1024"),
    ("prompt_len", "-1", "prompt_len='-1'", "1..1024 (context=1024)"),
    ("tuning", "qlora", "tuning='qlora'", "full, lora"),
    ("generate_weights", "int4", "generate_weights='int4'", "float16, int8"),
])
def test_bad_values_name_value_and_choices(var, value, named, expected):
    with pytest.raises(ValueError) as err:
        parse_config({var: value})
    assert named in str(err.value)
    assert expected in str(err.value)


def test_a_prefill_chunk_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match=r"prompt_len='96' is invalid; valid: 1..64 \(context=64\)"):
        parse_config({"model": "tiny", "prompt_len": "96", "context": "64"})


def test_context_and_fine_tuning_window_are_bounded_by_the_model_positions():
    # ... and independent of each other: a long context with a short window.
    for var in ("context", "seq_len"):
        with pytest.raises(ValueError, match=rf"{var}='256' is invalid; valid: 1..128 \(tiny's n_positions\)"):
            parse_config({"model": "tiny", var: "256"})
    cfg = parse_config({"model": "tiny", "context": "128", "seq_len": "16"})
    assert (cfg.context, cfg.seq_len) == (128, 16)


def test_unknown_var_is_refused():
    with pytest.raises(ValueError, match="unknown doit var modle; valid: model, weights"):
        parse_config({"modle": "tiny"})


def test_local_model_directory(tmp_path):
    with pytest.raises(ValueError, match="lacks config.json, model.safetensors, tokenizer.json"):
        parse_config({"model": str(tmp_path)})
    for name in ("model.safetensors", "tokenizer.json"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json has no readable n_positions"):
        parse_config({"model": str(tmp_path)})
    (tmp_path / "config.json").write_text('{"n_positions": 256}')
    cfg = parse_config({"model": str(tmp_path)})
    assert cfg.context == 256
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


def test_lora_settings_key_the_build_and_are_checked():
    cfg = parse_config({"model": "tiny", "tuning": "lora"})
    assert cfg.lora == {"rank": 8, "alpha": 16.0, "targets": ["attn"]}
    assert cfg.optimizer == "adamw"  # Adafactor's parameter-scaled steps barely move B, which starts at zero
    assert str(cfg.build_dir) == "build/tiny/pretrained-b1-k64-c128-s128-adamw-lora-r8-a16-attn"
    other = parse_config({"model": "tiny", "tuning": "lora", "lora_targets": "mlp,attn", "lora_rank": "4",
                          "lora_alpha": "8", "optimizer": "adafactor"})
    assert other.lora["targets"] == ["attn", "mlp"]  # one configuration, whatever the order given
    assert other.build_dir.name == "pretrained-b1-k64-c128-s128-adafactor-lora-r4-a8-attn+mlp"
    assert parse_config({"model": "tiny"}).lora is None
    # Two alphas never share a build: the key is exact where the short form is not.
    close = parse_config({"model": "tiny", "tuning": "lora", "lora_alpha": "16.0000001"})
    assert close.build_dir != cfg.build_dir and close.build_dir.name.endswith("-a16.0000001-attn")


@pytest.mark.parametrize("raw, message", [
    ({"lora_rank": "4"}, "lora_rank=4 applies to tuning=lora only; add tuning=lora"),
    ({"tuning": "lora", "lora_targets": "ffn"}, "lora_targets='ffn' is invalid; valid: attn, mlp or attn,mlp"),
    ({"tuning": "lora", "lora_targets": ","}, "lora_targets=',' is invalid"),
    ({"tuning": "lora", "lora_rank": "0"}, "lora_rank='0' is invalid; valid: a positive integer"),
    ({"tuning": "lora", "lora_alpha": "-1"}, "lora_alpha='-1' is invalid; valid: a positive number"),
    ({"tuning": "lora", "lora_alpha": "inf"}, "lora_alpha='inf' is invalid"),
])
def test_bad_lora_settings_are_refused(raw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_config({"model": "tiny", **raw})


def test_int8_weights_key_the_build_in_either_tuning():
    assert parse_config({"model": "tiny", "generate_weights": "int8"}).build_dir.name == \
        "pretrained-b1-k64-c128-s128-adafactor-gen-int8"
    assert parse_config({"model": "tiny", "tuning": "lora", "generate_weights": "int8"}).build_dir.name == \
        "pretrained-b1-k64-c128-s128-adamw-lora-r8-a16-attn-gen-int8"


def test_generation_weight_formats_match_the_library():
    from gpt2_iree import generate_weights

    assert GENERATE_WEIGHTS == generate_weights.FORMATS


def test_lora_targets_match_the_library():
    from gpt2_iree import lora
    from tasks.config import LORA_TARGETS

    assert LORA_TARGETS == tuple(lora.TARGETS)
