"""GGUF for llama.cpp: our weights under llama.cpp's GPT-2 names, shapes and
types, its metadata, and the tokenizer, read back with gguf's own reader.

The build is the tiny model's export alone (no compile): the GGUF is written
from its manifest, archive and tokenizer, which is all the export stage makes.
"""

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gpt2_iree import model, models  # noqa: E402
from gpt2_iree.archive import read_irpa  # noqa: E402
from gpt2_iree.gguf import main, write_gguf  # noqa: E402
from gpt2_iree.module import BuildError  # noqa: E402
from gpt2_iree.tokenizer import END_OF_TEXT  # noqa: E402

CFG = model.GPT2Config(**models.TINY_SHAPE)
F32, F16, Q8_0 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0



@pytest.fixture(scope="module")
def files(tiny_export, tmp_path_factory):
    """weight type -> the GGUF the command line wrote of the build."""
    out = tmp_path_factory.mktemp("gguf-out")
    for weight_type in ("f16", "q8_0"):
        assert main([str(tiny_export), str(out / f"tiny-{weight_type}.gguf"), "--type", weight_type]) == 0
    # Written under temporary names and renamed: nothing else is left beside them.
    assert sorted(p.name for p in out.iterdir()) == ["tiny-f16.gguf", "tiny-q8_0.gguf"]
    return {weight_type: out / f"tiny-{weight_type}.gguf" for weight_type in ("f16", "q8_0")}


def our_weights(build) -> dict[str, np.ndarray]:
    flat = read_irpa(build / "gpt2.irpa")
    return {name: flat[name].reshape(shape) for name, shape in model.param_shapes(CFG).items()}


def llama_cpp_tensors(params) -> dict[str, tuple[np.ndarray, tuple[int, ...]]]:
    """llama.cpp's GPT-2 tensors (src/models/gpt2.cpp, load_arch_tensors) from
    ours: name -> (our weight, ggml's shape, innermost dimension first). Ours
    are output-major as llama.cpp's are, so no weight is transposed; the
    vocabulary loses its padding rows."""
    E, F, V = CFG.n_embd, 4 * CFG.n_embd, CFG.vocab_size
    tensors = {
        "token_embd.weight": (params["wte"][:V], (E, V)),
        "position_embd.weight": (params["wpe"], (E, CFG.n_positions)),
        "output_norm.weight": (params["ln_f.scale"], (E,)),
        "output_norm.bias": (params["ln_f.bias"], (E,)),
    }
    for i in range(CFG.n_layer):
        ours, blk = f"h.{i}.", f"blk.{i}."
        tensors |= {
            blk + "attn_norm.weight": (params[ours + "ln_1.scale"], (E,)),
            blk + "attn_norm.bias": (params[ours + "ln_1.bias"], (E,)),
            blk + "attn_qkv.weight": (params[ours + "attn.qkv_w"], (E, 3 * E)),
            blk + "attn_qkv.bias": (params[ours + "attn.qkv_b"], (3 * E,)),
            blk + "attn_output.weight": (params[ours + "attn.out_w"], (E, E)),
            blk + "attn_output.bias": (params[ours + "attn.out_b"], (E,)),
            blk + "ffn_norm.weight": (params[ours + "ln_2.scale"], (E,)),
            blk + "ffn_norm.bias": (params[ours + "ln_2.bias"], (E,)),
            blk + "ffn_up.weight": (params[ours + "mlp.in_w"], (E, F)),
            blk + "ffn_up.bias": (params[ours + "mlp.in_b"], (F,)),
            blk + "ffn_down.weight": (params[ours + "mlp.out_w"], (F, E)),
            blk + "ffn_down.bias": (params[ours + "mlp.out_b"], (E,)),
        }
    return tensors


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.parametrize("weight_type", ["f16", "q8_0"])
def test_tensors_are_our_weights_named_and_laid_out_as_llama_cpp_expects(tiny_export, files, weight_type):
    matrix_type = {"f16": F16, "q8_0": Q8_0}[weight_type]
    expected = llama_cpp_tensors(our_weights(tiny_export))
    tensors = {t.name: t for t in gguf.GGUFReader(files[weight_type]).tensors}
    assert sorted(tensors) == sorted(expected)
    for name, (ours, shape) in expected.items():
        tensor = tensors[name]
        assert tuple(int(n) for n in tensor.shape) == shape, name
        # Norms, biases and the position embedding stay float32, as llama.cpp's converter keeps them.
        assert tensor.tensor_type == (F32 if ours.ndim == 1 or name == "position_embd.weight" else matrix_type), name
        if tensor.tensor_type == F32:
            np.testing.assert_array_equal(tensor.data, ours, err_msg=name)
        elif tensor.tensor_type == F16:
            np.testing.assert_array_equal(tensor.data, ours.astype(np.float16), err_msg=name)
        else:
            # q8_0: blocks of 32 along a row, each int8 times its own scale, amax / 127 (a float16):
            # every weight within one step of its block's grid.
            error = np.abs(gguf.quants.dequantize(tensor.data, tensor.tensor_type) - ours).reshape(-1, 32)
            step = np.abs(ours).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            assert np.all(error <= step), name


