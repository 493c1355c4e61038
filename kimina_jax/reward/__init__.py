"""Rewards: the reward-function interface (the built-in format x Lean reward or a user's function), format checks,
proof extraction, Lean verification (server client or local stand-in), error-fix feedback."""
from kimina_jax.reward.base import PendingSample, RewardFunction, RewardInput, Verifier, extra_means
from kimina_jax.reward.extract import extract_proof
from kimina_jax.reward.feedback import build_feedback
from kimina_jax.reward.format import FormatError, FormatThresholds, check_format
from kimina_jax.reward.lean_client import LeanClient
from kimina_jax.reward.registry import REWARDS, reward_from_config
from kimina_jax.reward.rewarder import Rewarder
from kimina_jax.reward.scoring import score
from kimina_jax.reward.standin_verifier import StandinVerifier
from kimina_jax.reward.user import UserReward
from kimina_jax.types import Verdict

__all__ = [
    "REWARDS",
    "FormatError",
    "FormatThresholds",
    "LeanClient",
    "PendingSample",
    "RewardFunction",
    "RewardInput",
    "Rewarder",
    "StandinVerifier",
    "UserReward",
    "Verdict",
    "Verifier",
    "build_feedback",
    "check_format",
    "extra_means",
    "extract_proof",
    "reward_from_config",
    "score",
]
