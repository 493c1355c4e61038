"""Sample, verify, and give failed samples their one fix attempt (SPEC 7/8); `validate` is the trainer's validation
(SPEC 9 metric names), the command line reuses its pieces for a resumable run."""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence

from kimina_jax.config import ErrorFixConfig
from kimina_jax.data import PromptRenderer, build_fix_prompts
from kimina_jax.eval.metrics import Outcome, summarize, turn_values, val_metric_names
from kimina_jax.reward import PendingSample, RewardFunction
from kimina_jax.rollout import RolloutEngine, SamplingParams
from kimina_jax.types import Prompt, Sample

FIX_SEED_OFFSET = 7_919  # fix attempts draw from other seeds than the turn-1 samples of the same call position


def fix_params(params: SamplingParams) -> SamplingParams:
    """One sample per fix prompt, from other seeds than turn 1."""
    seed = None if params.seed is None else params.seed + FIX_SEED_OFFSET
    return dataclasses.replace(params, n=1, seed=seed)


def sample_and_submit(
    engine: RolloutEngine,
    rewarder: RewardFunction,
    prompts: Sequence[Prompt],
    sample_indices: Sequence[Sequence[int]],
    params: SamplingParams,
) -> list[PendingSample]:
    """len(sample_indices[j]) samples of prompts[j], labelled with those indices, sent for verification.

    Prompts wanting the same number of samples share one generate call; verification of a call's samples starts
    while the next call generates. Returned in prompt order, then index order.
    """
    by_count: dict[int, list[int]] = defaultdict(list)
    for j, indices in enumerate(sample_indices):
        if indices:
            by_count[len(indices)].append(j)
    pending: dict[int, list[PendingSample]] = {}
    for count, members in by_count.items():
        groups = engine.generate([prompts[j].token_ids for j in members], dataclasses.replace(params, n=count))
        for j, group in zip(members, groups):
            labelled = [
                dataclasses.replace(c, prompt_index=j, sample_index=i) for c, i in zip(group, sample_indices[j])
            ]
            pending[j] = rewarder.submit(prompts[j], labelled)
    return [p for j in sorted(pending) for p in pending[j]]


def fix_targets(
    samples: Sequence[Sample], renderer: PromptRenderer, max_feedback_chars: int
) -> tuple[list[tuple[int, Prompt]], dict[str, int]]:
    """(position in `samples`, turn-2 prompt) for each sample that gets a fix attempt, and the SPEC 7 counts."""
    targets, counts = [], defaultdict(int)
    for position, sample in enumerate(samples):
        prompts, sample_counts = build_fix_prompts([sample], renderer, max_feedback_chars)
        for name, value in sample_counts.items():
            counts[name] += value
        if prompts:
            targets.append((position, prompts[0]))
    return targets, dict(counts)


def validate(
    engine: RolloutEngine,
    rewarder: RewardFunction,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    renderer: PromptRenderer,
    *,
    error_fix: ErrorFixConfig,
    data_source: str,
    ks: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], list[Sample]]:
    """Validation inside training (SPEC 8/9): `params.n` samples per prompt, then, with `error_fix.enabled`, one fix
    attempt per failed sample whose feedback fits `error_fix.max_feedback_chars` (the recipe's `data.error_fix`, so
    validation fixes what training would). Returns the metrics under verl's names and every sample (turn 1, then
    the fixes; a fix carries its turn-1 sample's indices).

    `val-core/<source>/acc/...` is turn-1 accuracy, with or without the fix turn; `val-aux/<source>/acc_turn_1/...`
    is the same and `val-aux/<source>/acc_turn_2/...` solved within one fix. pass@k for `ks` (default: n),
    unverified counts too.
    """
    n = params.n
    bar = lambda turn: f"validate turn {turn}" if progress else None  # noqa: E731
    turn_1 = rewarder.collect(
        sample_and_submit(engine, rewarder, prompts, [range(n)] * len(prompts), params), bar(1)
    )
    fix_of: dict[int, Sample] = {}
    if error_fix.enabled:
        targets, _ = fix_targets(turn_1, renderer, error_fix.max_feedback_chars)
        if targets:
            indices = [[turn_1[position].completion.sample_index] for position, _ in targets]
            fixes = rewarder.collect(
                sample_and_submit(engine, rewarder, [p for _, p in targets], indices, fix_params(params)), bar(2)
            )
            fix_of = {position: fix for (position, _), fix in zip(targets, fixes)}
    values = {}
    for p in range(len(prompts)):
        pairs = []
        for position in range(p * n, (p + 1) * n):
            fix = fix_of.get(position)
            pairs.append((Outcome.of(turn_1[position]), None if fix is None else Outcome.of(fix)))
        values[p] = turn_values(pairs)
    averaged, _ = summarize(values, n, ks or (n,), error_fix.enabled)
    metrics = val_metric_names(averaged, data_source, n)
    fixes = list(fix_of.values())
    for turn, samples in ((1, turn_1), (2, fixes)):
        unverified = sum(not Outcome.of(s).verified for s in samples)
        metrics[f"val-aux/{data_source}/unverified/turn_{turn}"] = float(unverified)
    if error_fix.enabled:
        metrics[f"val-aux/{data_source}/fix_attempts"] = float(len(fixes))
    return metrics, [*turn_1, *fixes]
