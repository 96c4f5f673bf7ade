"""A sum-tree over a fixed number of non-negative leaves, with batch operations in numpy.

Ray RLlib's `SumSegmentTree` (the library implementation among our dependencies) keeps a Python
list and walks one index at a time, and `ray.rllib` does not import with `ray[default]` alone;
this one moves a whole batch through a level per numpy call. At a batch of 256, a call costs
little more than its fixed overhead, so a batch operation costs about its number of calls: a
binary tree over 1M leaves is 20 levels of ~6 calls for each of `set` and `find`. This tree is
wide and shallow instead, and brings its sums up to date once per read rather than once per write:

- the leaves are a flat float64 array; each level above holds the sums of `FANOUT` consecutive
  entries of the level below, up to a top level of at most `TOP` entries: one level of sums over
  100k leaves (6,250 of them), two over 1M (62,500, then 3,907 at the top);
- `find` searches the top's cumulative sum once for the whole batch (`searchsorted`), then on each
  level below gathers each mass's row of `FANOUT` children, takes the rows' cumulative sums and
  picks in each the first child whose sum passes the mass: about a dozen calls a level;
- `set` writes the leaves and records them; the next `total` or `find` recomputes the parents of
  every leaf changed since (a gather and a row sum per level; a parent written twice gets the same
  sum twice, so only the leaves need a dedupe) and the top's cumulative sum. The prioritized
  sampler's three writes per batch (evicted, arrived, new priorities) cost one pass.

Sums are recomputed from their children, never adjusted by differences, so no rounding error
accumulates over millions of updates. A row's cumulative sum is a sequential scan: it never
decreases, and a child of 0 adds nothing, so its interval is empty and no mass ends in it.

numpy's scans cost ~3 ns an element, hence short rows and a short top. torch's are 4-8x faster, but
neither way of using them paid: torch hands a scan of many rows to its thread pool, whose wake-ups
cost more than the scan on a busy host (the batches/s fell 20-fold on 2 shared cores), and one
single-threaded scan over the batch's rows end to end gained ~10% of a batch while measuring each
row against the sums of the rows before it in the batch, which can round a row of small leaves away.
"""

from __future__ import annotations

import numpy as np

FANOUT = 16
"""Children per sum below the top: a row is 16 float64 (two cache lines)."""
TOP = 8192
"""Most entries of the top level. Its cumulative sum is recomputed after changes, ~3 ns an entry;
a level more costs ~30 us a batch, so the top stops where its scan would cost that."""


class SumTree:
    """`capacity` leaves (all 0 at first) and the sums over them; `fanout` and `top` shape the
    levels (tests make small trees deep with them)."""

    def __init__(self, capacity: int, fanout: int = FANOUT, top: int = TOP) -> None:
        if capacity < 1 or fanout < 2 or top < 1:
            raise ValueError(f"a sum-tree needs capacity >= 1, fanout >= 2, top >= 1; got {capacity}, {fanout}, {top}")
        self.capacity, self.fanout = int(capacity), int(fanout)
        self.levels: list[np.ndarray] = []
        """The leaves first, the top last; every level but the top is a whole number of rows."""
        n = self.capacity
        while n > top:
            rows = -(-n // fanout)
            self.levels.append(np.zeros(rows * fanout, np.float64))
            n = rows
        self.levels.append(np.zeros(n, np.float64))
        self.leaves = self.levels[0]
        self._top_cumsum = np.zeros(n + 1, np.float64)
        """0, then the top's cumulative sum: up to date when `_changed` is empty."""
        self._changed: list[np.ndarray] = []

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for level in self.levels) + self._top_cumsum.nbytes

    @property
    def total(self) -> float:
        return float(self._cumulative()[-1])

    def __getitem__(self, idx: np.ndarray) -> np.ndarray:
        return self.leaves[np.asarray(idx, np.int64)]

    def set(self, idx: np.ndarray, values: np.ndarray | float) -> None:
        """Leaves `idx` take `values` (>= 0); where a leaf repeats, its last value wins."""
        idx = np.array(idx, np.int64).ravel()  # a copy: kept until the sums are next brought up to date
        if idx.size == 0:
            return
        if np.ndim(values) == 0:
            self.leaves[idx] = values  # one value for all: a repeat writes the same
        else:  # numpy does not promise which of repeated writes lands: keep each leaf's last
            values = np.asarray(values, np.float64).ravel()
            order = np.argsort(idx, kind="stable")
            ordered = idx[order]
            last = np.ones(idx.size, bool)
            np.not_equal(ordered[1:], ordered[:-1], out=last[:-1])
            self.leaves[ordered[last]] = values[order[last]]
        self._changed.append(idx)

    def _cumulative(self) -> np.ndarray:
        """0 and the top's cumulative sum, after bringing the sums up to date with the leaves."""
        if self._changed:
            node = np.concatenate(self._changed)
            self._changed.clear()
            for children, parents in zip(self.levels, self.levels[1:]):
                rows = children.reshape(-1, self.fanout)
                node //= self.fanout
                if 4 * node.size >= len(rows):  # most rows: summing them all is cheaper
                    parents[:len(rows)] = rows.sum(axis=1)
                else:
                    parents[node] = rows.take(node, axis=0).sum(axis=1)
            np.cumsum(self.levels[-1], out=self._top_cumsum[1:])
        return self._top_cumsum

    def find(self, mass: np.ndarray) -> np.ndarray:
        """For each `mass` (a 1-D array) in [0, total), the leaf whose interval of the cumulative
        sum holds it; sorted masses read the tree in address order, which is faster.

        A mass never ends in an interval of length 0 (a subtree of sum 0); where rounding puts it
        at or past the end of its row, it is taken to just below that end, so it ends on a leaf > 0."""
        cumsum = self._cumulative()
        if not cumsum[-1] > 0:
            raise ValueError("cannot draw from a sum-tree whose leaves are all 0")
        mass = np.minimum(np.asarray(mass, np.float64), np.nextafter(cumsum[-1], 0.0))
        node = np.searchsorted(cumsum, mass, side="right") - 1
        mass -= cumsum[node]
        batch = np.arange(mass.size)
        for level in reversed(self.levels[:-1]):
            rows = level.reshape(-1, self.fanout).take(node, axis=0)
            cumsum = np.zeros((rows.shape[0], self.fanout + 1), np.float64)  # 0, then the row's sums
            np.cumsum(rows, axis=1, out=cumsum[:, 1:])
            mass = np.minimum(mass, np.nextafter(cumsum[:, -1], 0.0))
            child = (cumsum[:, 1:] > mass[:, None]).argmax(axis=1)
            mass -= cumsum[batch, child]
            node = node * self.fanout + child
        return node
