"""Per-problem sample metrics of SPEC 8: unbiased pass@k, and verl's mean@n, std@n and bootstrap best@k / worst@k."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k = 1 - C(n-c, k) / C(n, k) for c correct among n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def bootstrap_extremes(values: Sequence[float], k: int, n_bootstrap: int = 1000, seed: int = 42) -> dict[str, float]:
    """verl's `best@k/{mean,std}` and `worst@k/{mean,std}`: over `n_bootstrap` resamples (size k, with replacement),
    the mean and population std of each resample's max and min."""
    values = np.asarray(values, dtype=np.float64)
    # verl reseeds the global RNG with `seed` for each k and draws resample after resample with np.random.choice;
    # one (n_bootstrap, k) draw from RandomState(seed) is that same stream, row by row.
    draws = values[np.random.RandomState(seed).choice(len(values), size=(n_bootstrap, k), replace=True)]
    best, worst = draws.max(axis=1), draws.min(axis=1)
    return {
        f"best@{k}/mean": float(best.mean()), f"best@{k}/std": float(best.std()),
        f"worst@{k}/mean": float(worst.mean()), f"worst@{k}/std": float(worst.std()),
    }


def bootstrap_sizes(n: int) -> list[int]:
    """verl's subset sizes for n samples: 2, 4, 8, ... below n, then n."""
    sizes, k = [], 2
    while k < n:
        sizes.append(k)
        k *= 2
    return sizes + [n]


def problem_metrics(values: Sequence[float], n: int, ks: Sequence[int] = ()) -> dict[str, float]:
    """One problem's metrics from the 0/1 values of its judged samples (at most `n`; unjudged ones left out).

    Names count the samples asked for (`n`), as the values may be fewer: mean@n, and when n > 1 std@n (population
    std) and best@k / worst@k {mean, std} for verl's sizes and for `ks` (bootstrap of the values present); pass@k
    for `ks` (only when at least k values are present: the unbiased estimator needs k of them). No values: no metrics.
    """
    if not values:
        return {}
    out = {f"mean@{n}": float(np.mean(values))}
    if n > 1:
        out[f"std@{n}"] = float(np.std(values))
        for k in sorted(set(bootstrap_sizes(n)) | set(ks)):
            out.update(bootstrap_extremes(values, k))
    correct = int(round(sum(values)))
    for k in ks:
        if k <= len(values):
            out[f"pass@{k}"] = pass_at_k(len(values), correct, k)
    return out


def average_metrics(per_problem: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean over problems of every metric name (problems lacking a name are left out of its mean)."""
    names = sorted({name for metrics in per_problem.values() for name in metrics})
    return {
        name: float(np.mean([m[name] for m in per_problem.values() if name in m])) for name in names
    }
