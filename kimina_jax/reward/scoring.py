"""The reward of one response (SPEC 6): score = acc x format_ok."""
from __future__ import annotations

from collections.abc import Sequence

from kimina_jax.reward.format import DEFAULT_THRESHOLDS, FormatError, FormatThresholds, check_format
from kimina_jax.types import Verdict


def score(
    response: str,
    messages: Sequence[dict],
    formal_statement: str,
    verdict: Verdict | None,
    thresholds: FormatThresholds = DEFAULT_THRESHOLDS,
) -> tuple[float, float, FormatError]:
    """(score, acc, format_error) for `response` to the prompt `messages`.

    verdict: the verifier's answer for the extracted proof, None when no proof was extracted (acc 0). acc is 1 only
    for a `valid` verdict. A verdict that does not judge the proof (`not verdict.is_verified`) also gives 0 here:
    the trainer must leave such samples out of the loss and of accuracy instead of using these numbers.
    """
    format_error = check_format([*messages, {"role": "assistant", "content": response}], formal_statement, thresholds)
    acc = 1.0 if verdict is not None and verdict.is_valid else 0.0
    return acc * (format_error is FormatError.NONE), acc, format_error
