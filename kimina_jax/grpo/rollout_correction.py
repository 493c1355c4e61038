"""verl's rollout correction, on the host once per step batch (`algorithm.rollout_correction`): the engine's log-probs
of the sampled tokens against the old policy's give importance weights for the policy loss and reject tokens or
whole sequences whose divergence is out of bounds.

Everything is per response (ragged arrays, one value per response token), with verl's definitions: the log-ratio
is old - engine log-prob, clamped to +-20 before exp; the weights are constants (no gradient); a token_k1 or
seq_*_k1 criterion bounds engine - old (verl's k1), k2 is half the squared log-ratio, k3 exp(r) - 1 - r. The
step's `PackedBatch.corrected` carries the result into the update: the weights multiply the policy loss per token,
rejected tokens leave the loss mask (and its normalisers, as verl's modified response mask).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from kimina_jax.config import RolloutCorrectionConfig, rejection_criteria

SAFETY_BOUND = 20.0  # verl's clamp of log-ratios before exp
PREFIX = "rollout_corr/"


@dataclasses.dataclass(frozen=True)
class Correction:
    """Per response: token weights (None: no importance weighting) and kept tokens (None: no rejection), and
    verl's `rollout_corr/*` metrics."""

    weights: list[np.ndarray] | None
    keep: list[np.ndarray] | None
    metrics: dict[str, float]


def importance_level(config: RolloutCorrectionConfig, off_policy: bool) -> str | None:
    """The importance-weight level in force: `rollout_is`, with auto meaning token for off-policy rollouts (older
    weights than the step's: algorithm.off_policy, partial rollouts) and none on-policy; None: no weights."""
    level = config.rollout_is
    if level == "auto":
        level = "token" if off_policy else "none"
    return None if level == "none" else level


def is_active(config: RolloutCorrectionConfig, off_policy: bool) -> bool:
    """Whether the step computes a correction (weights or rejection)."""
    return importance_level(config, off_policy) is not None or config.rollout_rs is not None


def rollout_correction(
    old_logp: Sequence[np.ndarray], engine_logp: Sequence[np.ndarray], config: RolloutCorrectionConfig,
    off_policy: bool,
) -> Correction:
    """The correction of one step's responses (`old_logp[i]`, `engine_logp[i]`: response i's token log-probs
    under the old policy and as the engine sampled them)."""
    log_ratios = [np.asarray(o, np.float64) - np.asarray(e, np.float64) for o, e in zip(old_logp, engine_logp)]
    metrics = _offpolicy_metrics(log_ratios, old_logp, engine_logp)
    weights = keep = None
    level = importance_level(config, off_policy)
    if level is not None:
        weights, is_metrics = _importance_weights(log_ratios, level, config)
        metrics.update(is_metrics)
    if config.rollout_rs is not None:
        keep, rs_metrics = _rejection(log_ratios, rejection_criteria(config.rollout_rs, config.rollout_rs_threshold))
        metrics.update(rs_metrics)
    return Correction(weights, keep, {PREFIX + name: float(value) for name, value in metrics.items()})


def _importance_weights(log_ratios: list[np.ndarray], level: str, config: RolloutCorrectionConfig):
    """Truncated weights (token: each token's ratio; sequence: the product of the sequence's; geometric: their
    geometric mean), optionally divided by their batch mean, and verl's rollout_is_* metrics of the untruncated
    weights."""
    threshold = config.rollout_is_threshold
    if level == "token":
        raw = [np.exp(np.clip(r, -SAFETY_BOUND, SAFETY_BOUND)) for r in log_ratios]
    else:
        reduce = np.sum if level == "sequence" else np.mean
        raw = [np.full(len(r), np.exp(np.clip(reduce(r) if len(r) else 0.0, -SAFETY_BOUND, SAFETY_BOUND)))
               for r in log_ratios]
    metrics = _weight_metrics(raw, level, threshold)
    weights = [np.minimum(w, threshold) for w in raw]
    if config.rollout_is_batch_normalize:
        units = np.concatenate(weights) if level == "token" else np.array([w[0] for w in weights if len(w)])
        mean = float(units.mean()) if units.size else 0.0
        if mean > 1e-8:
            weights = [w / mean for w in weights]
        metrics["rollout_is_batch_norm_factor"] = mean if mean > 1e-8 else 1.0
    return [w.astype(np.float32) for w in weights], metrics


