"""Samples as JSON records: the lines of evaluation's resumable `samples.jsonl` and of training's rollout dumps."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kimina_jax.errors import KiminaError
from kimina_jax.eval.metrics import Outcome
from kimina_jax.types import Completion, Prompt, Sample, Verdict
from kimina_jax.urls import redact_url

log = logging.getLogger("kimina_jax.eval")

Key = tuple[str, int, int]  # (problem, turn, sample index)


def sample_record(sample: Sample) -> dict:
    """A JSON-ready record of one sample (a line of samples.jsonl)."""
    verdict = sample.verdict
    return {
        "problem": sample.prompt.statement_id,
        "turn": sample.prompt.turn,
        "sample_index": sample.completion.sample_index,
        "response": sample.completion.text,
        "response_tokens": len(sample.completion.token_ids),
        "finish_reason": sample.completion.finish_reason,
        "proof": sample.proof_code,
        "verdict": None if verdict is None else verdict.status,
        "verdict_error": None if verdict is None else redact_url(verdict.error),  # a server may echo its URL
        "lean_messages": [] if verdict is None else list(verdict.messages),
        "line_offset": 0 if verdict is None else verdict.line_offset,
        "verify_time_s": 0.0 if verdict is None else verdict.time_s,
        "format_error": sample.format_error,
        "acc": sample.acc,
        "score": sample.score,
        "feedback": sample.feedback,
    }


def restore_sample(record: dict, prompt: Prompt) -> Sample:
    """The `Sample` of a record, for `prompt` (token ids of the response are not stored: left empty)."""
    verdict = None
    if record["verdict"] is not None:
        verdict = Verdict(
            record["verdict"], tuple(record["lean_messages"]), record["verify_time_s"], record["verdict_error"],
            record["line_offset"],
        )
    completion = Completion(
        prompt_index=0, sample_index=record["sample_index"], token_ids=(), text=record["response"],
        logprobs=np.zeros(0, np.float32), finish_reason=record["finish_reason"],
    )
    return Sample(
        prompt, completion, verdict, record["score"], record["acc"], record["format_error"], record["proof"],
        record["feedback"],
    )


def dump_samples(path: Path, samples: Sequence[Sample]) -> None:
    """Every sample as a record, one JSON line each (training's `rollouts/step_<N>.jsonl`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for sample in samples:
            f.write(json.dumps(sample_record(sample), ensure_ascii=False) + "\n")


class SampleStore:
    """The samples of an output folder, by (problem, turn, sample index); new ones are appended as they come.

    A later record of a key replaces an earlier one (a re-verified sample). Only outcomes are held for finished
    samples; full records are kept for those that may need work: unverified ones, and failed turn-1 samples with
    feedback and no verified fix yet (their fix prompt is built from the response).
    """

    def __init__(self, path: Path):
        self.path = path
        self.outcomes: dict[Key, Outcome] = {}
        self.records: dict[Key, dict] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        complete = 0  # bytes of whole lines
        with open(self.path, "rb") as lines:
            for line_no, line in enumerate(lines, 1):
                if not line.endswith(b"\n"):  # a run killed mid-write: its partial last line is dropped below
                    break
                complete += len(line)
                try:
                    self._keep(json.loads(line))
                except (ValueError, KeyError, TypeError) as err:
                    raise KiminaError(f"{self.path}:{line_no}: not a sample record ({err!r})") from err
        if complete < self.path.stat().st_size:
            log.warning("%s: dropping an incomplete last line (the previous run stopped while writing it)", self.path)
            os.truncate(self.path, complete)

    @staticmethod
    def key(record: dict) -> Key:
        return (str(record["problem"]), int(record["turn"]), int(record["sample_index"]))

    def _keep(self, record: dict) -> None:
        key = self.key(record)
        problem, turn, index = key
        outcome = self.outcomes[key] = Outcome.of_record(record)
        fixed = self.outcomes.get((problem, 2, index), Outcome(False, False)).verified
        may_need_fix = turn == 1 and not outcome.solved and record["feedback"] and not fixed
        if not outcome.verified or may_need_fix:
            self.records[key] = record
        else:
            self.records.pop(key, None)
        if turn == 2 and outcome.verified:
            self.records.pop((problem, 1, index), None)

    def add(self, records: Sequence[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
        for record in records:
            self._keep(record)
