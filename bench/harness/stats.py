"""Small statistics: medians, ratios, alternation."""

from __future__ import annotations

import math
import statistics


def median(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(vals) if vals else None


def spread(values):
    vals = [v for v in values if v is not None]
    return (min(vals), max(vals)) if vals else (None, None)


def median_ci(values, level=0.95):
    """A distribution-free confidence interval for the median: the k-th smallest and
    k-th largest of n values, with k the largest rank whose two-sided binomial tail
    stays within 1 - level. Returns (low, high, coverage), or None when n is too small
    for any interval to reach `level` (fewer than 6 values at 95%)."""
    vals = sorted(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v)))
    n = len(vals)
    tail, k, below = 0.0, 0, 0.0
    for i in range(n):
        below += math.comb(n, i) / 2 ** n      # P(at most i values below the median)
        if 2 * below > 1 - level:
            break
        k, tail = i + 1, below
    if k == 0:
        return None
    return vals[k - 1], vals[n - k], 1 - 2 * tail


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def round_ratios(a_rounds, b_rounds, key):
    """Per-round ratios a/b of `key` (runs of the same round are adjacent in time)."""
    out = []
    for a, b in zip(a_rounds, b_rounds):
        out.append(ratio(a.get(key), b.get(key)))
    return out


def alternate(names, rounds, fn):
    """Runs fn(name, round) for every name, `rounds` times, reversing the order every
    other round (A B C, C B A, ...), so each pair is measured close together in time
    and neither side always goes first."""
    results = {n: [] for n in names}
    orders = []
    for r in range(rounds):
        order = list(names) if r % 2 == 0 else list(reversed(names))
        orders.append(order)
        for n in order:
            results[n].append(fn(n, r))
    return results, orders


def pct_list(values, ps=(50, 90, 99)):
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {f"p{p}": None for p in ps} | {"max": None}
    out = {}
    for p in ps:
        k = max(0, min(len(vals) - 1, math.ceil(p / 100 * len(vals)) - 1))
        out[f"p{p}"] = vals[k]
    out["max"] = vals[-1]
    return out
