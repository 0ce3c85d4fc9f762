"""How the next token is picked: greedy, or drawn at a temperature within top-k and top-p.

The module samples on the device (model.sample); this is what a caller asks
for, checked before any work. Standard library only: the CLI validates its
flags with it before importing anything heavy.
"""

from __future__ import annotations

import dataclasses

MAX_SEED = 2**31 - 1  # the module takes seeds as int32


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (the default, as in transformers and mlx-lm);
    else the next token is drawn from softmax(logits / temperature) over the
    `top_k` most likely tokens (0: off) and the smallest set of them whose
    probability reaches `top_p` (1: off), from a generator started at `seed`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature {self.temperature} is invalid; valid: 0 (greedy) or more")
        if not self.top_k >= 0:
            raise ValueError(f"top_k {self.top_k} is invalid; valid: 0 (off) or more")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p {self.top_p} is invalid; valid: (0, 1], 1 is off")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed {self.seed} is invalid; valid: 0 to {MAX_SEED}")


GREEDY = Sampling()
