"""A build's weights as a GGUF file, llama.cpp's format, so that llama.cpp can
be benchmarked on exactly the weights our modules run.

`python -m gpt2_iree.gguf BUILD_DIR OUT.gguf [--type f16|q8_0]` writes what
llama.cpp's own converter (`convert_hf_to_gguf.py`, class `GPT2Model`) writes
for the Hugging Face GPT-2 that `weights.params_to_hf` makes of the build's
float32 archive: architecture "gpt2", the converter's transposes, gguf's
tensor names for GPT-2 (`token_embd`, `blk.N.attn_qkv`, ...), its metadata.
There is no `output` tensor: llama.cpp ties the LM head to `token_embd`, as
GPT-2 does.

Types, as the converter chooses them: the matrices (`token_embd`, and each
block's `attn_qkv`, `attn_output`, `ffn_up`, `ffn_down`) as `f16` or `q8_0`;
norms, biases and `position_embd` stay float32 (llama.cpp reads 1-D tensors
as float32 only, and keeps the position embedding unquantized).

Tokenizer: the build's `tokenizer.json` (Hugging Face byte-level BPE), its
vocabulary and merges as the converter writes GPT-2's (`tokenizer.ggml.model`
"gpt2", pre-tokenizer "gpt-2", end-of-text as begin and end of text), padded
with `[PAD<id>]` tokens up to the model's vocabulary. A `weights=random`
build of a Hub model has no tokenizer; it gets a placeholder: the tiny
model's byte tokenizer (256 byte tokens and end-of-text) padded the same way.
That is enough for llama.cpp to load the model and for `llama-bench`, which
feeds random token ids; what such a model says is noise anyway.

A LoRA build is refused: its archive holds the adapters, and a full build of
the same model has the same base weights.

The `gguf` package is an optional extra (`pip install -e '.[peers]'`);
llama.cpp itself is never a dependency.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

from gpt2_iree import lora, weights
from gpt2_iree.archive import read_irpa
from gpt2_iree.errors import Gpt2IreeError
from gpt2_iree.files import check_output_file, replace_atomically
from gpt2_iree.model import GPT2Config
from gpt2_iree.module import BuildError, read_manifest
from gpt2_iree.tokenizer import END_OF_TEXT, write_byte_tokenizer

# What the matrices can be stored as: gguf's GGMLQuantizationType names, lower case.
WEIGHT_TYPES = ("f16", "q8_0")

# The converter's GPT2Model.modify_tensors: Hugging Face's Conv1D weights are
# (in, out); llama.cpp's, like ours, are (out, in).
_CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight")

# llama.cpp refuses a BPE vocabulary without merges, and gguf writes no empty
# list, so a tokenizer without merges (the tiny model's, the placeholder) gets
# this one. BPE starts from single characters and merges pairs of symbols;
# with no other merge, two multi-character pieces never form, so it never
# applies and text still splits into bytes, as the merge-less tokenizer splits it.
_INERT_MERGE = f"{END_OF_TEXT} {END_OF_TEXT}"


def write_gguf(build_dir: Path, out: Path, weight_type: str = "f16") -> None:
    """Write the build's weights and tokenizer as a GGUF file at `out`, atomically,
    its matrices as `weight_type` (one of WEIGHT_TYPES)."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown weight type {weight_type!r}; valid: {', '.join(WEIGHT_TYPES)}")
    try:
        import gguf
    except ImportError:
        raise Gpt2IreeError("writing GGUF needs the gguf package: pip install -e '.[peers]'") from None

    build_dir, out = Path(build_dir), check_output_file("output", Path(out))
    manifest = read_manifest(build_dir)
    cfg, params = _read_weights(build_dir, manifest)

    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GPT2])
    _add_model_metadata(writer, manifest["model"], cfg, weight_type)
    _add_tensors(writer, params, cfg, gguf.GGMLQuantizationType[weight_type.upper()])
    _add_vocabulary(writer, build_dir, manifest, cfg.vocab_size)

    def write(tmp: Path) -> None:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    replace_atomically(out, write)


