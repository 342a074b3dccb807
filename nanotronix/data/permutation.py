"""Stateless pseudo-random permutations of [0, n) for any n, evaluated pointwise in O(1) time and memory.

Why hand-written: shuffling the packed windows of a dataset with `numpy.random.permutation` needs an index
array as long as the dataset (Megatron and nanotron materialise and cache such arrays; SmolLM2's sources hold
up to ~10^9 windows each). A keyed Feistel network is a bijection on [0, 4^h); "cycle walking" (re-applying it
until the value falls below n) turns it into a bijection on [0, n) while needing fewer than 4 rounds of walking
on average. Everything is integer arithmetic on uint64, so the result is the same on every machine.
"""
from __future__ import annotations

import hashlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_ROUNDS = 4


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche mix of uint64 values (wraps modulo 2^64)."""
    x = np.asarray(x, dtype=np.uint64)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def mix_int(value: int) -> int:
    return int(mix64(np.array([value & _MASK64], dtype=np.uint64))[0])


def stable_key(*parts: object) -> int:
    """A 64-bit key from text/int parts, stable across runs and machines (unlike Python's hash)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def derive_key(key: int, index: int) -> int:
    """Sub-key number `index` of `key` (e.g. one per epoch)."""
    return mix_int(key ^ ((index + 1) * _GOLDEN & _MASK64))


def permute(i: np.ndarray, n: int, key: int) -> np.ndarray:
    """Image of each value of `i` (all in [0, n)) under the permutation of [0, n) selected by `key`."""
    i = np.asarray(i, dtype=np.uint64)
    if n <= 1:
        return i.astype(np.int64)
    half_bits = max(1, ((n - 1).bit_length() + 1) // 2)
    round_keys = [np.uint64(derive_key(key, r)) for r in range(_ROUNDS)]
    x = _feistel(i, half_bits, round_keys)
    outside = x >= np.uint64(n)
    while outside.any():  # cycle walking: terminates because x's cycle contains an in-range value
        x[outside] = _feistel(x[outside], half_bits, round_keys)
        outside = x >= np.uint64(n)
    return x.astype(np.int64)


def _feistel(x: np.ndarray, half_bits: int, round_keys: list) -> np.ndarray:
    shift = np.uint64(half_bits)
    mask = np.uint64((1 << half_bits) - 1)
    left, right = x >> shift, x & mask
    for rk in round_keys:
        left, right = right, left ^ (mix64(right ^ rk) & mask)
    return (left << shift) | right
