"""Error-fix feedback (SPEC 7): exact text, and `>` on the line real Lean reported for recorded failing proofs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kimina_jax.reward import LeanClient, StandinVerifier, Verdict, build_feedback
from tests.lean_harness.server import LeanServer

FIXTURE = Path(__file__).parent / "fixtures/lean_verdicts_sample.jsonl"
FAILING = [r for r in map(json.loads, FIXTURE.read_text().splitlines()) if r["verdict"] == "fail"]


def error(line: int, data: str, column: int = 2) -> dict:
    return {"severity": "error", "pos": {"line": line, "column": column},
            "endPos": {"line": line, "column": column + 4}, "data": data}


def test_exact_text_with_header_split() -> None:
    code = ("import Mathlib\nimport Aesop\n\n"
            "theorem x (a : ℕ) (h : a = 1) : a + a = 2 := by\n  subst h\n  linarith\n  rfl")
    # the server checks the code from `theorem` on: Lean's line 3 is `  linarith`
    verdict = Verdict("lean_error", messages=(error(3, "linarith failed\n"),), line_offset=3)
    assert build_feedback(code, verdict) == (
        "# Error 1:\n"
        "Error message: \nlinarith failed\n\n"
        "Lean 4 code snippet with error:\n```lean4\n"
        "001  | theorem x (a : ℕ) (h : a = 1) : a + a = 2 := by\n"
        "002  |   subst h\n"
        "003 >|   linarith\n"
        "004  |   rfl\n"
        "```\n"
    )


def test_only_errors_count_and_at_most_three() -> None:
    code = "\n".join(f"line {i}" for i in range(1, 11))
    messages = (
        {"severity": "warning", "pos": {"line": 1, "column": 0}, "data": "unused variable"},
        error(2, "first"), error(5, "second"), error(10, "third"), error(7, "fourth"),
        {"severity": "error", "data": "no position"},
    )
    text = build_feedback(code, Verdict("lean_error", messages=messages))
    assert re.findall(r"# Error (\d):", text) == ["1", "2", "3"]
    assert "unused variable" not in text and "fourth" not in text
    assert "001  | line 1\n002 >| line 2\n003  | line 3\n004  | line 4\n```" in text  # clipped at the top
    assert "008  | line 8\n009  | line 9\n010 >| line 10\n```" in text  # clipped at the bottom


def test_an_error_without_position_has_no_snippet() -> None:
    verdict = Verdict("lean_error", messages=({"severity": "error", "data": "bad"},))
    text = build_feedback("theorem x : True := by", verdict)
    assert text == "# Error 1:\nError message: \nbad\n\n"


def test_timeout_gives_a_system_error_and_the_rest_nothing() -> None:
    timeout = Verdict("timeout", error="Lean REPL command timed out in 60.0 seconds")
    assert build_feedback("x", timeout) == (
        "# System Error:\nError message: \nLean REPL command timed out in 60.0 seconds\n\n")
    warning = {"severity": "warning", "pos": {"line": 1, "column": 0}, "data": "declaration uses 'sorry'"}
    sorry = Verdict("sorry", messages=(warning,))
    for verdict in (Verdict("valid"), sorry, Verdict("unverified", error="connection refused"),
                    Verdict("server_error", error="No available REPLs")):
        assert build_feedback("x", verdict) == ""


def expected_marked_lines(record: dict) -> list[str]:
    """The code lines real Lean reported for the first three errors, read from the record itself.

    RL-Lean's checker gave Lean the code without its `import` lines; the REPL test records have no imports.
    """
    lines = record["code"].split("\n")
    imports = 0
    while lines[imports].startswith("import "):
        imports += 1
    return [lines[imports + e["pos"]["line"] - 1] for e in record["errors"][:3]]


def marked_lines(feedback: str) -> list[str]:
    return [line.split(">| ", 1)[1] for line in feedback.split("\n") if re.match(r"\d{3} >\| ", line)]


def check_recorded_feedback(record: dict, verdict: Verdict) -> None:
    feedback = build_feedback(record["code"], verdict)
    assert marked_lines(feedback) == expected_marked_lines(record), record["id"]
    for i, recorded in enumerate(record["errors"][:3], 1):
        assert f"# Error {i}:\nError message: \n{recorded['data'].strip()}\n\n" in feedback


@pytest.mark.parametrize("record", FAILING, ids=[r["id"] for r in FAILING])
def test_recorded_failures_mark_the_reported_line_standin(record: dict) -> None:
    check_recorded_feedback(record, StandinVerifier([FIXTURE]).verdict(record["code"]))


@pytest.mark.lean_server
def test_recorded_failures_mark_the_reported_line_real_server(lean_server: LeanServer) -> None:
    """Through the real server: it splits the header off, the stand-in REPL answers for the body like Lean."""
    with LeanClient(lean_server.url, timeout_s=20) as client:
        verdicts = client.check_sync([r["code"] for r in FAILING])
    for record, verdict in zip(FAILING, verdicts, strict=True):
        assert verdict.status == "lean_error"
        check_recorded_feedback(record, verdict)