def _weight_metrics(raw: list[np.ndarray], level: str, threshold: float) -> dict[str, float]:
    """verl's rollout_is_{mean,max,min,std,eff_sample_size,ratio_fraction_high,ratio_fraction_low}: per token,
    or per sequence for the sequence-level weights (the fractions then count sequences)."""
    tokens = np.concatenate(raw) if raw else np.zeros(0)
    if not tokens.size:
        return {}
    units = tokens if level == "token" else np.array([w[0] for w in raw if len(w)])
    bounded = np.clip(tokens, 1.0 / threshold, threshold)  # verl's std and ESS use the weights within the bounds
    normalised = bounded / (bounded.mean() + 1e-8)
    return {
        "rollout_is_mean": tokens.mean(),
        "rollout_is_max": units.max(),
        "rollout_is_min": units.min(),
        "rollout_is_std": bounded.std() if tokens.size > 1 else 0.0,
        "rollout_is_eff_sample_size": 1.0 / np.mean(normalised ** 2),
        "rollout_is_ratio_fraction_high": np.mean(units > threshold),
        "rollout_is_ratio_fraction_low": np.mean(units < 1.0 / threshold),
    }


def _rejection(log_ratios: list[np.ndarray], criteria: list[tuple[str, float | None, float]]):
    """Kept tokens (all criteria passed) and verl's rollout_rs_* fractions, overall and per criterion."""
    clamped = [np.clip(r, -SAFETY_BOUND, SAFETY_BOUND) for r in log_ratios]
    divergence = {
        "k1": [-r for r in clamped],
        "k2": [0.5 * r ** 2 for r in clamped],
        "k3": [np.exp(r) - 1.0 - r for r in clamped],
    }
    keep = [np.ones(len(r), bool) for r in log_ratios]
    metrics: dict[str, float] = {}
    for name, lower, upper in criteria:
        level, kind = name.rsplit("_", 1)
        values = divergence[kind]
        if level != "token":
            reduce = {"seq_sum": np.sum, "seq_mean": np.mean, "seq_max": np.max}[level]
            values = [np.full(len(v), reduce(v)) if len(v) else v for v in values]
        if kind == "k1":  # bounds on the probability ratio, compared in log space
            passed = [(v >= np.log(lower)) & (v <= np.log(upper)) for v in values]
        else:
            passed = [v <= upper for v in values]
        keep = [k & p for k, p in zip(keep, passed)]
        metrics.update(_masked_fractions(passed, f"rollout_rs_{name}_"))
    metrics.update(_masked_fractions(keep, "rollout_rs_"))
    return keep, metrics


def _masked_fractions(kept: list[np.ndarray], prefix: str) -> dict[str, float]:
    """Share of tokens not kept, and share of responses with any token not kept."""
    tokens = np.concatenate(kept) if kept else np.zeros(0, bool)
    return {
        f"{prefix}masked_fraction": float(np.mean(~tokens)) if tokens.size else 0.0,
        f"{prefix}seq_masked_fraction": float(np.mean([not k.all() for k in kept])) if kept else 0.0,
    }


def _offpolicy_metrics(log_ratios, old_logp, engine_logp) -> dict[str, float]:
    """verl's off-policy diagnostics of the engine against the old policy: kl, k3_kl, chi2_token, chi2_seq, the
    perplexities and their log difference (sequences with tokens only)."""
    used = [i for i, r in enumerate(log_ratios) if len(r)]
    if not used:
        return {}
    ratios = np.concatenate([log_ratios[i] for i in used])
    old_means = np.array([np.mean(old_logp[i]) for i in used], np.float64)
    engine_means = np.array([np.mean(engine_logp[i]) for i in used], np.float64)
    log_ppl_diff = engine_means - old_means
    sums = np.clip([log_ratios[i].sum() for i in used], -SAFETY_BOUND, SAFETY_BOUND)
    return {
        "kl": np.mean(-ratios),
        "k3_kl": np.mean(np.exp(ratios) - ratios - 1.0),
        "training_ppl": np.mean(np.exp(-old_means)),
        "training_log_ppl": np.mean(-old_means),
        "rollout_ppl": np.mean(np.exp(-engine_means)),
        "rollout_log_ppl": np.mean(-engine_means),
        "log_ppl_diff": np.mean(log_ppl_diff),
        "log_ppl_abs_diff": np.mean(np.abs(log_ppl_diff)),
        "ppl_ratio": np.mean(np.exp(log_ppl_diff)),
        "chi2_token": np.mean(np.exp(np.clip(ratios, -SAFETY_BOUND, SAFETY_BOUND)) ** 2) - 1.0,
        "chi2_seq": np.mean(np.exp(2.0 * sums)) - 1.0,
    }
