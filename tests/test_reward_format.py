"""Format checks (SPEC 6): each of the ten errors, a passing response, turn-2 conversations, thresholds."""
from __future__ import annotations

import pytest

from kimina_jax.reward import FormatError, FormatThresholds, check_format
from kimina_jax.reward.format import STOPWORDS

STATEMENT = "import Mathlib\n\nopen Nat\n\ntheorem t (n : ℕ) : n + 0 = n := by sorry"
THEOREM = "theorem t (n : ℕ) : n + 0 = n := by"
LEAN4 = f"```lean4\n{THEOREM}\n  simp\n```"
SIGNIFICANT = "The goal asks whether adding zero to any natural number leaves that number unchanged in Lean"


def response(think: str | None = None, tail: str = LEAN4, head: str = "") -> str:
    """A response that passes every check unless a part is replaced."""
    if think is None:
        think = (f"First attempt:\n```tactics\n{THEOREM}\n  simp\n```\n"
                 "Simp should close it; check the last step again.\n```tactics\n  simp\n```\n")
    return f"{head}<think>\n{think}</think>\nThe proof:\n{tail}"


def two_tactics(first: str = f"{THEOREM}\n  simp", second: str = "  simp", extra: str = "") -> str:
    return f"{extra}```tactics\n{first}\n```\nthen\n```tactics\n{second}\n```\n"


CASES = [
    ("passes", response(), FormatError.NONE),
    ("no lean4 block", response(tail="theorem t (n : ℕ) : n + 0 = n := by simp"), FormatError.NO_LEAN4_BLOCK),
    ("text after the lean4 block", response() + "\nHope this helps!", FormatError.NO_LEAN4_BLOCK),
    ("unterminated lean4 block", response(tail=f"```lean4\n{THEOREM}\n  simp\n"), FormatError.NO_LEAN4_BLOCK),
    ("no think tag", response().replace("<think>", ""), FormatError.NO_THINK_BLOCK),
    ("think never closed", response().replace("</think>", ""), FormatError.THINK_BLOCK_COUNT),
    ("two think blocks", response(head="<think>\nplan\n</think>\n"), FormatError.THINK_BLOCK_COUNT),
    ("second opening think tag", response(think="<think>" + two_tactics()), FormatError.THINK_BLOCK_COUNT),
    ("lean4 block on one line", response(tail=f"```lean4 {THEOREM} simp```"), FormatError.LEAN4_BLOCK_COUNT),
    ("significant line 6 times", response(think=f"{SIGNIFICANT}\n" * 6 + two_tactics()), FormatError.REPEATS),
    ("one tactics block", response(think=f"```tactics\n{THEOREM}\n  simp\n```\n"), FormatError.TOO_FEW_TACTICS_BLOCKS),
    ("tactics block of 6 lines", response(think=two_tactics(second="\n".join(["  simp"] * 6))),
     FormatError.TACTICS_TOO_LONG),
    ("tactics fence never closed", response(think=two_tactics() + "```tactics\n  simp\n"), FormatError.TACTICS_FENCE),
    ("tactics differ from the proof", response(think=two_tactics("intro h", "exact h")), FormatError.TACTICS_MISMATCH),
    ("statement changed", response(think=two_tactics("theorem t (n : ℕ) : n = n + 0 := by", "  simp"),
                                   tail="```lean4\ntheorem t (n : ℕ) : n = n + 0 := by\n  simp\n```"),
     FormatError.NOT_THE_STATEMENT),
    ("axiom in the code", response(think=two_tactics(f"axiom cheat : False\n{THEOREM}", "  simp"),
                                   tail=f"```lean4\naxiom cheat : False\n{THEOREM}\n  simp\n```"),
     FormatError.NOT_THE_STATEMENT),
    ("local_instance in the code", response(think=two_tactics(f"{THEOREM}\n  simp [local_instance]", "  simp"),
                                            tail=f"```lean4\n{THEOREM}\n  simp [local_instance]\n```"),
     FormatError.NOT_THE_STATEMENT),
]


