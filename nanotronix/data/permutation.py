"""Stateless pseudo-random permutations of [0, n) for any n, evaluated pointwise in O(1) time and memory.

Why hand-written: shuffling the packed windows of a dataset with `numpy.random.permutation` needs an index
array as long as the dataset (Megatron and nanotron materialise and cache such arrays; SmolLM2's sources hold
up to ~10^9 windows each). A keyed Feistel network on b = bitlength(n-1) bits is a bijection on [0, 2^b);
"cycle walking" (re-applying it until the value falls below n) turns it into a bijection on [0, n). As
2^b < 2n, fewer than 2 applications are needed on average. The network is unbalanced when b is odd (halves
of floor(b/2) and ceil(b/2) bits whose roles alternate each round), which keeps the domain tight. Keys may
differ per element (one per epoch), so a batch spanning several epochs is permuted in one vectorised call.
Everything is integer arithmetic on uint64, so the result is the same on every machine.
"""
from __future__ import annotations

import hashlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1
_ROUNDS = 4  # even, so the two halves end where they started


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective avalanche mix of uint64 values (wraps modulo 2^64)."""
    x = np.array(x, dtype=np.uint64)  # a copy, then in-place steps (no temporaries per step)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def stable_key(*parts: object) -> int:
    """A 64-bit key from text/int parts, stable across runs and machines (unlike Python's hash)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little")


def derive_keys(key, index: np.ndarray) -> np.ndarray:
    """Sub-keys number `index` (array) of `key` (an int, or one uint64 per element), e.g. one per epoch."""
    index = np.asarray(index, dtype=np.uint64)
    return mix64(np.asarray(key, dtype=np.uint64) ^ ((index + np.uint64(1)) * np.uint64(_GOLDEN)))


def permute(i: np.ndarray, n, keys) -> np.ndarray:
    """Image of each value of `i` under the permutation of [0, n) selected by its key. `n`: one size for all, or
    one per element (each value of i in [0, its n), n >= 1), so that samples of several datasets are permuted in
    one vectorised call; `keys`: one uint64 per element, or a single int for all. `i` may be a scalar or of any
    shape: the result has its shape."""
    shape = np.shape(i)
    i = np.asarray(i, dtype=np.uint64).ravel()  # the cycle walk indexes elements by their flat position
    if np.ndim(n) == 0:
        if n <= 1:
            return i.astype(np.int64).reshape(shape)
        bits = np.uint64((int(n) - 1).bit_length())
    else:
        n = np.broadcast_to(np.asarray(n, dtype=np.uint64), shape).ravel()
        sizes, which_size = np.unique(n, return_inverse=True)  # a few distinct sizes: one per dataset
        bits = np.array([(int(m) - 1).bit_length() if m else 0 for m in sizes.tolist()],
                        dtype=np.uint64)[which_size.reshape(n.shape)]
    keys = np.broadcast_to(np.asarray(keys, dtype=np.uint64), shape).ravel()
    round_keys = [mix64(keys ^ np.uint64((r + 1) * 0x632BE59BD9B4E019 & _MASK64)) for r in range(_ROUNDS)]
    halves = _Halves(bits)
    x = _feistel(i, halves, round_keys, slice(None))
    outside = np.flatnonzero(x >= n)
    while outside.size:  # cycle walking: terminates because x's cycle contains an in-range value
        x[outside] = _feistel(x[outside], halves, round_keys, outside)
        outside = outside[x[outside] >= (n if np.ndim(n) == 0 else n[outside])]
    return x.astype(np.int64).reshape(shape)


class _Halves:
    """Bit counts of the Feistel network's two parts and their masks, for b = bits: the left part has
    a = floor(b/2) bits, the right part b - a. Scalars when every element has the same b."""

    def __init__(self, bits):
        one = np.uint64(1)
        self.a = bits // np.uint64(2)
        self.b = bits - self.a
        self.mask_a, self.mask_b = (one << self.a) - one, (one << self.b) - one

    def of(self, which) -> tuple:
        parts = (self.a, self.b, self.mask_a, self.mask_b)
        return parts if np.ndim(self.a) == 0 else tuple(v[which] for v in parts)


def _feistel(x: np.ndarray, halves: _Halves, round_keys: list, which) -> np.ndarray:
    a, b, mask_a, mask_b = halves.of(which)
    left, right = x >> b, x & mask_b
    for rk in round_keys:
        # state (left: a bits, right: b bits) -> (right, left ^ F(right)) with sizes (b, a)
        f = mix64(right ^ rk[which]) & mask_a
        left, right = right, left ^ f
        a, b, mask_a, mask_b = b, a, mask_b, mask_a
    return (left << b) | right
