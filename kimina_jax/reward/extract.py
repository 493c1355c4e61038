"""Proof extraction (SPEC 6): which Lean code a response sends to the verifier."""
from __future__ import annotations

import re

from kimina_jax.reward.lean_text import comment_spans

LEAN4_BLOCK_RE = re.compile(r"```lean4\n(.*?)\n```", re.DOTALL)
_KEYWORD_RES = [re.compile(rf"\b{keyword}\b") for keyword in ("theorem", "lemma", "example")]
_UNTIL_ASSIGN_RE = re.compile(r"\s*(.*?)\s*:=", re.DOTALL)
_PROOF_START_RE = re.compile(r":=\s*by")


def normalize_statement(formal_statement: str) -> str:
    """Strip trailing space, drop a trailing `sorry`, make the statement end in `by`."""
    statement = formal_statement.rstrip()
    if statement.endswith("sorry"):
        statement = statement[: -len("sorry")].rstrip()
    if not statement.endswith("by"):
        statement += " by"
    return statement


def theorem_signature(statement: str) -> str | None:
    """The text between the first `theorem` (else `lemma`, else `example`) and the next `:=`, stripped.

    Keywords are whole words outside comments (a docstring that mentions "theorem" is not the declaration).
    """
    spans = comment_spans(statement)
    for keyword in _KEYWORD_RES:
        for found in keyword.finditer(statement):
            if not any(lo <= found.start() < hi for lo, hi in spans):
                signature = _UNTIL_ASSIGN_RE.match(statement, found.end())
                return signature.group(1) if signature else None
    return None


def _uncommented_find(text: str, needle: str) -> int:
    """Index of the first occurrence of `needle` in `text` that does not start inside a comment, else -1."""
    spans = comment_spans(text)
    start = text.find(needle)
    while start != -1:
        if not any(lo <= start < hi for lo, hi in spans):
            return start
        start = text.find(needle, start + 1)
    return -1


def extract_proof(response: str, formal_statement: str) -> str | None:
    """Lean code to verify: normalized statement (header included) + the proof from the response, or None.

    The proof is taken from the last ```lean4 block that contains the statement's signature verbatim outside a
    comment: everything after the first `:= by` that follows the signature. Lemmas written before the theorem in
    that block are dropped (the dataset statement replaces them); lemmas after it are kept.
    """
    statement = normalize_statement(formal_statement)
    signature = theorem_signature(statement)
    if signature is None:
        return None
    for block in reversed(LEAN4_BLOCK_RE.findall(response)):
        at = _uncommented_find(block, signature)
        if at == -1:
            continue
        proof_start = _PROOF_START_RE.search(block, at)
        if proof_start:
            return statement + block[proof_start.end() :]
    return None
