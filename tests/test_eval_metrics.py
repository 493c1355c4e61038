"""Evaluation metrics (SPEC 8): pass@k, verl's bootstrap best@k / worst@k and std against independent
computations, the turn-1 / turn-2 bookkeeping and verl's metric names."""
from __future__ import annotations

import itertools
from fractions import Fraction

import numpy as np
import pytest

from kimina_jax.eval import (
    Outcome,
    bootstrap_extremes,
    pass_at_k,
    problem_metrics,
    summarize,
    turn_values,
    val_metric_names,
)
from kimina_jax.evaluate import pass_at_k as promised_pass_at_k


def test_pass_at_k_stays_importable_from_evaluate():
    assert promised_pass_at_k is pass_at_k


# ---------------------------------------------------------------------------------------------- formulas
def pass_at_k_by_counting(n: int, c: int, k: int) -> Fraction:
    """The fraction of k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_pass_at_k_is_the_subset_count():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(pass_at_k_by_counting(n, c, k)), abs=1e-12)


def test_pass_at_k_edges():
    for n in (1, 8, 32):
        for k in range(1, n + 1):
            assert pass_at_k(n, 0, k) == 0.0
            assert pass_at_k(n, n, k) == 1.0
        for c in range(1, n + 1):
            assert pass_at_k(n, c, n) == 1.0
        assert pass_at_k(n, 1, 1) == pytest.approx(1 / n)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def verl_bootstrap(values: list[float], k: int) -> dict[str, float]:
    """verl's bootstrap_metric(..., reduce_fns=[np.max, np.min]) as verl writes it: the global RNG seeded with 42,
    1000 resamples drawn one by one, both statistics of each resample, then np.mean and np.std of each list."""
    np.random.seed(42)
    maxima, minima = [], []
    for _ in range(1000):
        resample = [values[i] for i in np.random.choice(len(values), size=k, replace=True)]
        maxima.append(max(resample))
        minima.append(min(resample))
    return {
        f"best@{k}/mean": np.mean(maxima), f"best@{k}/std": np.std(maxima),
        f"worst@{k}/mean": np.mean(minima), f"worst@{k}/std": np.std(minima),
    }


@pytest.mark.parametrize("values", [[0, 0, 1, 0, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0, 1, 0], [0] * 8, [1] * 4, [0, 1]])
def test_bootstrap_extremes_are_verls_bootstrap(values):
    for k in (1, 2, 4, 8, 16):
        ours = bootstrap_extremes(values, k)
        assert ours == pytest.approx(verl_bootstrap(values, k), abs=1e-12)
        # And near their expectations, 1 - (1 - c/m)^k and (c/m)^k, within 4 standard errors of a 1000-draw mean;
        # a 0/1 statistic with mean p has population std sqrt(p (1 - p)).
        p = sum(values) / len(values)
        for name, expected in ((f"best@{k}", 1 - (1 - p) ** k), (f"worst@{k}", p**k)):
            assert abs(ours[f"{name}/mean"] - expected) <= 4 * np.sqrt(expected * (1 - expected) / 1000) + 1e-12
            mean = ours[f"{name}/mean"]
            assert ours[f"{name}/std"] == pytest.approx(np.sqrt(mean * (1 - mean)), abs=1e-12)


def test_bootstrap_extremes_of_equal_values_have_no_spread():
    assert bootstrap_extremes([1.0] * 5, 4) == {"best@4/mean": 1.0, "best@4/std": 0.0, "worst@4/mean": 1.0,
                                                "worst@4/std": 0.0}


def test_problem_metrics_names_count_the_samples_asked_for():
    values = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]  # one of 8 left out
    metrics = problem_metrics(values, n=8, ks=(1, 8))
    bootstrap = {f"{side}@{k}/{stat}" for side in ("best", "worst") for k in (1, 2, 4, 8) for stat in ("mean", "std")}
    assert set(metrics) == {"mean@8", "std@8", "pass@1"} | bootstrap
    assert metrics["mean@8"] == pytest.approx(2 / 7)
    assert metrics["std@8"] == pytest.approx(np.sqrt(2 / 7 * 5 / 7))  # population std of 2 ones among 7
    assert metrics["worst@4/std"] == pytest.approx(verl_bootstrap(values, 4)["worst@4/std"], abs=1e-12)
    assert metrics["pass@1"] == pytest.approx(2 / 7)  # pass@8 needs 8 judged samples: left out
    assert problem_metrics([], n=8, ks=(1,)) == {}


def test_std_and_bootstrap_sizes_follow_verl():
    assert problem_metrics([0.0, 1.0, 1.0, 0.0], n=4)["std@4"] == 0.5  # deviations all 1/2
    assert problem_metrics([1.0], n=1) == {"mean@1": 1.0}  # one sample: no spread, no bootstrap
    # verl's sizes: powers of two below n, then n itself.
    sizes = {int(name.split("@")[1].split("/")[0]) for name in problem_metrics([0.0, 1.0] * 3, n=6) if "@" in name}
    assert sizes == {2, 4, 6}


# ---------------------------------------------------------------------------------------------- turn 2
def test_turn_values_count_solved_within_one_fix():
    solved, failed, unjudged = Outcome(True, True), Outcome(True, False), Outcome(False, False)
    pairs = [
        (solved, None),  # solved at turn 1
        (failed, solved),  # fixed
        (failed, failed),  # fix failed
        (failed, None),  # no fix attempt (no feedback): stays a failure
        (failed, unjudged),  # fix not verified: left out of turn 2 only
        (unjudged, None),  # not verified: left out of both
    ]
    assert turn_values(pairs) == {"acc_turn_1": [1, 0, 0, 0, 0], "acc_turn_2": [1, 1, 0, 0]}


VALUES = {  # per problem: turn 1 solves 1 of 4 samples, within one fix 3 of 4
    "a": {"acc_turn_1": [0.0, 1.0], "acc_turn_2": [1.0, 1.0]},
    "b": {"acc_turn_1": [0.0, 0.0], "acc_turn_2": [0.0, 1.0]},
}


def test_headline_acc_is_turn_1_with_or_without_error_fix():
    with_fix, per_problem = summarize(VALUES, 2, (1, 2), error_fix=True)
    assert with_fix["acc"] == with_fix["acc_turn_1"]
    assert with_fix["acc_turn_1"]["mean@2"] == 0.25 and with_fix["acc_turn_2"]["mean@2"] == 0.75
    assert with_fix["acc_turn_2"]["pass@2"] == 1.0 and per_problem["b"]["acc_turn_1"]["pass@2"] == 0.0
    names = val_metric_names(with_fix, "minif2f_test", 2)
    # verl's rule: only the core variable's mean / maj / best at the largest size is val-core.
    core = {name: value for name, value in names.items() if name.startswith("val-core/")}
    turn_1_best = (verl_bootstrap([0.0, 1.0], 2)["best@2/mean"] + 0.0) / 2  # problem b never solves turn 1
    turn_1_best_std = (verl_bootstrap([0.0, 1.0], 2)["best@2/std"] + 0.0) / 2
    assert core == pytest.approx({
        "val-core/minif2f_test/acc/mean@2": 0.25,
        "val-core/minif2f_test/acc/best@2/mean": turn_1_best,
        "val-core/minif2f_test/acc/best@2/std": turn_1_best_std,
    }, abs=1e-12)
    turn_2_best = (1.0 + verl_bootstrap([0.0, 1.0], 2)["best@2/mean"]) / 2
    assert names["val-aux/minif2f_test/acc_turn_2/mean@2"] == 0.75 > names["val-core/minif2f_test/acc/mean@2"]
    assert names["val-aux/minif2f_test/acc_turn_2/best@2/mean"] == pytest.approx(turn_2_best, abs=1e-12)
    assert names["val-aux/minif2f_test/acc_turn_1/best@2/mean"] == pytest.approx(turn_1_best, abs=1e-12)
    # The other statistics: std@2 is 1/2 for [0, 1] and 0 for equal values; worst@2 of [0, 1] by verl's bootstrap.
    assert names["val-aux/minif2f_test/acc/std@2"] == 0.25 and names["val-aux/minif2f_test/acc_turn_2/std@2"] == 0.25
    worst = verl_bootstrap([0.0, 1.0], 2)
    assert names["val-aux/minif2f_test/acc/worst@2/mean"] == pytest.approx(worst["worst@2/mean"] / 2, abs=1e-12)
    assert names["val-aux/minif2f_test/acc/worst@2/std"] == pytest.approx(worst["worst@2/std"] / 2, abs=1e-12)
    assert names["val-aux/minif2f_test/acc_turn_2/worst@2/mean"] == pytest.approx(
        (1.0 + worst["worst@2/mean"]) / 2, abs=1e-12
    )
    assert "val-aux/minif2f_test/acc/pass@2" in names and "val-aux/minif2f_test/acc/best@1/mean" in names
    without_fix, _ = summarize(VALUES, 2, (1,), error_fix=False)
    assert without_fix["acc"] == without_fix["acc_turn_1"] and "acc_turn_2" not in without_fix