@pytest.mark.parametrize("text, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_check_names_its_error(text: str, expected: FormatError) -> None:
    assert check_format([{"role": "assistant", "content": text}], STATEMENT) is expected


def test_every_error_has_a_case_and_the_exact_metric_name() -> None:
    assert {c[2] for c in CASES} == set(FormatError)
    assert [e.value for e in FormatError] == [
        "No error.",
        "Could not find a valid lean4 code block.",
        "Could not find a valid think block.",
        "There must be exactly one think block.",
        "There must be exactly one lean4 code block.",
        "Generation repeats.",
        "There must be more than one tactics block.",
        "Tactic code contains too many lines.",
        "Tactic block formatting error.",
        "Tactics and Lean4 code do not match.",
        "Lean 4 code does not start with the formal statement.",
    ]


@pytest.mark.parametrize("think", [
    f"{SIGNIFICANT}\n" * 5 + two_tactics(),
    "Try simp on it now.\n" * 8 + two_tactics(),
    two_tactics(f"{THEOREM}\n" + f"{SIGNIFICANT}\n" * 3, "  simp\n" + f"{SIGNIFICANT}\n" * 3),
], ids=["5 times is allowed", "short lines are not significant", "lines inside tactics blocks do not count"])
def test_repetition_boundaries(think: str) -> None:
    assert check_format([{"role": "assistant", "content": response(think=think)}], STATEMENT) is FormatError.NONE


def test_repetition_counts_lines_case_insensitively() -> None:
    think = f"{SIGNIFICANT}\n" * 3 + f"{SIGNIFICANT.upper()}\n" * 3 + two_tactics()
    assert check_format([{"role": "assistant", "content": response(think=think)}], STATEMENT) is FormatError.REPEATS


def test_stopwords_are_exactly_the_original_recipes_109_words() -> None:
    spec_list = """a, again, all, an, and, any, are, as, assume, at, be, because, been, but, by, choose, claim,
    clearly, conclude, consider, corollary, define, definition, each, either, every, evidently, example, exist,
    exists, finally, first, fix, for, from, furthermore, get, given, have, he, hence, her, his, i, if, iff,
    implies, imply, in, is, it, its, lastly, lemma, let, moreover, next, no, not, note, notice, now, observe,
    obtain, obviously, of, on, one, only, or, otherwise, proof, proposition, qed, remark, second, see, set, she,
    since, so, such, suppose, take, than, that, the, their, then, theorem, there, therefore, these, they, third,
    this, those, three, thus, to, two, was, we, were, with, wlog, yes, you, your"""  # SPEC 6 rule 5
    expected = {word.strip() for word in spec_list.split(",")}
    assert len(expected) == 109
    assert STOPWORDS == expected


# Word tokens (`\b\w+\b` of the lower-cased line), stopwords marked *:
# 1. we* should also check which values make both sides equal here: 10 others -> significant.
#    (Our old list also stopped should, also, which, both, here: 5 left, not significant.)
# 2. lastly* wlog* the* corollary* proposition* exists* otherwise* simp rewrites x_1 0 into x_1 by* nat add zero:
#    9 others (x_1 is one token, `+` none) -> not significant. (The old list stopped only the, into, by: 14 left.)
@pytest.mark.parametrize("line, expected", [
    ("We should also check which values make both sides equal here", FormatError.REPEATS),
    ("Lastly wlog the corollary proposition exists otherwise simp rewrites x_1 + 0 into x_1 by nat add zero",
     FormatError.NONE),
], ids=["10 tokens without the original's stopwords", "9 tokens without the original's stopwords"])
def test_repetition_threshold_counts_the_original_stopwords(line: str, expected: FormatError) -> None:
    think = f"{line}\n" * 6 + two_tactics()
    assert check_format([{"role": "assistant", "content": response(think=think)}], STATEMENT) is expected


def test_coverage_threshold_is_seventy_percent_of_distinct_lines() -> None:
    steps = [f"  have h{i} : {i} = {i} := rfl" for i in range(9)] + ["  simp"]
    final = "\n".join([THEOREM, *steps])  # 11 distinct lines
    tail = f"```lean4\n{final}\n```"

    def with_covered(k: int) -> str:
        covered = [THEOREM, *steps][:k]
        return response(think=two_tactics("\n".join(covered[:5]), "\n".join(covered[5:]) or "  skip"), tail=tail)

    assert check_format([{"role": "assistant", "content": with_covered(8)}], STATEMENT) is FormatError.NONE  # 8/11
    assert check_format([{"role": "assistant", "content": with_covered(7)}], STATEMENT) is FormatError.TACTICS_MISMATCH


def test_tactics_line_limit_grows_with_the_final_code() -> None:
    steps = [f"  have h{i} : {i} = {i} := rfl" for i in range(9)] + ["  simp"]
    final = "\n".join([THEOREM, *steps])  # 11 lines: limit max(5, floor(10.45)) = 10
    ten, eleven = "\n".join([THEOREM, *steps[:9]]), "\n".join([THEOREM, *steps])
    tail = f"```lean4\n{final}\n```"
    ok = response(think=two_tactics(ten, "  simp"), tail=tail)
    too_long = response(think=two_tactics(eleven, "  simp"), tail=tail)
    assert check_format([{"role": "assistant", "content": ok}], STATEMENT) is FormatError.NONE
    assert check_format([{"role": "assistant", "content": too_long}], STATEMENT) is FormatError.TACTICS_TOO_LONG


def test_comments_and_sorry_do_not_hide_the_statement() -> None:
    tail = f"```lean4\n-- my proof\n{THEOREM} -- the goal\n  simp\n```"
    assert check_format([{"role": "assistant", "content": response(tail=tail)}], STATEMENT) is FormatError.NONE


def test_thresholds_are_configurable() -> None:
    one_block = response(think=f"```tactics\n{THEOREM}\n  simp\n```\n")
    repeats = response(think=f"{SIGNIFICANT}\n" * 6 + two_tactics())
    assert check_format([{"role": "assistant", "content": one_block}], STATEMENT,
                        FormatThresholds(min_tactics_blocks=1)) is FormatError.NONE
    assert check_format([{"role": "assistant", "content": repeats}], STATEMENT,
                        FormatThresholds(repeat_max_count=7)) is FormatError.NONE


def conversation(turn1: str, turn2: str) -> list[dict]:
    return [
        {"role": "system", "content": "You are an expert in mathematics and proving theorems in Lean 4."},
        {"role": "user", "content": "Think about and solve the following problems step by step in Lean 4."},
        {"role": "assistant", "content": turn1},
        {"role": "user", "content": "# Error 1:\nError message: \nlinarith failed\n\n"},
        {"role": "assistant", "content": turn2},
    ]


@pytest.mark.parametrize("turn1, turn2, expected", [
    (response(), response(), FormatError.NONE),
    (response(think=f"```tactics\n{THEOREM}\n  simp\n```\n"), response(), FormatError.TOO_FEW_TACTICS_BLOCKS),
    (response() + "\ntrailing words", response(), FormatError.NO_LEAN4_BLOCK),
    (response(), response().replace("<think>", ""), FormatError.NO_THINK_BLOCK),
], ids=["both good", "turn 1 one tactics block", "turn 1 text after code", "turn 2 bad"])
def test_turn_two_checks_the_earlier_turn_too(turn1: str, turn2: str, expected: FormatError) -> None:
    assert check_format(conversation(turn1, turn2), STATEMENT) is expected
