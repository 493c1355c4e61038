"""The error-fix user message of SPEC 7, built from a verdict."""
from __future__ import annotations

from kimina_jax.types import Verdict

MAX_ERRORS = 3
CONTEXT_LINES = 2


def _error_section(index: int, message: dict, lines: list[str]) -> str:
    section = f"# Error {index}:\nError message: \n{str(message.get('data', '')).strip()}\n\n"
    pos = message.get("pos")
    if not pos:
        return section
    error_line = pos["line"] - 1
    snippet = "".join(
        f"{n + 1:03d}{' >' if n == error_line else '  '}| {lines[n]}\n"
        for n in range(max(0, error_line - CONTEXT_LINES), min(len(lines), error_line + CONTEXT_LINES + 1))
    )
    return section + f"Lean 4 code snippet with error:\n```lean4\n{snippet}```\n"


def build_feedback(code: str, verdict: Verdict) -> str:
    """Feedback for a failed proof: its first three Lean errors with the lines around each, else the timeout.

    Lines are those of the text the server checked (`code` without the import header it split off, SPEC 11),
    numbered as Lean numbers them, so an error's `>` marks the line Lean reported. Empty when there is nothing to
    fix: a valid proof, a sorry without errors, or an answer that does not judge the proof.
    """
    lines = code.splitlines()[verdict.line_offset :]
    errors = [m for m in verdict.messages if m.get("severity") == "error"][:MAX_ERRORS]
    if errors:
        return "".join(_error_section(i, m, lines) for i, m in enumerate(errors, 1))
    if verdict.status == "timeout" and verdict.error and verdict.error.strip():
        return f"# System Error:\nError message: \n{verdict.error.strip()}\n\n"
    return ""
