"""Named random streams derived from one master seed.

``rng(seed, "labeled")`` and ``rng(seed, "corrupt")`` are independent, and adding a new stream never
shifts an existing one (unlike drawing them one after another from a single generator).
"""

from __future__ import annotations

import hashlib

import numpy as np


def stream_seed(seed: int, *names: str | int) -> int:
    """A 63-bit integer seed for the stream ``names`` under master ``seed``."""
    text = "/".join([str(int(seed)), *map(str, names)]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def rng(seed: int, *names: str | int) -> np.random.Generator:
    return np.random.default_rng(stream_seed(seed, *names))
