"""Text <-> token ids with Hugging Face `tokenizers`, from a `tokenizer.json`."""

from __future__ import annotations

from pathlib import Path

END_OF_TEXT = "<|endoftext|>"


class Tokenizer:
    """GPT-2's byte-level BPE tokenizer (or the tiny model's byte-only one)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(path))
        self.eot_id = self._tok.token_to_id(END_OF_TEXT)
        if self.eot_id is None:
            raise ValueError(f"{path}: tokenizer has no {END_OF_TEXT} token; is it a GPT-2 tokenizer?")

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def write_byte_tokenizer(path: Path) -> int:
    """Write a byte-level tokenizer with no merges: 256 byte tokens plus
    end-of-text. It reads and writes any text offline and needs no download,
    which is all the `tiny` model asks of a tokenizer. Returns the vocab size."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from gpt2_iree.files import replace_atomically

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # GPT-2 orders its byte tokens by byte value; any fixed order would do.
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=_byte_of))}
    vocab[END_OF_TEXT] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([END_OF_TEXT])
    replace_atomically(path, lambda tmp: tok.save(str(tmp)))
    return len(vocab)


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode: printable bytes map to themselves,
    the other 68 to U+0100 upwards in byte order."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]
