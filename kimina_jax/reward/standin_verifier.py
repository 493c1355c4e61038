"""A LOCAL STAND-IN for the Lean verifier. It is NOT Lean: its verdicts come from a few stated text rules.

Used by the tiny CPU recipe when no Lean server URL is set, and (through the test harness's stand-in REPL, which
imports `standin_answer`) behind the real Kimina Lean Server in tests. Never used by the real recipes.

The answer for a text (what Lean would be given, i.e. the snippet without its import header):
1. Recorded: a text whose code is in a recorded-verdicts file (`lean_verdicts.jsonl` layout) gets the recorded
   real Lean messages and sorries, line numbers moved to count from the text given; a recorded timeout answers
   "times out".
2. Otherwise, by rules, every rule that applies adds its messages:
   - `sorry` / `admit` outside comments: a sorry at each, and the warning "declaration uses 'sorry'";
   - an unbalanced `(`, `[`, `{` or `⟨` outside comments: an error at the first offending bracket;
   - a `:= by` followed by nothing but blanks and comments: an "unsolved goals" error at the `by`;
   - nothing else applies: no messages (valid).
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from kimina_jax.errors import KiminaError
from kimina_jax.reward.base import Verifier
from kimina_jax.reward.lean_client import verdict_from_result
from kimina_jax.reward.lean_text import comment_spans, remove_comments, split_header
from kimina_jax.types import Verdict

logger = logging.getLogger(__name__)

# Where line 1 of a record's positions lies in its code, by record id prefix (found by checking that every
# recorded position points at text that fits it): the Kimina server's body (after import and blank lines), the
# code after its `import` lines only (RL-Lean's vendored server), or the whole code (plain REPL runs).
RECORDED_LINE_FRAMES = {"kls-match-": "body", "rl-lean-": "after_imports", "repl-": "code"}
TIMES_OUT = None  # the answer for a text on which recorded Lean ran out of time

_SORRY_RE = re.compile(r"\b(sorry|admit)\b")
_DECLARATION_RE = re.compile(r"\b(theorem|lemma|example|def)\b")
_BY_RE = re.compile(r"\bby\b")
_CLOSING = {")": "(", "]": "[", "}": "{", "⟩": "⟨"}


def _frame_start(record: dict) -> int:
    """How many lines of `record["code"].splitlines()` come before the recorded line 1."""
    frame = next((f for prefix, f in RECORDED_LINE_FRAMES.items() if record["id"].startswith(prefix)), "body")
    lines = record["code"].splitlines()
    if frame == "after_imports":
        return next((i for i, line in enumerate(lines) if not line.startswith("import ")), len(lines))
    return split_header(record["code"])[2] if frame == "body" else 0


def _shift(entries: Sequence[dict], lines: int) -> list[dict]:
    shifted = []
    for entry in entries:
        entry = dict(entry)
        for key in ("pos", "endPos"):
            if entry.get(key):
                entry[key] = {**entry[key], "line": entry[key]["line"] + lines}
        shifted.append(entry)
    return shifted


def load_recorded(paths: Iterable[str | Path]) -> dict[str, dict | None]:
    """Recorded answers by the text Lean is given (the code's body): a REPL response, or TIMES_OUT."""
    answers: dict[str, dict | None] = {}
    for path in paths:
        with open(path, encoding="utf-8") as rows:
            for line_no, row in enumerate(rows, 1):
                try:
                    record = json.loads(row)
                    code, verdict = record["code"], record["verdict"]
                    shift = _frame_start(record) - split_header(code)[2]
                    answer = TIMES_OUT if verdict == "timeout" else {
                        "messages": _shift(record["messages"], shift), "sorries": _shift(record["sorries"], shift)}
                except (ValueError, KeyError, TypeError) as exc:
                    raise KiminaError(f"{path}:{line_no}: not a recorded verdict ({exc!r})") from exc
                answers.setdefault(split_header(code)[1], answer)
    return answers


def _position(text: str, index: int) -> dict:
    line_start = text.rfind("\n", 0, index) + 1
    return {"line": text.count("\n", 0, index) + 1, "column": index - line_start}


def _message(text: str, start: int, end: int, severity: str, data: str) -> dict:
    return {"severity": severity, "pos": _position(text, start), "endPos": _position(text, end), "data": data}


def _outside_comments(text: str, pattern: re.Pattern) -> list[re.Match]:
    spans = comment_spans(text)
    return [m for m in pattern.finditer(text) if not any(lo <= m.start() < hi for lo, hi in spans)]


def _unbalanced_bracket(text: str) -> int | None:
    """Index of the first bracket (outside comments) that is never matched, else None."""
    in_comment = [False] * len(text)
    for lo, hi in comment_spans(text):
        in_comment[lo:hi] = [True] * (hi - lo)
    stack: list[tuple[str, int]] = []
    for i, char in enumerate(text):
        if in_comment[i]:
            continue
        if char in "([{⟨":
            stack.append((char, i))
        elif char in _CLOSING:
            if not stack or stack[-1][0] != _CLOSING[char]:
                return i
            stack.pop()
    return stack[0][1] if stack else None


def rule_answer(text: str) -> dict:
    """The stand-in's REPL response for a text no recording knows (module docstring, rule 2)."""
    messages, sorries = [], []
    for found in _outside_comments(text, _SORRY_RE):
        sorries.append({"pos": _position(text, found.start()), "endPos": _position(text, found.end()),
                        "goal": "⊢ (stand-in goal)"})
    if sorries:
        declaration = _outside_comments(text, _DECLARATION_RE)
        at = declaration[0] if declaration else None
        start, end = (at.start(), at.end()) if at else (0, 0)
        messages.append(_message(text, start, end, "warning", "declaration uses 'sorry'"))
    bracket = _unbalanced_bracket(text)
    if bracket is not None:
        messages.append(_message(text, bracket, bracket + 1, "error",
                                 f"unexpected token '{text[bracket]}' (stand-in rule: unbalanced bracket)"))
    by = (_outside_comments(text, _BY_RE) or [None])[-1]
    nothing_after_by = by and not remove_comments(text[by.end() :]).strip()
    if nothing_after_by and remove_comments(text[: by.start()]).rstrip().endswith(":="):
        messages.append(_message(text, by.start(), by.end(), "error", "unsolved goals (stand-in rule: empty proof)"))
    return {"messages": messages, "sorries": sorries}


def standin_answer(text: str, recorded: Mapping[str, dict | None]) -> dict | None:
    """The REPL response for `text` (the snippet's body), or TIMES_OUT."""
    if text in recorded:
        return recorded[text]
    return rule_answer(text)


class StandinVerifier(Verifier):
    """LOCAL STAND-IN verifier (NOT Lean): answers by the rules of this module, with no server.

    recorded_paths: recorded-verdicts jsonl files whose codes get their recorded Lean answers.
    """

    def __init__(self, recorded_paths: Sequence[str | Path] = ()) -> None:
        self._recorded = load_recorded(recorded_paths)
        logger.warning(
            "Using the LOCAL STAND-IN verifier: verdicts come from simple text rules%s, NOT from Lean. "
            "Set LEAN_SERVER_API_URL to verify proofs with the Kimina Lean Server.",
            f" and {len(self._recorded)} recorded answers" if self._recorded else "",
        )

    def verdict(self, code: str) -> Verdict:
        _, body, header_lines = split_header(code)
        answer = standin_answer(body, self._recorded)
        if answer is TIMES_OUT:
            return Verdict("timeout", error="stand-in: recorded Lean run timed out", line_offset=header_lines)
        return verdict_from_result({"response": answer}, header_lines)

    def submit(self, snippets: Iterable[str]) -> list[concurrent.futures.Future[Verdict]]:
        futures = []
        for code in snippets:
            future: concurrent.futures.Future[Verdict] = concurrent.futures.Future()
            future.set_result(self.verdict(code))
            futures.append(future)
        return futures

    def health(self) -> bool:
        return True
