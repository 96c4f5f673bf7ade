"""A sum-tree over a fixed number of non-negative leaves, with batch operations in numpy.

Ray RLlib's `SumSegmentTree` (the library implementation among our dependencies) keeps a Python
list and walks one index at a time, and `ray.rllib` does not import with `ray[default]` alone;
this one keeps a flat float64 array (node 1 the root, leaves at [L, 2L), L the capacity rounded up
to a power of two) and moves a whole batch one level per numpy operation: setting k leaves or
finding k prefix sums costs log2(L) vectorized steps. Parents are recomputed from their children,
never adjusted by differences, so no rounding error accumulates over millions of updates.
"""

from __future__ import annotations

import numpy as np


class SumTree:
    """`capacity` leaves (all 0 at first) and the sums over them."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a sum-tree needs at least one leaf, got capacity={capacity}")
        self.capacity = int(capacity)
        self.leaves = 1 << (self.capacity - 1).bit_length()
        self.depth = self.leaves.bit_length() - 1
        self.nodes = np.zeros(2 * self.leaves, np.float64)

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return self.nodes[self.leaves + np.asarray(idx, np.int64)]

    def set(self, idx: np.ndarray, values: np.ndarray | float) -> None:
        """Leaves `idx` take `values` (>= 0); where a leaf repeats, its last value wins."""
        idx = np.asarray(idx, np.int64).ravel()
        if idx.size == 0:
            return
        values = np.broadcast_to(np.asarray(values, np.float64), idx.shape)
        order = np.argsort(idx, kind="stable")
        idx, values = idx[order], values[order]
        last = np.append(idx[1:] != idx[:-1], True)
        node = idx[last] + self.leaves
        self.nodes[node] = values[last]
        if node.size * self.depth >= self.leaves:  # touches most of the tree: one pass is cheaper
            self._rebuild()
            return
        for _ in range(self.depth):
            node >>= 1
            node = node[np.append(True, node[1:] != node[:-1])]  # sorted, so repeats are neighbours
            self.nodes[node] = self.nodes[2 * node] + self.nodes[2 * node + 1]

    def _rebuild(self) -> None:
        n = self.leaves
        while n > 1:
            self.nodes[n // 2:n] = self.nodes[n:2 * n:2] + self.nodes[n + 1:2 * n:2]
            n //= 2

    def find(self, mass: np.ndarray) -> np.ndarray:
        """For each `mass` in [0, total), the leaf whose interval of the cumulative sum holds it.

        A walk never enters a subtree of sum 0, so it ends on a leaf > 0 even where rounding puts
        `mass` at or past a boundary."""
        if not self.nodes[1] > 0:
            raise ValueError("cannot draw from a sum-tree whose leaves are all 0")
        mass = np.array(mass, np.float64)
        node = np.ones(mass.shape, np.int64)
        for _ in range(self.depth):
            left = 2 * node
            left_sum = self.nodes[left]
            right = (mass >= left_sum) & (self.nodes[left + 1] > 0)
            mass -= np.where(right, left_sum, 0.0)
            node = left + right
        return node - self.leaves
