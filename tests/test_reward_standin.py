"""The local stand-in verifier (NOT Lean): its stated rules, its recorded answers, and scoring on top of it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from kimina_jax.errors import KiminaError
from kimina_jax.reward import FormatError, StandinVerifier, Verdict, score
from kimina_jax.reward.lean_text import split_header
from kimina_jax.reward.standin_verifier import load_recorded
from tests.lean_harness.server import recorded_verdict_files

FIXTURE = Path(__file__).parent / "fixtures/lean_verdicts_sample.jsonl"
EXPECTED_STATUS = {"pass": "valid", "fail": "lean_error", "sorry": "sorry", "timeout": "timeout"}


def records(path: Path = FIXTURE) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("code, status", [
    ("theorem a : True := by trivial", "valid"),
    ("import Mathlib\nimport Aesop", "valid"),
    ("theorem a : True := by sorry", "sorry"),
    ("theorem a : True := by\n  admit", "sorry"),
    ("theorem a : True := by\n  trivial -- no sorry needed", "valid"),
    ("theorem a : True := by\n  /- sorry -/ trivial", "valid"),
    ("theorem a : (1 = 1 := by rfl", "lean_error"),
    ("theorem a : 1 = 1) := by rfl", "lean_error"),
    ("theorem a : True := by\n  -- todo\n", "lean_error"),
    ("theorem a : True := by", "lean_error"),
    ("theorem a : True := by (sorry", "lean_error"),
])
def test_rules(code: str, status: str) -> None:
    assert StandinVerifier().verdict(code).status == status


def test_rule_positions_count_from_the_body() -> None:
    code = "import Mathlib\n\ntheorem a : True := by\n  exact (sorry"
    verdict = StandinVerifier().verdict(code)
    assert verdict.line_offset == 2
    error = next(m for m in verdict.messages if m["severity"] == "error")
    assert error["pos"] == {"line": 2, "column": 8}
    assert code.splitlines()[verdict.line_offset + error["pos"]["line"] - 1][error["pos"]["column"]] == "("


def test_warns_that_it_is_not_lean(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        StandinVerifier()
    assert "STAND-IN" in caplog.text and "NOT from Lean" in caplog.text


def test_recorded_codes_get_their_recorded_verdicts() -> None:
    verifier = StandinVerifier([FIXTURE])
    for record in records():
        verdict = verifier.verdict(record["code"])
        assert verdict.status == EXPECTED_STATUS[record["verdict"]], record["id"]
        assert [m["data"] for m in verdict.messages] == [m["data"] for m in record["messages"]]


def _fits(lines: list[str], pos: dict, is_end: bool) -> bool:
    """A start points at a non-blank character (or the end of the text); an end just after one."""
    line, column = lines[pos["line"] - 1], pos["column"]
    if is_end:
        return 0 < column <= len(line) and not line[column - 1].isspace()
    at_end_of_text = pos["line"] == len(lines) and column == len(line)
    return at_end_of_text or (column < len(line) and not line[column].isspace())


@pytest.mark.parametrize("path", recorded_verdict_files(), ids=lambda p: p.name)
def test_recorded_positions_land_on_the_text_they_describe(path: Path) -> None:
    """Moving recorded positions into the body puts every one of them on a token of the body's text."""
    answers = load_recorded([path])
    checked = 0
    for record in records(path):
        body = split_header(record["code"])[1]
        lines = body.split("\n")
        answer = answers[body]
        for entry in (answer or {}).get("messages", []) + (answer or {}).get("sorries", []):
            for key, is_end in (("pos", False), ("endPos", True)):
                pos = entry.get(key)
                if pos:
                    assert 1 <= pos["line"] <= len(lines), (record["id"], key, pos)
                    assert _fits(lines, pos, is_end), (record["id"], key, pos)
                    checked += 1
    assert checked > 20


def test_a_malformed_recorded_row_names_its_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "verdicts.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n{\"id\": \"x\"}\n")
    with pytest.raises(KiminaError, match=r"verdicts.jsonl:2"):
        load_recorded([bad])


def test_the_verifier_interface() -> None:
    verifier = StandinVerifier()
    codes = ["theorem a : True := by trivial", "theorem b : True := by sorry"]
    futures = verifier.submit(codes)
    assert [f.result().status for f in futures] == ["valid", "sorry"]
    assert [v.status for v in verifier.check_sync(codes)] == ["valid", "sorry"]
    assert verifier.health()


GOOD = ("<think>\n```tactics\ntheorem a : True := by\n  trivial\n```\nok\n```tactics\n  trivial\n```\n</think>\n"
        "```lean4\ntheorem a : True := by\n  trivial\n```")
PROMPT = [{"role": "user", "content": "Prove it."}]


@pytest.mark.parametrize("response, verdict, expected", [
    (GOOD, Verdict("valid"), (1.0, 1.0, FormatError.NONE)),
    (GOOD, Verdict("lean_error"), (0.0, 0.0, FormatError.NONE)),
    (GOOD, Verdict("sorry"), (0.0, 0.0, FormatError.NONE)),
    (GOOD, None, (0.0, 0.0, FormatError.NONE)),
    (GOOD + "\nDone.", Verdict("valid"), (0.0, 1.0, FormatError.NO_LEAN4_BLOCK)),
    (GOOD, Verdict("unverified", error="connection refused"), (0.0, 0.0, FormatError.NONE)),
])
def test_score_is_acc_times_format(response: str, verdict: Verdict | None, expected: tuple) -> None:
    assert score(response, PROMPT, "theorem a : True := by sorry", verdict) == expected


def test_only_answers_about_the_proof_count_as_verified() -> None:
    assert [Verdict(s).is_verified for s in ("valid", "sorry", "lean_error", "repl_error", "timeout")] == [True] * 5
    assert not Verdict("unverified").is_verified and not Verdict("server_error").is_verified