def _read_weights(build_dir: Path, manifest: dict) -> tuple[GPT2Config, dict[str, np.ndarray]]:
    """The build's config and float32 weights, shaped as the manifest lays them out."""
    if lora.from_manifest(manifest):
        raise BuildError(f"{build_dir} is a tuning=lora build: its gpt2.irpa holds adapters, not the "
                         f"model; write the GGUF of a full build of the same model (doit tuning=full)")
    flat = read_irpa(build_dir / "gpt2.irpa")
    return GPT2Config(**manifest["config"]), {name: flat[name].reshape(shape) for name, shape in manifest["params"]}


def _add_model_metadata(writer, name: str, cfg: GPT2Config, weight_type: str) -> None:
    """The converter's GPT2Model.set_gguf_parameters, with the general keys it adds."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(cfg.n_layer)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.n_embd)
    writer.add_feed_forward_length(4 * cfg.n_embd)
    writer.add_head_count(cfg.n_head)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{weight_type.upper()}"])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tensors(writer, params: dict, cfg: GPT2Config, matrix_type) -> None:
    """Every weight, named and typed as the converter names and types the
    Hugging Face tensors (which also drop our vocabulary's padding rows)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, cfg.n_layer)
    position_embd = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.POS_EMBD] + ".weight"
    for hf_name, value in weights.params_to_hf(params, cfg).items():
        if hf_name.endswith(_CONV1D_WEIGHTS):
            value = value.T
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        qtype = gguf.GGMLQuantizationType.F32 if value.ndim == 1 or name == position_embd else matrix_type
        try:
            data = gguf.quants.quantize(value, qtype)
        except gguf.QuantError:  # rows not a whole number of q8_0 blocks: the converter's fallback
            qtype = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(value, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)


def _add_vocabulary(writer, build_dir: Path, manifest: dict, vocab_size: int) -> None:
    """The build's tokenizer, or the placeholder (see the module's docstring)."""
    if manifest["tokenizer"] is not None:
        _add_tokenizer(writer, build_dir, vocab_size)
        return
    with tempfile.TemporaryDirectory() as placeholder:
        write_byte_tokenizer(Path(placeholder) / "tokenizer.json")
        _add_tokenizer(writer, Path(placeholder), vocab_size)


def _add_tokenizer(writer, directory: Path, vocab_size: int) -> None:
    """`directory`'s tokenizer.json (Hugging Face byte-level BPE), as the
    converter's _set_vocab_gpt2 writes it: every id below `vocab_size` a token,
    the ones the tokenizer lacks `[PAD<id>]` (unused), special tokens as control tokens."""
    import gguf
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(path))
    ids = tokenizer.get_vocab(with_added_tokens=True)
    if END_OF_TEXT not in ids:
        raise ValueError(f"{path}: tokenizer has no {END_OF_TEXT} token; is it a GPT-2 tokenizer?")
    if max(ids.values()) >= vocab_size:
        raise ValueError(f"{path}: tokenizer has ids up to {max(ids.values())}, "
                         f"past the model's vocabulary of {vocab_size}")
    added = tokenizer.get_added_tokens_decoder()
    by_id = {i: token for token, i in ids.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(gguf.TokenType.UNUSED if i not in by_id
                     else gguf.TokenType.NORMAL if i not in added
                     else gguf.TokenType.CONTROL if added[i].special
                     else gguf.TokenType.USER_DEFINED)
    # gguf's SpecialVocab reads a directory's tokenizer.json merges in both of their formats.
    merges = gguf.SpecialVocab(directory, load_merges=True).merges
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # every tokenizer of ours pre-tokenizes as GPT-2's
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges or [_INERT_MERGE])
    # GPT-2's config.json names end-of-text as both, which the converter copies.
    writer.add_bos_token_id(ids[END_OF_TEXT])
    writer.add_eos_token_id(ids[END_OF_TEXT])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpt2_iree.gguf",
                                     description="Write a build's weights as a GGUF file for llama.cpp.")
    parser.add_argument("build_dir", type=Path, metavar="BUILD_DIR")
    parser.add_argument("out", type=Path, metavar="OUT.gguf")
    parser.add_argument("--type", choices=WEIGHT_TYPES, default="f16",
                        help="the matrices' type (norms, biases and position_embd stay f32); default f16")
    args = parser.parse_args(argv)
    try:
        write_gguf(args.build_dir, args.out, args.type)
    except (Gpt2IreeError, ValueError, OSError) as err:  # OSError: a path, named in its message
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.type})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
