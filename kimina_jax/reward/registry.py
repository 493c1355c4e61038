"""`reward.function` -> the `RewardFunction` that scores training and validation samples: a registered reward by
name (the built-in format x Lean reward is `lean`, the default), else a user's function ("module:name")."""
from __future__ import annotations

from collections.abc import Callable

from kimina_jax.config import RewardConfig, VerifierConfig
from kimina_jax.errors import KiminaError
from kimina_jax.reward.base import RewardFunction
from kimina_jax.reward.rewarder import Rewarder
from kimina_jax.reward.user import UserReward, load_user_function

DEFAULT_REWARD = "lean"
REWARDS: dict[str, Callable[[RewardConfig, VerifierConfig], RewardFunction]] = {
    "lean": lambda reward, verifier: Rewarder.from_config(verifier, reward.format),
}


def reward_from_config(reward: RewardConfig, verifier: VerifierConfig) -> RewardFunction:
    """The recipe's reward function; only the `lean` reward starts a verifier (so only it needs a Lean server)."""
    name = reward.function or DEFAULT_REWARD
    if name in REWARDS:
        return REWARDS[name](reward, verifier)
    if ":" not in name:
        raise KiminaError(
            f"reward.function {name!r} is no registered reward ({', '.join(sorted(REWARDS))}); a user's function "
            "is named 'package.module:name' or 'path/to/file.py:name'"
        )
    return UserReward(load_user_function(name), name, reward.batch)
