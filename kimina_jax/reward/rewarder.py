"""Completions -> scored `Sample`s: format check, proof extraction, verification, score and feedback.

Verification starts as soon as a group is submitted (`submit`), so a caller can keep generating while the
verifier works and collect the finished samples later (`collect`).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
from collections.abc import Sequence

from tqdm import tqdm

from kimina_jax.reward.extract import extract_proof
from kimina_jax.reward.feedback import build_feedback
from kimina_jax.reward.format import DEFAULT_THRESHOLDS, FormatThresholds
from kimina_jax.errors import KiminaError
from kimina_jax.reward.base import Verifier
from kimina_jax.reward.lean_client import LeanClient
from kimina_jax.reward.standin_verifier import StandinVerifier
from kimina_jax.reward.scoring import score
from kimina_jax.types import Completion, Prompt, Sample, Verdict


@dataclasses.dataclass(frozen=True)
class PendingSample:
    """A completion whose proof (if any) is being verified."""

    prompt: Prompt
    completion: Completion
    proof_code: str | None
    verdict: concurrent.futures.Future[Verdict] | None


class Rewarder:
    """Scores completions with one verifier (the Lean server client or the local stand-in)."""

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
                retries=verifier_cfg.retries, message_lines=verifier_cfg.message_lines,
            )
        return cls(verifier, format_cfg)

    def submit(self, prompt: Prompt, completions: Sequence[Completion]) -> list[PendingSample]:
        """Extracts each completion's proof and sends the proofs for verification (non-blocking)."""
        codes = [extract_proof(c.text, prompt.formal_statement) for c in completions]
        futures = iter(self.verifier.submit([code for code in codes if code is not None]))
        return [
            PendingSample(prompt, completion, code, None if code is None else next(futures))
            for completion, code in zip(completions, codes)
        ]

    def collect(self, pending: Sequence[PendingSample], progress: str | None = None) -> list[Sample]:
        """Waits for the verdicts and scores every sample, in order; `progress` labels a progress bar."""
        if progress is not None:
            verdicts = [p.verdict for p in pending if p.verdict is not None]
            with tqdm(total=len(verdicts), desc=progress, unit="proof", leave=False) as bar:
                for _ in concurrent.futures.as_completed(verdicts):
                    bar.update()
        return [self._scored(p, None if p.verdict is None else p.verdict.result()) for p in pending]

    def score_groups(self, prompts: Sequence[Prompt], groups: Sequence[Sequence[Completion]]) -> list[Sample]:
        """Scores every group (all verifications in flight together); samples come back flat, in order."""
        pending = [p for prompt, group in zip(prompts, groups) for p in self.submit(prompt, group)]
        return self.collect(pending)

    def _scored(self, pending: PendingSample, verdict: Verdict | None) -> Sample:
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