@pytest.mark.parametrize("weight_type", ["f16", "q8_0"])
def test_metadata_is_the_models_shape(files, weight_type):
    reader = gguf.GGUFReader(files[weight_type])
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "general.file_type") == {"f16": gguf.LlamaFileType.MOSTLY_F16,
                                                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[weight_type]
    assert field(reader, "gpt2.context_length") == CFG.n_positions
    assert field(reader, "gpt2.embedding_length") == CFG.n_embd
    assert field(reader, "gpt2.feed_forward_length") == 4 * CFG.n_embd
    assert field(reader, "gpt2.block_count") == CFG.n_layer
    assert field(reader, "gpt2.attention.head_count") == CFG.n_head
    assert field(reader, "gpt2.attention.layer_norm_epsilon") == pytest.approx(CFG.layer_norm_epsilon)


def test_vocabulary_is_the_builds_tokenizer(tiny_export, files):
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tiny_export / "tokenizer.json")).get_vocab(with_added_tokens=True)
    reader = gguf.GGUFReader(files["f16"])
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    eot = vocab[END_OF_TEXT]
    assert field(reader, "tokenizer.ggml.bos_token_id") == field(reader, "tokenizer.ggml.eos_token_id") == eot
    assert field(reader, "tokenizer.ggml.token_type") == [gguf.TokenType.CONTROL if i == eot else gguf.TokenType.NORMAL
                                                          for i in range(CFG.vocab_size)]
    # The tiny tokenizer has no merges; llama.cpp needs the key, so one that never applies stands in.
    assert field(reader, "tokenizer.ggml.merges") == [f"{END_OF_TEXT} {END_OF_TEXT}"]


def copy_of(build, tmp_path, **manifest_changes):
    """A build directory sharing `build`'s archive, its manifest changed."""
    copy = tmp_path / "build"
    copy.mkdir()
    (copy / "gpt2.irpa").symlink_to(build / "gpt2.irpa")
    manifest = json.loads((build / "manifest.json").read_text()) | manifest_changes
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_merges_are_the_tokenizers_and_missing_ids_are_padding(tiny_export, tmp_path):
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers

    copy = copy_of(tiny_export, tmp_path)
    tokenizer = Tokenizer(tokenizer_models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.add_special_tokens([END_OF_TEXT])
    tokenizer.save(str(copy / "tokenizer.json"))
    write_gguf(copy, tmp_path / "out.gguf")
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    assert field(reader, "tokenizer.ggml.merges") == ["a b"]
    assert field(reader, "tokenizer.ggml.tokens") == ["a", "b", "ab", END_OF_TEXT] + [
        f"[PAD{i}]" for i in range(4, CFG.vocab_size)]
    T = gguf.TokenType
    assert field(reader, "tokenizer.ggml.token_type") == [T.NORMAL] * 3 + [T.CONTROL] + [
        T.UNUSED] * (CFG.vocab_size - 4)
    assert field(reader, "tokenizer.ggml.eos_token_id") == 3


def test_a_build_without_tokenizer_gets_a_placeholder_vocabulary(tiny_export, tmp_path):
    write_gguf(copy_of(tiny_export, tmp_path, tokenizer=None), tmp_path / "out.gguf", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(set(tokens)) == CFG.vocab_size
    assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == END_OF_TEXT
    assert field(reader, "tokenizer.ggml.merges")


def test_refuses_what_it_cannot_write(tiny_export, tmp_path, capsys):
    out = tmp_path / "out.gguf"
    assert main([str(tmp_path / "nowhere"), str(out)]) == 2
    assert "is not built yet" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([str(tiny_export), str(out), "--type", "q4_0"])
    assert exit_.value.code == 2
    assert "invalid choice: 'q4_0'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown weight type 'bf16'"):
        write_gguf(tiny_export, out, "bf16")
    lora = copy_of(tiny_export, tmp_path, tuning={"mode": "lora", "rank": 8, "alpha": 16.0, "targets": ["attn"]})
    with pytest.raises(BuildError, match="tuning=lora build"):
        write_gguf(lora, out)
    assert not out.exists()
