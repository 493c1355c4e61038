"""Proof extraction (SPEC 6): which block is used, what is sent to Lean."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimina_jax.reward import extract_proof
from kimina_jax.reward.extract import normalize_statement, theorem_signature

HEADER = "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 400000\n\n"
STATEMENT = HEADER + "theorem t (n : ℕ) (h : 0 < n) : n + 0 = n := by sorry"
SIGNATURE = "theorem t (n : ℕ) (h : 0 < n) : n + 0 = n"
NORMALIZED = HEADER + "theorem t (n : ℕ) (h : 0 < n) : n + 0 = n := by"


def block(body: str) -> str:
    return f"```lean4\n{body}\n```"


def test_code_is_the_normalized_statement_plus_the_proof() -> None:
    response = "<think>...</think>\n" + block(f"{SIGNATURE} := by\n  simp")
    assert extract_proof(response, STATEMENT) == NORMALIZED + "\n  simp"


def test_last_matching_block_wins() -> None:
    response = "\n".join([
        block(f"{SIGNATURE} := by\n  omega"),
        block(f"{SIGNATURE} := by\n  simp"),
        block("example : True := by trivial"),  # last block, but without the signature
    ])
    assert extract_proof(response, STATEMENT) == NORMALIZED + "\n  simp"


def test_signature_inside_a_comment_is_skipped() -> None:
    commented_line = block(f"-- {SIGNATURE} := by\n--   linarith")
    commented_block = block(f"/- {SIGNATURE} := by\n  nlinarith -/")
    earlier = block(f"{SIGNATURE} := by\n  simp")
    assert extract_proof("\n".join([earlier, commented_line, commented_block]), STATEMENT) == NORMALIZED + "\n  simp"
    assert extract_proof(commented_line, STATEMENT) is None
    # a comment mentioning the theorem before the real declaration in the same block
    mixed = block(f"-- plan for {SIGNATURE}\n{SIGNATURE} := by\n  simp")
    assert extract_proof(mixed, STATEMENT) == NORMALIZED + "\n  simp"


@pytest.mark.parametrize("written", [
    "theorem t (n : ℕ) (h : 0 < n) :  n + 0 = n",
    "theorem t (n : ℕ) (h : 0 < n) :\n    n + 0 = n",
    "theorem t (n:ℕ) (h : 0 < n) : n + 0 = n",
])
def test_signature_match_is_whitespace_sensitive(written: str) -> None:
    assert extract_proof(block(f"{written} := by\n  simp"), STATEMENT) is None


def test_lemmas_after_the_theorem_are_kept_and_before_it_dropped() -> None:
    before = "lemma helper (n : ℕ) : n = n := by rfl\n\n"
    after = "\n\nlemma unused : True := by trivial"
    response = block(f"import Mathlib\n\n{before}{SIGNATURE} := by\n  simp{after}")
    assert extract_proof(response, STATEMENT) == NORMALIZED + "\n  simp" + after


def test_no_block_or_no_proof_gives_none() -> None:
    assert extract_proof("I could not find a proof.", STATEMENT) is None
    assert extract_proof(f"```lean\n{SIGNATURE} := by\n  simp\n```", STATEMENT) is None  # not lean4
    assert extract_proof(block(f"{SIGNATURE} := rfl"), STATEMENT) is None  # no `:= by` after the signature


def test_proof_may_start_on_the_same_line_and_by_may_be_on_the_next() -> None:
    assert extract_proof(block(f"{SIGNATURE} := by simp"), STATEMENT) == NORMALIZED + " simp"
    assert extract_proof(block(f"{SIGNATURE} :=\n  by\n  simp"), STATEMENT) == NORMALIZED + "\n  simp"


@pytest.mark.parametrize("statement, normalized", [
    ("theorem a : 1 = 1 := by sorry", "theorem a : 1 = 1 := by"),
    ("theorem a : 1 = 1 := by\n  sorry  \n", "theorem a : 1 = 1 := by"),
    ("theorem a : 1 = 1 :=", "theorem a : 1 = 1 := by"),
    ("theorem a : 1 = 1 := sorry", "theorem a : 1 = 1 := by"),
    ("theorem a : 1 = 1 := by", "theorem a : 1 = 1 := by"),
])
def test_statement_normalization(statement: str, normalized: str) -> None:
    assert normalize_statement(statement) == normalized


@pytest.mark.parametrize("statement, signature", [
    ("theorem foo (x : ℝ) : x = x := by sorry", "foo (x : ℝ) : x = x"),
    ("lemma bar : True := by", "bar : True"),
    ("example : 2 = 2 := by", ": 2 = 2"),
    ("/-- this theorem is easy -/\ntheorem foo : True := by", "foo : True"),
    ("lemma my_theorem_1 : True := by", "my_theorem_1 : True"),
    ("def f := 1", None),
])
def test_signature(statement: str, signature: str | None) -> None:
    assert theorem_signature(statement) == signature


def test_minif2f_statements_are_found_in_their_own_proofs() -> None:
    """Every recorded miniF2F proof contains its statement's signature, so extraction gives back a code."""
    path = Path(__file__).parent / "fixtures/lean_verdicts_sample.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    proofs = [r for r in records if r["id"].startswith("rl-lean")]
    assert proofs
    for record in proofs:
        code = record["code"]
        statement = code[: code.index(":= by") + len(":= by")] + " sorry"
        extracted = extract_proof(f"<think>x</think>\n{block(code)}", statement)
        assert extracted == code
