"""Sample metrics of SPEC 8: unbiased pass@k, verl's mean@n, std@n and bootstrap best@k / worst@k per problem,
their averages, the turn-1 / turn-2 (error-fix) bookkeeping, and verl's metric names (SPEC 9)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kimina_jax.types import Sample, Verdict


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


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the metrics need of one sample: whether it was judged (verified), and whether it was solved."""

    verified: bool
    solved: bool

    @classmethod
    def of(cls, sample: Sample) -> Outcome:
        return cls(sample.is_verified, sample.acc >= 1.0)

    @classmethod
    def of_record(cls, record: dict) -> Outcome:
        return cls(record["verdict"] is None or Verdict(record["verdict"]).is_verified, record["acc"] >= 1.0)


def turn_values(pairs: Sequence[tuple[Outcome, Outcome | None]]) -> dict[str, list[float]]:
    """The 0/1 values of one problem's samples: (turn-1 outcome, outcome of its fix attempt or None) per sample.

    acc_turn_1: solved at turn 1. acc_turn_2: solved at turn 1 or by the fix; a failure without a fix attempt
    (no proof, no feedback, prompt too long) stays 0. Unverified turn-1 samples are left out of both; a sample
    whose fix could not be verified is left out of acc_turn_2 only.
    """
    turn_1, turn_2 = [], []
    for first, fix in pairs:
        if not first.verified:
            continue
        turn_1.append(float(first.solved))
        if first.solved or fix is None:
            turn_2.append(float(first.solved))
        elif fix.verified:
            turn_2.append(float(fix.solved))
    return {"acc_turn_1": turn_1, "acc_turn_2": turn_2}


def summarize(
    values: Mapping[Any, Mapping[str, list[float]]], n: int, ks: Sequence[int], error_fix: bool
) -> tuple[dict[str, dict[str, float]], dict[Any, dict[str, dict[str, float]]]]:
    """(averaged, per problem) metrics of each variable, from `turn_values` of every problem.

    Variables: `acc_turn_1`, with error-fix `acc_turn_2`, and `acc`: the headline accuracy, always `acc_turn_1`
    (the original never folds the fix turn into it). Averages are over the problems that have the metric (a
    problem with no verified sample has none).
    """
    names = ["acc_turn_1", "acc_turn_2"] if error_fix else ["acc_turn_1"]
    per_problem = {
        problem: {name: problem_metrics(vals[name], n, ks) for name in names} for problem, vals in values.items()
    }
    averaged = {name: average_metrics({p: m[name] for p, m in per_problem.items()}) for name in names}
    averaged["acc"] = averaged["acc_turn_1"]
    return averaged, per_problem


def val_metric_names(averaged: Mapping[str, Mapping[str, float]], data_source: str, n: int) -> dict[str, float]:
    """verl's names and split: `val-core/<source>/acc/{mean@n, best@n/mean, best@n/std}` (verl's rule: the core
    variable's mean / maj / best at the largest size), everything else under `val-aux/<source>/<variable>/`."""
    out = {}
    for var, metrics in averaged.items():
        for name, value in metrics.items():
            core = var == "acc" and (name == f"mean@{n}" or name.startswith(f"best@{n}/"))
            out[f"{'val-core' if core else 'val-aux'}/{data_source}/{var}/{name}"] = value
    return out
