"""Union-find over element ids: the bookkeeping behind the channel dependency analysis (see graph.py).

An *element* is one output channel of a conv/linear layer, one entry of a parameter read with ``get_attr``, or
one opaque tensor the analysis cannot see through. Coupled elements are unioned; blocked ones carry the first
reason they were blocked, which the report shows.
"""

from __future__ import annotations

import numpy as np
import torch

def _distinct(t: torch.Tensor) -> torch.Tensor:
    """``torch.unique(t)``, after dropping the dims along which ``t`` is constant (a cheap O(n) check that
    spares sorting whole activations, which are mostly constant over space)."""
    for d in range(t.dim()):
        if t.shape[d] > 1 and bool((t == t.narrow(d, 0, 1)).all()):
            t = t.narrow(d, 0, 1)
    return torch.unique(t)


class Elements:
    """Union-find over element ids, vectorised where it matters (ids can number in the millions)."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)
        self.size = 0
        self._blocked: list[tuple[np.ndarray, str]] = []  # (ids, reason), in the order they were blocked
        self._frozen: np.ndarray | None = None

    def new(self, n: int, reason: str | None = None) -> torch.Tensor:
        start = self.size
        if start + n > len(self.parent):
            grown = np.arange(max(2 * len(self.parent), start + n, 1024), dtype=np.int64)
            grown[:start] = self.parent[:start]
            self.parent = grown
        self.size = start + n
        ids = np.arange(start, start + n, dtype=np.int64)
        if reason is not None:
            self._blocked.append((ids, reason))
        self._frozen = None
        return torch.from_numpy(ids.copy())

    def find(self, e: int) -> int:
        p = self.parent
        root = int(e)
        while p[root] != root:
            root = int(p[root])
        while p[e] != root:
            nxt = int(p[e])
            p[e] = root
            e = nxt
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra
            self._frozen = None

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        n = self.size
        keys = _distinct(a * n + b)  # one 1-D unique is far faster than unique(dim=0) on pairs
        for k in keys.tolist():
            x, y = divmod(k, n)
            if x != y:
                self.union(x, y)

    def block(self, labels: torch.Tensor, reason: str) -> None:
        self._blocked.append((_distinct(labels).numpy(), reason))

    def _compressed(self) -> np.ndarray:
        if self._frozen is None:
            p = self.parent[: self.size].copy()
            while True:
                q = p[p]
                if np.array_equal(q, p):
                    break
                p = q
            self._frozen = p
        return self._frozen

    def roots(self, labels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._compressed()[labels.reshape(-1).numpy()]).reshape(labels.shape)

    def blocked_roots(self) -> dict[int, str]:
        """Root → the first reason any of its elements was blocked."""
        comp = self._compressed()
        out: dict[int, str] = {}
        for ids, why in self._blocked:
            for r in np.unique(comp[ids]).tolist():
                out.setdefault(r, why)
        return out

