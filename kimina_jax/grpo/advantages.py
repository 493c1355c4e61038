"""Advantage estimators (SPEC 3): each response's advantage from its group's scores, and DAPO's informative groups.

Group sums are elementwise float32 sums over a same-group matrix (no matmul, so no reduced-precision passes on TPU).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kimina_jax.errors import KiminaError


def grpo_advantages(scores: Any, group_ids: Any, norm_by_std: bool = False, eps: float = 1e-6) -> jax.Array:
    """A_i = r_i - mean(group of i), optionally / (unbiased std(group) + eps); a group of one gets 0.

    `group_ids` may be any integers (not necessarily contiguous); see `_groups` for how group sums are taken.
    SPEC 3 gives a lone response mean 0 (advantage = its reward, as verl does); issue 3 overrides that
    with 0, since one response carries no group-relative signal.
    """
    scores, same, count = _groups(scores, group_ids)
    mean = _group_sum(same, scores) / count
    advantages = scores - mean
    if norm_by_std:
        advantages = advantages / (_group_std(scores, same, count, mean) + eps)
    return jnp.where(count > 1, advantages, 0.0)


def rloo_advantages(scores: Any, group_ids: Any, norm_by_std: bool = False, eps: float = 1e-6) -> jax.Array:
    """RLOO (verl's `rloo`): A_i = r_i - mean of the other responses of its group; a group of one gets 0.

    verl computes it as n/(n-1) * (r_i - mean(group)), the same number, and leaves a lone response's reward as its
    advantage; a group of one gets 0 here, as in `grpo_advantages`. verl's RLOO has no std normalisation, so
    `norm_by_std=True` is refused rather than ignored; `eps` is unused (kept for the registry's common signature).
    """
    if norm_by_std:
        raise KiminaError("the rloo advantage has no std normalisation (as in verl); set norm_by_std false")
    scores, same, count = _groups(scores, group_ids)
    others = _group_sum(same, scores) - scores
    return jnp.where(count > 1, scores - others / jnp.maximum(count - 1.0, 1.0), 0.0)


def grpo_passk_advantages(scores: Any, group_ids: Any, norm_by_std: bool = False, eps: float = 1e-6) -> jax.Array:
    """Pass@k (verl's `grpo_passk`): only the best response of a group gets an advantage, r_max - r_second_max,
    optionally / (unbiased std(group) + eps); every other response gets 0, and so does a group of one (verl
    refuses groups of one).

    Computed as A_i = max(0, r_i - max of the others in its group), which is that number for every input: ties at
    the top give 0 whichever tied response verl's `topk` picks (r_max - r_second_max = 0), so no tie-break is needed.
    """
    scores, same, count = _groups(scores, group_ids)
    others = (same > 0) & ~jnp.eye(scores.shape[0], dtype=bool)
    best_other = jnp.max(jnp.where(others, scores[None, :], -jnp.inf), axis=1)
    advantages = jnp.maximum(scores - best_other, 0.0)
    if norm_by_std:
        advantages = advantages / (_group_std(scores, same, count, _group_sum(same, scores) / count) + eps)
    # A lone response's best_other is -inf: its advantage is set here, not computed.
    return jnp.where(count > 1, advantages, 0.0)


AdvantageEstimator = Callable[..., jax.Array]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": grpo_advantages,
    "rloo": rloo_advantages,
    "grpo_passk": grpo_passk_advantages,
}


def compute_advantages(
    name: str, scores: Any, group_ids: Any, norm_by_std: bool = False, eps: float = 1e-6
) -> jax.Array:
    """Per-response advantages by the estimator `name` of `ADVANTAGE_ESTIMATORS` (`algorithm.adv_estimator`).

    Dr. GRPO needs no estimator of its own: it is `grpo` without std normalisation, aggregated with
    `seq-mean-token-sum-norm`, i.e. `algorithm.norm_adv_by_std=false` and
    `algorithm.loss_agg_mode=seq-mean-token-sum-norm`: the defaults, and the Kimina recipe's own setting.
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise KiminaError(f"unknown advantage estimator {name!r}; expected one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name](scores, group_ids, norm_by_std, eps)


def informative_groups(values: Any, group_ids: Any) -> np.ndarray:
    """Per sample: whether its group's `values` (e.g. scores) are not all equal, i.e. whether the group carries a
    group-relative signal (DAPO's filter keeps these groups). A group of one is not informative. Runs on host."""
    values = np.asarray(values, np.float64).ravel()
    groups, inverse = np.unique(np.asarray(group_ids), return_inverse=True)
    inverse = inverse.ravel()
    low = np.full(len(groups), np.inf)
    high = np.full(len(groups), -np.inf)
    np.minimum.at(low, inverse, values)
    np.maximum.at(high, inverse, values)
    return (low < high)[inverse]


def _groups(scores: Any, group_ids: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 scores, the [N, N] float32 same-group matrix and each response's group size. Group sums are
    elementwise float32 sums over this matrix (no matmul, so no reduced-precision passes on TPU)."""
    scores = jnp.asarray(scores, jnp.float32)
    group_ids = jnp.asarray(group_ids)
    same = (group_ids[:, None] == group_ids[None, :]).astype(jnp.float32)
    return scores, same, same.sum(axis=1)


def _group_sum(same: jax.Array, values: jax.Array) -> jax.Array:
    """Sum of `values` over each response's group."""
    return (same * values[None, :]).sum(axis=1)


def _group_std(scores: jax.Array, same: jax.Array, count: jax.Array, mean: jax.Array) -> jax.Array:
    """Unbiased std of each response's group (0 for a group of one)."""
    squares = (same * (scores[None, :] - mean[:, None]) ** 2).sum(axis=1)
    return jnp.sqrt(squares / jnp.maximum(count - 1.0, 1.0))
