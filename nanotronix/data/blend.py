"""Weighted interleaving of several datasets without state or per-sample arrays.

Why hand-written: Megatron's `build_blending_indices` picks, for each sample, the dataset furthest behind its
share; it is exact but sequential, so it materialises index arrays as long as the run (5.4 billion samples for
SmolLM2-1.7B). Here the datasets sit at the leaves of a balanced binary tree. An internal node whose left
subtree holds weight A of its total T sends its i-th sample (counted locally, from 0) to the left child iff
floor(((i+1)A + T/2) / T) > floor((iA + T/2) / T), a Beatty sequence: the left child gets exactly its share of
every prefix, rounded, and the sample's rank among the left child's samples is that floor. Descending the tree
maps a sample number to (dataset, rank of the sample within that dataset) in O(log K) integer operations, and
the number of samples a dataset receives among the first n is computed the same way. Each dataset's count
over any prefix is within ceil(log2 K) samples of its exact share of the served weights (`weight_units`, the
weights quantised to ~2^24 units); from the configured weights it is further off by their quantisation, at most
about (K+1)/2^25 of the prefix (1:2 is served as 5592405:11184811: 5461 samples from n/3 at n = 2^38).
"""
from __future__ import annotations

import numpy as np

from .errors import DataError
from ..errors import number_text

WEIGHT_UNITS = 1 << 24  # weights are quantised to integers summing to ~2^24 (exact integer arithmetic)
MAX_SAMPLES = 1 << 38  # keeps (i+1)*A + T within int64


def _weights_text(weights: list[float]) -> str:
    return f"[{', '.join(map(number_text, weights))}]"


def weight_units(weights: list[float]) -> list[int]:
    """The weights as the blend serves them: integers summing to ~2^24 in their ratios (so weights that differ only
    in scale, 1:1 and 0.5:0.5, are the same blend and draw the same samples)."""
    if not weights or any(not w > 0 for w in weights):
        raise DataError(f"blend weights must be positive, got {_weights_text(weights)}")
    try:
        total = float(sum(weights))
    except OverflowError:  # Python ints beyond a float's range: as much a non-finite sum as floats' inf
        total = float("inf")
    if not np.isfinite(total):
        raise DataError(f"blend weights {_weights_text(weights)}: their sum is not finite; scale them down (only "
                        "their ratios matter)")
    units = [round(w / total * WEIGHT_UNITS) for w in weights]
    if min(units) < 1:  # the blend's resolution: a smaller share would be served as 2^-24, not as asked
        finest = number_text(weights[units.index(min(units))])
        raise DataError(f"blend weights {_weights_text(weights)}: {finest} is below 2^-24 of their sum, finer than "
                        "the blend can serve; raise it or leave that dataset out")
    return units


class BlendTree:
    def __init__(self, weights: list[float]):
        units = weight_units(weights)
        self.num_sources = len(units)
        # Node arrays; node 0 is the root. Leaves have source >= 0 and no children.
        self._left: list[int] = []
        self._right: list[int] = []
        self._a: list[int] = []
        self._t: list[int] = []
        self._source: list[int] = []
        self._build(units, 0, len(units))
        self._left_arr = np.array(self._left, dtype=np.int64)
        self._right_arr = np.array(self._right, dtype=np.int64)
        self._a_arr = np.array(self._a, dtype=np.int64)
        self._t_arr = np.array(self._t, dtype=np.int64)
        self._source_arr = np.array(self._source, dtype=np.int64)

    def _build(self, units: list[int], lo: int, hi: int) -> int:
        node = len(self._left)
        self._left.append(-1)
        self._right.append(-1)
        self._a.append(0)
        self._t.append(sum(units[lo:hi]))
        self._source.append(lo if hi - lo == 1 else -1)
        if hi - lo > 1:
            mid = (lo + hi) // 2
            self._a[node] = sum(units[lo:mid])
            self._left[node] = self._build(units, lo, mid)
            self._right[node] = self._build(units, mid, hi)
        return node

    def assign(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For sample numbers j: (source index, rank of the sample among that source's samples)."""
        local = np.asarray(j, dtype=np.int64).copy()
        if local.size and (local.min() < 0 or local.max() >= MAX_SAMPLES):
            raise DataError(f"sample number outside [0, 2^38): {int(local.min())}..{int(local.max())}")
        node = np.zeros(local.shape, dtype=np.int64)
        inner = self._source_arr[node] < 0
        while inner.any():
            n, i = node[inner], local[inner]
            a, t = self._a_arr[n], self._t_arr[n]
            before = (i * a + t // 2) // t
            go_left = ((i + 1) * a + t // 2) // t > before
            local[inner] = np.where(go_left, before, i - before)
            node[inner] = np.where(go_left, self._left_arr[n], self._right_arr[n])
            inner = self._source_arr[node] < 0
        return self._source_arr[node], local

    def counts(self, n: int) -> list[int]:
        """How many of the first n samples each source receives."""
        if not 0 <= n <= MAX_SAMPLES:
            raise DataError(f"sample count outside [0, 2^38]: {n}")
        out = [0] * self.num_sources
        stack = [(0, int(n))]
        while stack:
            node, m = stack.pop()
            if self._source[node] >= 0:
                out[self._source[node]] = m
                continue
            a, t = self._a[node], self._t[node]
            left = (m * a + t // 2) // t
            stack.append((self._left[node], left))
            stack.append((self._right[node], m - left))
        return out
