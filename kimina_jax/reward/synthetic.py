"""A synthetic task for `configs/learn_demo.yaml` and the learning test: no Lean, a reward that a tiny random
model earns by chance about a quarter of the time, so a working GRPO loop visibly raises it within a minute (and
a sign error anywhere in the loop visibly lowers it)."""
from __future__ import annotations

from kimina_jax.reward.base import RewardInput


def first_token_quarter(item: RewardInput) -> float:
    """1 when the response's first token id is a multiple of 4 (about 1 in 4 for a random model), else 0."""
    return float(bool(item.response_ids) and item.response_ids[0] % 4 == 0)
