"""`dsv3.tools.plan`: the exact stage/recompute planner against brute force over every plan."""

from __future__ import annotations

import itertools
import random

from dsv3.tools.plan import min_budget, plan


def synthetic(seed: int, L: int, S: int):
    """Per-layer forward time and activation, a per-stage in-flight factor (1F1B: S - s), static memory."""
    rng = random.Random(seed)
    f = [rng.uniform(1, 3) for _ in range(L)]
    act = [rng.uniform(2, 6) for _ in range(L)]
    w = [rng.uniform(1, 2) for _ in range(L)]

    def time(s, a, b, r):
        return sum(3 * f[i] for i in range(a, b)) + sum(f[i] for i in range(a, a + r)) + (2.0 if s == S - 1 else 0.0)

    def mem(s, a, b, r):
        kept = sum(0.3 if i < a + r else act[i] for i in range(a, b))
        return sum(w[i] for i in range(a, b)) + (S - s) * kept
    return time, mem


def brute(L, S, time, mem, budget):
    best = None
    for cuts in itertools.combinations(range(1, L), S - 1):
        bounds = [0, *cuts, L]
        plan_r, times = [], []
        for s in range(S):
            a, b = bounds[s], bounds[s + 1]
            ok = [r for r in range(b - a + 1) if mem(s, a, b, r) <= budget]
            if not ok:
                break
            r = min(ok, key=lambda r: time(s, a, b, r))
            plan_r.append(r)
            times.append(time(s, a, b, r))
        else:
            key = (max(times), sum(times))
            if best is None or key < best[0]:
                best = (key, bounds, plan_r)
    return best


def brute_min_budget(L, S, mem):
    out = float("inf")
    for cuts in itertools.combinations(range(1, L), S - 1):
        bounds = [0, *cuts, L]
        out = min(out, max(min(mem(s, bounds[s], bounds[s + 1], r) for r in range(bounds[s + 1] - bounds[s] + 1)) for s in range(S)))
    return out


def test_plan_is_the_brute_force_optimum():
    for seed in range(12):
        L, S = 9, 3 + seed % 2
        time, mem = synthetic(seed, L, S)
        for budget in (18.0, 25.0, 40.0, 1e9):
            got = plan(L, S, time, mem, budget)
            ref = brute(L, S, time, mem, budget)
            if ref is None:
                assert got is None
                continue
            assert got is not None
            assert abs(got.slowest - ref[0][0]) < 1e-9, (seed, budget, got, ref)
            assert all(m <= budget for m in got.mems)


def test_impossible_budget_reports_the_smallest_that_fits():
    L, S = 9, 3
    time, mem = synthetic(3, L, S)
    need = min_budget(L, S, mem)
    assert abs(need - brute_min_budget(L, S, mem)) < 1e-9
    assert plan(L, S, time, mem, need * 0.999) is None
    assert plan(L, S, time, mem, need) is not None


def test_61_layers_16_stages_in_seconds():
    import time as clock

    L, S = 61, 16
    f = [1.0 + (i % 3) * 0.1 for i in range(L)]
    t0 = clock.perf_counter()
    got = plan(L, S, lambda s, a, b, r: sum(f[a:b]) * 3 + sum(f[a:a + r]), lambda s, a, b, r: (S - s) * (b - a - r) + (b - a), 40.0)
    assert got is not None and len(got.times) == S
    assert clock.perf_counter() - t0 < 30  # a loaded 2-core machine; seconds when quiet
