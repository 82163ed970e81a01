"""The exact pipeline planner behind `dsv3 balance` (SAPP's problem, solved by dynamic programming).

Given L layers in order cut into S contiguous, non-empty stages, where stage s with layers [a, b)
recomputing its first r of them takes `time(s, a, b, r)` and needs `mem(s, a, b, r)` bytes, find the
cuts and recompute counts that minimise the slowest stage with every stage within `budget` (among
equally slow plans the recursion prefers less total time, greedily: that tie-break is not exact).

For a fixed cut every stage is independent, and recomputing more never makes a stage faster, so a
stage's best count is its smallest r that fits. Over cuts, `best[s][b]` (stages 0..s covering layers
[0, b)) = min over a of max(best[s-1][a], stage s on [a, b)): O(S·L²·R) cost evaluations, exact.
`min_budget` is the same recursion minimising the largest stage memory (each stage at its
least-memory count): the smallest budget under which any plan fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Cost = Callable[[int, int, int, int], float]


@dataclass
class Plan:
    bounds: list[int]
    """Stage s holds layers [bounds[s], bounds[s+1])."""
    recompute: list[int]
    """Recomputed layers (the first ones) per stage."""
    times: list[float]
    mems: list[float]

    @property
    def slowest(self) -> float:
        return max(self.times)


def _best_r(s: int, a: int, b: int, time: Cost, mem: Cost, budget: float, max_r: Callable[[int, int, int], int]):
    for r in range(max_r(s, a, b) + 1):
        m = mem(s, a, b, r)
        if m <= budget:
            return r, time(s, a, b, r), m
    return None


def plan(n_layers: int, n_stages: int, time: Cost, mem: Cost, budget: float,
         max_r: Callable[[int, int, int], int] | None = None) -> Plan | None:
    """The optimal plan (see the module docstring), or None when nothing fits `budget`."""
    max_r = max_r or (lambda s, a, b: b - a)
    INF = (float("inf"), float("inf"))
    best = [[INF] * (n_layers + 1) for _ in range(n_stages + 1)]
    choice: list[list[tuple | None]] = [[None] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(n_stages):
        last = s == n_stages - 1
        for b in range(s + 1, n_layers - (n_stages - s - 1) + 1):
            if last and b != n_layers:
                continue
            for a in range(s, b):
                prev = best[s][a]
                if prev == INF:
                    continue
                got = _best_r(s, a, b, time, mem, budget, max_r)
                if got is None:
                    continue
                r, t, m = got
                cand = (max(prev[0], t), prev[1] + t)
                if cand < best[s + 1][b]:
                    best[s + 1][b] = cand
                    choice[s + 1][b] = (a, r, t, m)
    if best[n_stages][n_layers] == INF:
        return None
    bounds, rec, times, mems = [n_layers], [], [], []
    b = n_layers
    for s in range(n_stages, 0, -1):
        a, r, t, m = choice[s][b]
        bounds.append(a)
        rec.append(r)
        times.append(t)
        mems.append(m)
        b = a
    return Plan(bounds[::-1], rec[::-1], times[::-1], mems[::-1])


def min_budget(n_layers: int, n_stages: int, mem: Cost, max_r: Callable[[int, int, int], int] | None = None) -> float:
    """The smallest budget under which some plan fits: min over cuts of the largest stage's least memory."""
    max_r = max_r or (lambda s, a, b: b - a)
    INF = float("inf")
    best = [[INF] * (n_layers + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(n_stages):
        for b in range(s + 1, n_layers + 1):
            if s == n_stages - 1 and b != n_layers:
                continue
            for a in range(s, b):
                if best[s][a] == INF:
                    continue
                least = min(mem(s, a, b, r) for r in range(max_r(s, a, b) + 1))
                best[s + 1][b] = min(best[s + 1][b], max(best[s][a], least))
    return best[n_stages][n_layers]
