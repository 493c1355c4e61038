"""Format checks of a response (SPEC 6): ten checks in order, the first failure names the error."""
from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Sequence

from kimina_jax.config import FormatConfig
from kimina_jax.reward.extract import LEAN4_BLOCK_RE
from kimina_jax.reward.lean_text import remove_comments


class FormatError(enum.StrEnum):
    """The outcome of the format checks; the values are the metric names (`format_error/turn_k/<value>`)."""

    NONE = "No error."
    NO_LEAN4_BLOCK = "Could not find a valid lean4 code block."
    NO_THINK_BLOCK = "Could not find a valid think block."
    THINK_BLOCK_COUNT = "There must be exactly one think block."
    LEAN4_BLOCK_COUNT = "There must be exactly one lean4 code block."
    REPEATS = "Generation repeats."
    TOO_FEW_TACTICS_BLOCKS = "There must be more than one tactics block."
    TACTICS_TOO_LONG = "Tactic code contains too many lines."
    TACTICS_FENCE = "Tactic block formatting error."
    TACTICS_MISMATCH = "Tactics and Lean4 code do not match."
    NOT_THE_STATEMENT = "Lean 4 code does not start with the formal statement."


# The thresholds are the recipe's `reward.format` section; one dataclass serves the config and the checks.
FormatThresholds = FormatConfig

DEFAULT_THRESHOLDS = FormatThresholds()


# The original recipe's 109 single-word stopwords (SPEC 6 rule 5); its phrases and symbols never equal a `\w+` token.
STOPWORDS = frozenset(
    """
    a again all an and any are as assume at be because been but by choose claim clearly conclude consider corollary
    define definition each either every evidently example exist exists finally first fix for from furthermore get
    given have he hence her his i if iff implies imply in is it its lastly lemma let moreover next no not note notice
    now observe obtain obviously of on one only or otherwise proof proposition qed remark second see set she since so
    such suppose take than that the their then theorem there therefore these they third this those three thus to two
    was we were with wlog yes you your
    """.split()
)

_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_FIRST_LEAN4_RE = re.compile(r"```lean4\s*([\s\S]+?)\s*```")
_TACTICS_BLOCK_RE = re.compile(r"```tactics\n(.*?)\n```", re.DOTALL)
_WORD_RE = re.compile(r"\b\w+\b")


def _significant_lines(think: str, min_tokens: int) -> list[str]:
    """Lower-cased thinking lines (tactics blocks removed) with at least `min_tokens` non-stopword words."""
    lines = []
    for raw in _TACTICS_BLOCK_RE.sub("", think).splitlines():
        line = raw.strip().lower()
        if line and sum(1 for w in _WORD_RE.findall(line) if w not in STOPWORDS) >= min_tokens:
            lines.append(line)
    return lines


def _fenced_tactics_blocks(text: str) -> list[str] | None:
    """Bodies of the ```tactics blocks read line by line, or None when a fence is malformed."""
    lines = text.split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```tactics":
            close = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if close is None:
                return None
            body = "\n".join(lines[i + 1 : close])
            if "```" in body:
                return None
            blocks.append(body)
            i = close
        i += 1
    return blocks


def _code_lines(code: str) -> set[str]:
    """Distinct non-empty lines of `code` with comments removed, stripped."""
    return {line.strip() for line in remove_comments(code).split("\n") if line.strip()}


def _normalized(text: str) -> str:
    """Comments removed, `sorry` deleted, whitespace collapsed."""
    return " ".join(remove_comments(text).replace("sorry", "").split())


def _statement_paragraphs(formal_statement: str) -> list[str]:
    """The statement's normalized paragraphs, except import/set_option/open lines."""
    paragraphs = (_normalized(p) for p in remove_comments(formal_statement).split("\n\n"))
    return [p for p in paragraphs if p and not p.startswith(("import", "set_option", "open"))]


def check_turn(text: str, formal_statement: str, thresholds: FormatThresholds = DEFAULT_THRESHOLDS) -> FormatError:
    """The ten checks of SPEC 6 on one assistant turn."""
    first_lean4 = _FIRST_LEAN4_RE.search(text)
    if not first_lean4 or text[first_lean4.end() :].strip():
        return FormatError.NO_LEAN4_BLOCK
    if "<think>" not in text:
        return FormatError.NO_THINK_BLOCK
    after_think = text[text.index("<think>") :]
    thinks = _THINK_RE.findall(after_think)
    if len(thinks) != 1 or after_think.count("<think>") != 1 or after_think.count("</think>") != 1:
        return FormatError.THINK_BLOCK_COUNT
    lean4_blocks = LEAN4_BLOCK_RE.findall(after_think)
    if len(lean4_blocks) != 1:
        return FormatError.LEAN4_BLOCK_COUNT
    lean4 = lean4_blocks[0]

    line_counts = Counter(_significant_lines(thinks[0], thresholds.repeat_min_tokens))
    if any(count >= thresholds.repeat_max_count for count in line_counts.values()):
        return FormatError.REPEATS

    regex_tactics = _TACTICS_BLOCK_RE.findall(after_think)
    if len(regex_tactics) < thresholds.min_tactics_blocks:
        return FormatError.TOO_FEW_TACTICS_BLOCKS
    lean4_lines = len(lean4.strip().split("\n"))
    max_lines = max(thresholds.tactics_lines_floor, int(lean4_lines * thresholds.tactics_lines_ratio))
    if any(len(block.split("\n")) > max_lines for block in regex_tactics):
        return FormatError.TACTICS_TOO_LONG

    fenced = _fenced_tactics_blocks(text)
    if fenced is None:
        return FormatError.TACTICS_FENCE
    final_lines = _code_lines(lean4.strip())
    tactic_lines = set().union(*(_code_lines(block) for block in fenced))
    if not final_lines or len(final_lines & tactic_lines) / len(final_lines) < thresholds.min_coverage:
        return FormatError.TACTICS_MISMATCH

    code = _normalized(lean4.strip())
    if any(word in code for word in thresholds.forbidden_words):
        return FormatError.NOT_THE_STATEMENT
    if not all(paragraph in code for paragraph in _statement_paragraphs(formal_statement)):
        return FormatError.NOT_THE_STATEMENT
    return FormatError.NONE


def check_format(
    messages: Sequence[dict], formal_statement: str, thresholds: FormatThresholds = DEFAULT_THRESHOLDS
) -> FormatError:
    """Check every assistant turn of `messages` in order (a bad turn 1 fails its turn-2 samples too).

    `messages` is the conversation including the response being scored as its last assistant message.
    """
    turns = [m["content"] for m in messages if m["role"] == "assistant"]
    if not turns:
        raise ValueError("check_format needs at least one assistant message (the response)")
    for text in turns:
        error = check_turn(text, formal_statement, thresholds)
        if error is not FormatError.NONE:
            return error
    return FormatError.NONE
