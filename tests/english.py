"""Deterministic English-like text for the fine-tuning tests: any length, no download.

Sentences from a small grammar, grouped into paragraphs of four to eight,
each far longer than the tiny model's seq_len: the structure a model can
learn, so a validation loss has somewhere to go.
"""

import random

SUBJECTS = ["the old fisherman", "a young teacher", "the quiet farmer", "my neighbour", "the small girl",
            "a tired soldier", "the baker", "our captain", "the clever student", "a stranger"]
VERBS = ["mended", "carried", "painted", "found", "watched", "cleaned", "sold", "bought", "lost", "opened"]
OBJECTS = ["the nets", "a heavy basket", "the wooden door", "an old letter", "the red boat", "a loaf of bread",
           "the garden gate", "a silver key", "the broken chair", "a map of the coast"]
PLACES = ["by the harbour", "in the market", "near the river", "at the station", "behind the church",
          "on the hill", "in the kitchen", "under the bridge"]
TIMES = ["at dawn", "before noon", "in the evening", "after the storm", "on Sunday", "every morning"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES)]
    if rng.random() < 0.5:
        words.append(rng.choice(TIMES))
    text = " ".join(words)
    return text[0].upper() + text[1:] + "."


def paragraphs(n_bytes: int, seed: int = 0) -> str:
    """About `n_bytes` of text: paragraphs separated by blank lines, ending in a newline."""
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_bytes:
        paragraph = " ".join(sentence(rng) for _ in range(rng.randint(4, 8)))
        out.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(out) + "\n"
