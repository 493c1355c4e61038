"""The built-in reward (registered as `lean`): completions -> scored `Sample`s by format check, proof extraction,
verification, score and error-fix feedback.

Verification starts as soon as a group is submitted (`submit`), so a caller can keep generating while the
verifier works and collect the finished samples later (`collect`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Sequence

from kimina_jax.errors import KiminaError
from kimina_jax.reward.base import PendingSample, RewardFunction, Verifier, wait_all
from kimina_jax.reward.extract import extract_proof
from kimina_jax.reward.feedback import build_feedback
from kimina_jax.reward.format import DEFAULT_THRESHOLDS, FormatThresholds
from kimina_jax.reward.lean_client import LeanClient
from kimina_jax.reward.scoring import score
from kimina_jax.reward.standin_verifier import StandinVerifier
from kimina_jax.types import Completion, Prompt, Sample, Verdict


@dataclasses.dataclass(frozen=True)
class PendingProof(PendingSample):
    """A completion whose proof (if any) is being verified."""

    proof_code: str | None
    verdict: concurrent.futures.Future[Verdict] | None


class Rewarder(RewardFunction):
    """The format x Lean reward, with one verifier (the Lean server client or the local stand-in)."""

    def __init__(self, verifier: Verifier, thresholds: FormatThresholds = DEFAULT_THRESHOLDS):
        self.verifier = verifier
        self.thresholds = thresholds

    @classmethod
    def from_config(cls, verifier_cfg, format_cfg) -> "Rewarder":
        """From the recipe's `verifier` and `reward.format` sections (`kind` already resolved from `auto`)."""
        if verifier_cfg.kind == "standin":
            verifier: Verifier = StandinVerifier()
        elif not verifier_cfg.url:
            raise KiminaError("verifier.kind is 'lean' but no server URL: set LEAN_SERVER_API_URL")
        else:
            verifier = LeanClient(
                verifier_cfg.url, verifier_cfg.api_key, timeout_s=verifier_cfg.timeout_s,
                batch_size=verifier_cfg.batch_size, max_in_flight=verifier_cfg.max_in_flight,
                retries=verifier_cfg.retries, retry_budget_s=verifier_cfg.retry_budget_s,
                backoff_max_s=verifier_cfg.backoff_max_s, message_lines=verifier_cfg.message_lines,
            )
        return cls(verifier, format_cfg)

    def submit(self, prompt: Prompt, completions: Sequence[Completion]) -> list[PendingProof]:
        """Extracts each completion's proof and sends the proofs for verification (non-blocking)."""
        codes = [extract_proof(c.text, prompt.formal_statement) for c in completions]
        futures = iter(self.verifier.submit([code for code in codes if code is not None]))
        return [
            PendingProof(prompt, completion, code, None if code is None else next(futures))
            for completion, code in zip(completions, codes)
        ]

    def collect(self, pending: Sequence[PendingProof], progress: str | None = None) -> list[Sample]:
        """Waits for the verdicts and scores every sample, in order."""
        wait_all((p.verdict for p in pending if p.verdict is not None), progress, unit="proof")
        return [self._scored(p, None if p.verdict is None else p.verdict.result()) for p in pending]

    def stats(self) -> dict[str, float]:
        return self.verifier.stats()

    def close(self) -> None:
        self.verifier.close()

    def _scored(self, pending: PendingProof, verdict: Verdict | None) -> Sample:
        reward, acc, format_error = score(
            pending.completion.text, pending.prompt.messages, pending.prompt.formal_statement, verdict,
            self.thresholds,
        )
        feedback = ""
        if verdict is not None and verdict.is_verified and not verdict.is_valid:
            feedback = build_feedback(pending.proof_code, verdict)
        return Sample(
            prompt=pending.prompt,
            completion=pending.completion,
            verdict=verdict,
            score=reward,
            acc=acc,
            format_error=str(format_error),
            proof_code=pending.proof_code,
            feedback=feedback,
        )
