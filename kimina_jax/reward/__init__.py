"""Rewards: format checks, proof extraction, Lean verification (server client or local stand-in), error-fix feedback."""
from kimina_jax.reward.base import Verifier
from kimina_jax.reward.extract import extract_proof
from kimina_jax.reward.feedback import build_feedback
from kimina_jax.reward.format import FormatError, FormatThresholds, check_format
from kimina_jax.reward.lean_client import LeanClient
from kimina_jax.reward.rewarder import PendingSample, Rewarder
from kimina_jax.reward.scoring import score
from kimina_jax.reward.standin_verifier import StandinVerifier
from kimina_jax.types import Verdict

__all__ = [
    "FormatError",
    "FormatThresholds",
    "LeanClient",
    "PendingSample",
    "Rewarder",
    "StandinVerifier",
    "Verdict",
    "Verifier",
    "build_feedback",
    "check_format",
    "extract_proof",
    "score",
]
