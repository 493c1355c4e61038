"""MiniF2F evaluation: pass@k and verl's mean@n, std@n, best@k and worst@k, with and without the error-fix turn
(SPEC 8).

    python -m kimina_jax.evaluate --model <HF folder | run folder | checkpoint step folder> \\
        --dataset <minif2f file | hub name> --split test --n 32 --k 1,8,32 [--error-fix] [--engine vllm|jax] \\
        [--out results/]

Every problem gets `n` samples (turn 1). With `--error-fix`, every failed turn-1 sample whose Lean feedback makes a
turn-2 prompt (SPEC 7: feedback non-empty and at most --max-feedback-chars, prompt within --max-prompt-length) gets
ONE fix attempt: one sample for the prompt original messages + its response + the feedback. Per sample:
`acc_turn_1` = solved at turn 1; `acc_turn_2` = solved at turn 1 or by its fix ("solved within one fix"). The
headline `acc` is always turn 1, as in the original: the fix turn shows only under `acc_turn_2`.
Samples whose verification could not be done (`unverified`, `server_error`) are counted and left out, never
scored as failures; a fix that could not be verified leaves its sample out of acc_turn_2 only.

Output folder: `samples.jsonl` (every sample: problem, turn, sample index, response, extracted proof, verdict,
Lean messages, format error, feedback), `summary.json` (settings, averaged and per-problem metrics, counts) and
`settings.json`; a table is printed at the end. A rerun with the same --out continues: samples already verified
are kept, only missing ones are generated, and samples left unverified (server down) are verified again from
their stored responses; a larger --n adds samples. Sampling settings must match the folder's.

`validate` is the same computation for the trainer (SPEC 9 metric names).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
import zlib
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from kimina_jax.checkpoint import MODEL_FILES, load_config_dict, load_model_for_export
from kimina_jax.config import (
    ENV_KEY,
    ENV_URL,
    RECIPE_MAX_RESPONSE_LENGTH,
    DataConfig,
    DatasetConfig,
    FormatConfig,
    JaxSamplerConfig,
    RolloutConfig,
    ValSamplingConfig,
    VerifierConfig,
    VllmConfig,
)
from kimina_jax.data import PromptRenderer, build_fix_prompts, load_prompt_dataset, load_tokenizer
from kimina_jax.data.datasets import column_names
from kimina_jax.errors import KiminaError
from kimina_jax.eval_metrics import average_metrics, pass_at_k, problem_metrics
from kimina_jax.models import load_hf_checkpoint
from kimina_jax.reward import PendingSample, Rewarder
from kimina_jax.rollout import RolloutEngine, SamplingParams
from kimina_jax.rollout.factory import make_engine
from kimina_jax.types import Completion, Prompt, Sample, Verdict

__all__ = [
    "Outcome", "fix_targets", "main", "pass_at_k", "restore_sample", "sample_record", "summarize", "turn_values",
    "val_metric_names", "validate",
]

log = logging.getLogger("kimina_jax.evaluate")

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "settings.json"
FIX_SEED_OFFSET = 7_919  # fix attempts draw from other seeds than the turn-1 samples of the same call position
STANDIN_WARNING = (
    "--verifier standin: verdicts come from the LOCAL STAND-IN verifier (a few text rules), NOT from Lean. "
    "These numbers say nothing about proofs; set LEAN_SERVER_API_URL and use --verifier lean."
)


# ---------------------------------------------------------------------------------------------- metrics
@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the metrics need of one sample: whether it was judged (verified), and whether it was solved."""

    verified: bool
    solved: bool

    @classmethod
    def of(cls, sample: Sample) -> Outcome:
        return cls(sample.verdict is None or sample.verdict.is_verified, sample.acc >= 1.0)

    @classmethod
    def of_record(cls, record: dict) -> Outcome:
        return cls(record["verdict"] is None or Verdict(record["verdict"]).is_verified, record["acc"] >= 1.0)


def turn_values(pairs: Sequence[tuple[Outcome, Outcome | None]]) -> dict[str, list[float]]:
    """The 0/1 values of one problem's samples: (turn-1 outcome, outcome of its fix attempt or None) per sample.

    acc_turn_1: solved at turn 1. acc_turn_2: solved at turn 1 or by the fix; a failure without a fix attempt
    (no proof, no feedback, prompt too long) stays 0. Unverified turn-1 samples are left out of both; a sample
    whose fix could not be verified is left out of acc_turn_2 only.
    """
    turn_1, turn_2 = [], []
    for first, fix in pairs:
        if not first.verified:
            continue
        turn_1.append(float(first.solved))
        if first.solved or fix is None:
            turn_2.append(float(first.solved))
        elif fix.verified:
            turn_2.append(float(fix.solved))
    return {"acc_turn_1": turn_1, "acc_turn_2": turn_2}


def summarize(
    values: Mapping[Any, Mapping[str, list[float]]], n: int, ks: Sequence[int], error_fix: bool
) -> tuple[dict[str, dict[str, float]], dict[Any, dict[str, dict[str, float]]]]:
    """(averaged, per problem) metrics of each variable, from `turn_values` of every problem.

    Variables: `acc_turn_1`, with error-fix `acc_turn_2`, and `acc`: the headline accuracy, always `acc_turn_1`
    (the original never folds the fix turn into it). Averages are over the problems that have the metric (a
    problem with no verified sample has none).
    """
    names = ["acc_turn_1", "acc_turn_2"] if error_fix else ["acc_turn_1"]
    per_problem = {
        problem: {name: problem_metrics(vals[name], n, ks) for name in names} for problem, vals in values.items()
    }
    averaged = {name: average_metrics({p: m[name] for p, m in per_problem.items()}) for name in names}
    averaged["acc"] = averaged["acc_turn_1"]
    return averaged, per_problem


def val_metric_names(averaged: Mapping[str, Mapping[str, float]], data_source: str, n: int) -> dict[str, float]:
    """verl's names and split: `val-core/<source>/acc/{mean@n, best@n/mean, best@n/std}` (verl's rule: the core
    variable's mean / maj / best at the largest size), everything else under `val-aux/<source>/<variable>/`."""
    out = {}
    for var, metrics in averaged.items():
        for name, value in metrics.items():
            core = var == "acc" and (name == f"mean@{n}" or name.startswith(f"best@{n}/"))
            out[f"{'val-core' if core else 'val-aux'}/{data_source}/{var}/{name}"] = value
    return out


# ---------------------------------------------------------------------------------------------- sampling
def fix_params(params: SamplingParams) -> SamplingParams:
    """One sample per fix prompt, from other seeds than turn 1."""
    seed = None if params.seed is None else params.seed + FIX_SEED_OFFSET
    return dataclasses.replace(params, n=1, seed=seed)


def sample_and_submit(
    engine: RolloutEngine,
    rewarder: Rewarder,
    prompts: Sequence[Prompt],
    sample_indices: Sequence[Sequence[int]],
    params: SamplingParams,
) -> list[PendingSample]:
    """len(sample_indices[j]) samples of prompts[j], labelled with those indices, sent for verification.

    Prompts wanting the same number of samples share one generate call; verification of a call's samples starts
    while the next call generates. Returned in prompt order, then index order.
    """
    by_count: dict[int, list[int]] = defaultdict(list)
    for j, indices in enumerate(sample_indices):
        if indices:
            by_count[len(indices)].append(j)
    pending: dict[int, list[PendingSample]] = {}
    for count, members in by_count.items():
        groups = engine.generate([prompts[j].token_ids for j in members], dataclasses.replace(params, n=count))
        for j, group in zip(members, groups):
            labelled = [
                dataclasses.replace(c, prompt_index=j, sample_index=i) for c, i in zip(group, sample_indices[j])
            ]
            pending[j] = rewarder.submit(prompts[j], labelled)
    return [p for j in sorted(pending) for p in pending[j]]


def fix_targets(
    samples: Sequence[Sample], renderer: PromptRenderer, max_feedback_chars: int
) -> tuple[list[tuple[int, Prompt]], dict[str, int]]:
    """(position in `samples`, turn-2 prompt) for each sample that gets a fix attempt, and the SPEC 7 counts."""
    targets, counts = [], defaultdict(int)
    for position, sample in enumerate(samples):
        prompts, sample_counts = build_fix_prompts([sample], renderer, max_feedback_chars)
        for name, value in sample_counts.items():
            counts[name] += value
        if prompts:
            targets.append((position, prompts[0]))
    return targets, dict(counts)


def validate(
    engine: RolloutEngine,
    rewarder: Rewarder,
    prompts: Sequence[Prompt],
    params: SamplingParams,
    renderer: PromptRenderer,
    *,
    error_fix: bool,
    data_source: str,
    max_feedback_chars: int = 3000,
    ks: Sequence[int] | None = None,
    progress: bool = False,
) -> tuple[dict[str, float], list[Sample]]:
    """Validation inside training (SPEC 8/9): `params.n` samples per prompt, then, with `error_fix`, one fix attempt
    per failed sample with feedback. Returns the metrics under verl's names and every sample (turn 1, then the
    fixes; a fix carries its turn-1 sample's indices).

    `val-core/<source>/acc/...` is turn-1 accuracy, with or without `error_fix`; `val-aux/<source>/acc_turn_1/...`
    is the same and `val-aux/<source>/acc_turn_2/...` solved within one fix. pass@k for `ks` (default: n),
    unverified counts too.
    """
    n = params.n
    bar = lambda turn: f"validate turn {turn}" if progress else None  # noqa: E731
    turn_1 = rewarder.collect(
        sample_and_submit(engine, rewarder, prompts, [range(n)] * len(prompts), params), bar(1)
    )
    fix_of: dict[int, Sample] = {}
    if error_fix:
        targets, _ = fix_targets(turn_1, renderer, max_feedback_chars)
        if targets:
            indices = [[turn_1[position].completion.sample_index] for position, _ in targets]
            fixes = rewarder.collect(
                sample_and_submit(engine, rewarder, [p for _, p in targets], indices, fix_params(params)), bar(2)
            )
            fix_of = {position: fix for (position, _), fix in zip(targets, fixes)}
    values = {}
    for p in range(len(prompts)):
        pairs = []
        for position in range(p * n, (p + 1) * n):
            fix = fix_of.get(position)
            pairs.append((Outcome.of(turn_1[position]), None if fix is None else Outcome.of(fix)))
        values[p] = turn_values(pairs)
    averaged, _ = summarize(values, n, ks or (n,), error_fix)
    metrics = val_metric_names(averaged, data_source, n)
    fixes = list(fix_of.values())
    for turn, samples in ((1, turn_1), (2, fixes)):
        unverified = sum(not Outcome.of(s).verified for s in samples)
        metrics[f"val-aux/{data_source}/unverified/turn_{turn}"] = float(unverified)
    if error_fix:
        metrics[f"val-aux/{data_source}/fix_attempts"] = float(len(fixes))
    return metrics, [*turn_1, *fixes]


# ---------------------------------------------------------------------------------------------- records
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
        "verdict_error": None if verdict is None else verdict.error,
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


Key = tuple[str, int, int]  # (problem, turn, sample index)


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


# ---------------------------------------------------------------------------------------------- the CLI run
@dataclasses.dataclass
class ModelSource:
    """What --model names: an HF folder, or a training checkpoint step folder."""

    path: Path
    kind: str  # "hf" or "checkpoint"
    files_dir: Path  # config.json and the tokenizer files
    saved_config: dict

    @classmethod
    def resolve(cls, given: str) -> ModelSource:
        path = Path(given)
        if (path / "config.json").is_file():
            return cls(path, "hf", path, {})
        if (path / "checkpoints").is_dir():  # a run folder: its newest checkpoint
            steps = [int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit()]
            if not steps:
                raise KiminaError(f"--model {given}: the run folder has no checkpoint yet")
            path = path / "checkpoints" / str(max(steps))
        if (path / "params").is_dir():
            return cls(path, "checkpoint", path.absolute().parent.parent / MODEL_FILES, load_config_dict(path))
        raise KiminaError(
            f"--model {given}: neither an HF folder (config.json) nor a training run / checkpoint folder (params/)"
        )

    def saved(self, section: str, key: str, default):
        """A value of the training run's saved config (defaults for a plain HF folder)."""
        return self.saved_config.get(section, {}).get(key, default)


class Evaluation:
    """One evaluation run of the CLI; the engine and the verifier are started only when there is work for them."""

    def __init__(
        self, args: argparse.Namespace, source: ModelSource, prompts: list[Prompt], renderer: PromptRenderer,
        store: SampleStore,
    ):
        self.args, self.source, self.prompts, self.renderer, self.store = args, source, prompts, renderer, store
        self.params = SamplingParams(
            n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
            seed=args.seed,
        )
        self.verified_now = 0

    @functools.cached_property
    def engine(self) -> RolloutEngine:
        args, source = self.args, self.source
        if args.engine == "vllm" and source.kind == "hf":
            model = None  # vLLM reads the folder's weights itself
        elif source.kind == "hf":
            model = load_hf_checkpoint(source.path, args.dtype)
        else:
            model, _ = load_model_for_export(source.path)
        rollout = RolloutConfig(
            engine=args.engine, max_tokens=args.max_tokens,
            jax=JaxSamplerConfig(kv_cache_bytes=args.kv_cache_bytes or JaxSamplerConfig.kv_cache_bytes),
            vllm=VllmConfig(
                tensor_parallel_size=args.tensor_parallel_size, gpu_memory_utilization=args.gpu_memory_utilization,
                max_model_len=args.max_prompt_length + args.max_tokens, kv_cache_bytes=args.kv_cache_bytes,
                enforce_eager=args.enforce_eager, dtype=args.dtype, enable_sleep_mode=False,
            ),
        )
        return make_engine(rollout, model, self.renderer.tokenizer, model_dir=source.files_dir)

    @functools.cached_property
    def rewarder(self) -> Rewarder:
        args = self.args
        verifier = VerifierConfig(
            kind=args.verifier, url=os.environ.get(ENV_URL) or None, api_key=os.environ.get(ENV_KEY) or None,
            timeout_s=args.lean_timeout_s, batch_size=args.lean_batch_size, max_in_flight=args.lean_max_in_flight,
            retries=args.lean_retries,
        )
        rewarder = Rewarder.from_config(verifier, FormatConfig())
        if args.verifier == "lean" and not rewarder.verifier.health():
            rewarder.verifier.close()
            raise KiminaError(f"the Lean server at ${ENV_URL}={verifier.url} does not answer /health: is it running?")
        return rewarder

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.close()
        if "rewarder" in self.__dict__:
            self.rewarder.verifier.close()

    def _seed(self, turn: int, first_problem: int, first_index: int) -> int:
        """A seed per generate call, so a resumed or extended run does not repeat earlier samples."""
        return zlib.crc32(f"{self.args.seed}:{turn}:{first_problem}:{first_index}".encode())

    def run(self) -> None:
        size = self.args.batch_problems
        with tqdm(total=len(self.prompts), desc="evaluate", unit="problem", dynamic_ncols=True) as bar:
            for start in range(0, len(self.prompts), size):
                chunk = self.prompts[start : start + size]
                self._turn_1(chunk, start)
                if self.args.error_fix:
                    self._turn_2(chunk, start)
                bar.set_postfix(verified=self.verified_now, refresh=False)
                bar.update(len(chunk))

    def _turn_1(self, chunk: list[Prompt], start: int) -> None:
        missing: list[list[int]] = []
        again: list[tuple[Prompt, dict]] = []
        for prompt in chunk:
            indices = []
            for i in range(self.args.n):
                key = (prompt.statement_id, 1, i)
                if key not in self.store.outcomes:
                    indices.append(i)
                elif not self.store.outcomes[key].verified:
                    again.append((prompt, self.store.records[key]))
            missing.append(indices)
        first_index = min((m[0] for m in missing if m), default=0)
        params = dataclasses.replace(self.params, seed=self._seed(1, start, first_index))
        self._finish(again, chunk, missing, params)

    def _turn_2(self, chunk: list[Prompt], start: int) -> None:
        failed = [
            restore_sample(self.store.records[key], prompt)
            for prompt in chunk
            for i in range(self.args.n)
            if (key := (prompt.statement_id, 1, i)) in self.store.records and self.store.outcomes[key].verified
        ]
        targets, _ = fix_targets(failed, self.renderer, self.args.max_feedback_chars)
        prompts, indices, again = [], [], []
        for position, fix_prompt in targets:
            index = failed[position].completion.sample_index
            key = (fix_prompt.statement_id, 2, index)
            if key not in self.store.outcomes:
                prompts.append(fix_prompt)
                indices.append([index])
            elif not self.store.outcomes[key].verified:
                again.append((fix_prompt, self.store.records[key]))
        params = fix_params(dataclasses.replace(self.params, seed=self._seed(2, start, 0)))
        self._finish(again, prompts, indices, params)

    def _finish(
        self, again: list[tuple[Prompt, dict]], prompts: list[Prompt], indices: list[list[int]], params: SamplingParams
    ) -> None:
        """Verify the stored responses of `again` anew, sample and verify `indices[j]` of `prompts[j]`, record all."""
        pending = [
            waiting
            for prompt, record in again
            for waiting in self.rewarder.submit(prompt, [restore_sample(record, prompt).completion])
        ]
        if any(indices):
            pending += sample_and_submit(self.engine, self.rewarder, prompts, indices, params)
        if not pending:
            return
        records = [sample_record(sample) for sample in self.rewarder.collect(pending)]
        for record, (_, old) in zip(records, again):
            record["response_tokens"] = old["response_tokens"]  # a restored response has no token ids
        self.verified_now += len(records)
        self.store.add(records)


def load_problems(args: argparse.Namespace, tokenizer) -> tuple[list[Prompt], PromptRenderer, str]:
    """(turn-1 prompts, renderer, data source name) of the selected rows; every prompt must fit."""
    has_split = bool(args.split) and "split" in column_names(args.dataset, args.hub_split)
    where = {"split": args.split} if has_split else {}
    if args.split and not has_split:
        log.warning("--dataset %s has no 'split' column: using all its rows (--split ignored)", args.dataset)
    cfg = DatasetConfig(files=[args.dataset], hub_split=args.hub_split, where=where, limit=args.limit)
    renderer = PromptRenderer(tokenizer, args.max_prompt_length)
    dataset = load_prompt_dataset(cfg, renderer, filter_overlong=True, key="--dataset")
    if dataset.dropped:
        raise KiminaError(
            f"--dataset: {dataset.dropped} problem(s) have prompts longer than --max-prompt-length "
            f"({args.max_prompt_length} tokens); raise it so that every problem is evaluated"
        )
    prompts = dataset.all_prompts()
    seen: dict[str, str] = {}
    for row in dataset.rows:
        if row.statement_id in seen:
            first = seen[row.statement_id]
            raise KiminaError(f"{row.origin}: problem '{row.statement_id}' appears twice (first at {first})")
        seen[row.statement_id] = row.origin
    name = args.name or prompts[0].data_source
    if has_split and not args.name and not name.endswith(f"_{args.split}"):
        name = f"{name}_{args.split}"
    return prompts, renderer, name


def check_settings(out: Path, settings: dict) -> None:
    """The folder's samples must come from the same settings (--n and --error-fix may change between runs)."""
    path = out / SETTINGS_FILE
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        differ = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if differ:
            listed = ", ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differ.items())
            raise KiminaError(f"--out {out} holds samples made with other settings ({listed}); use another --out")
    else:
        path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def store_summary(
    store: SampleStore, prompts: Sequence[Prompt], n: int, ks: Sequence[int], error_fix: bool
) -> tuple[dict, dict, dict[str, int]]:
    """(averaged metrics, per-problem metrics, counts) of the recorded samples with index < n."""
    values, counts = {}, defaultdict(int)
    for prompt in prompts:
        pairs = []
        for i in range(n):
            first = store.outcomes.get((prompt.statement_id, 1, i))
            if first is None:
                continue
            fix = store.outcomes.get((prompt.statement_id, 2, i)) if error_fix else None
            pairs.append((first, fix))
            for turn, outcome in ((1, first), (2, fix)):
                if outcome is not None:
                    counts[f"samples_turn_{turn}"] += 1
                    counts[f"unverified_turn_{turn}"] += not outcome.verified
        values[prompt.statement_id] = turn_values(pairs)
        counts["problems_with_fewer_verified_samples_than_n"] += len(values[prompt.statement_id]["acc_turn_1"]) < n
    averaged, per_problem = summarize(values, n, ks, error_fix)
    return averaged, per_problem, {name: counts[name] for name in sorted(counts)}


def format_table(summary: dict) -> str:
    """The printed result: one row per turn (`acc` = turn 1, then `acc_turn_2`), mean@n, pass@k, best@k in percent."""
    n, ks = summary["n"], summary["k"]
    columns = [f"mean@{n}", *(f"pass@{k}" for k in ks), *(f"best@{k}/mean" for k in ks if k > 1)]
    rows = [("acc (turn 1)", "acc")] + ([("acc_turn_2 (within one fix)", "acc_turn_2")] if summary["error_fix"] else [])
    width = max(len(c) for c in columns) + 2
    label_width = max(len(label) for label, _ in rows)
    lines = [
        f"{summary['data_source']}: {summary['problems']} problems, n={n} samples each, "
        f"verifier: {summary['verifier']}",
        f"{'':{label_width}}" + "".join(f"{c.removesuffix('/mean'):>{width}}" for c in columns),
    ]
    for label, var in rows:
        metrics = summary["metrics"][var]
        cells = [f"{100 * metrics[c]:.2f}%" if c in metrics else "-" for c in columns]
        lines.append(f"{label:{label_width}}" + "".join(f"{cell:>{width}}" for cell in cells))
    counts = summary["counts"]
    lines.append(
        f"unverified samples (left out): turn 1: {counts.get('unverified_turn_1', 0)}, "
        f"turn 2: {counts.get('unverified_turn_2', 0)}"
    )
    return "\n".join(lines)


def run_evaluation(args: argparse.Namespace) -> dict:
    """The CLI's work: sample, verify, record, summarize. Returns the summary (also written to summary.json)."""
    ks = sorted(set(args.k))
    if args.n < max(ks):
        raise KiminaError(
            f"--n {args.n} is smaller than the largest --k ({max(ks)}): pass@{max(ks)} needs at least {max(ks)} "
            "samples per problem; raise --n or drop that k"
        )
    if args.verifier == "lean" and not os.environ.get(ENV_URL):
        raise KiminaError(f"--verifier lean needs the Lean server's address in ${ENV_URL} (e.g. http://localhost)")
    if args.verifier == "standin":
        print(f"WARNING: {STANDIN_WARNING}", file=sys.stderr)
    source = ModelSource.resolve(args.model)
    if args.max_tokens is None:
        args.max_tokens = source.saved("data", "max_response_length", RECIPE_MAX_RESPONSE_LENGTH)
    if args.max_prompt_length is None:
        args.max_prompt_length = source.saved("data", "max_prompt_length", DataConfig().max_prompt_length)
    tokenizer = load_tokenizer(str(source.files_dir))
    prompts, renderer, data_source = load_problems(args, tokenizer)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = str(Path(args.dataset).absolute()) if Path(args.dataset).exists() else args.dataset
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
                "max_tokens": args.max_tokens, "seed": args.seed}
    check_settings(out, {
        "model": str(source.path.absolute()), "dataset": dataset, "split": args.split, **sampling,
        "max_prompt_length": args.max_prompt_length, "max_feedback_chars": args.max_feedback_chars,
        "verifier": args.verifier,
    })
    store = SampleStore(out / SAMPLES_FILE)
    evaluation = Evaluation(args, source, prompts, renderer, store)
    try:
        evaluation.run()
    finally:
        evaluation.close()

    averaged, per_problem, counts = store_summary(store, prompts, args.n, ks, args.error_fix)
    summary = {
        "model": str(source.path), "dataset": args.dataset, "split": args.split, "data_source": data_source,
        "problems": len(prompts), "n": args.n, "k": ks, "error_fix": args.error_fix, "sampling": sampling,
        "verifier": "lean" if args.verifier == "lean" else "standin (LOCAL STAND-IN, NOT Lean)",
        "samples_verified_this_run": evaluation.verified_now, "counts": counts, "metrics": averaged,
        "val_metrics": val_metric_names(averaged, data_source, args.n), "per_problem": per_problem,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    val = ValSamplingConfig()
    lean = VerifierConfig()
    parser = argparse.ArgumentParser(
        prog="python -m kimina_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="an HF folder, a training run folder or a checkpoint step")
    parser.add_argument("--dataset", required=True, help="a MiniF2F .jsonl/.parquet file or a Hub dataset name")
    parser.add_argument("--split", default="test", help="rows whose 'split' column has this value (default: test)")
    parser.add_argument("--hub-split", default="train", help="split loaded from a Hub dataset (default: train)")
    parser.add_argument("--name", default=None, help="data source name in metric names (default: <dataset>_<split>)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--n", type=int, default=32, help="samples per problem (default: 32)")
    parser.add_argument("--k", type=_positive_ints, default=[1, 8, 32], help="pass@k / best@k sizes (default: 1,8,32)")
    parser.add_argument("--error-fix", action="store_true", help="one fix attempt per failed sample (SPEC 7)")
    parser.add_argument("--engine", choices=["vllm", "jax"], default="vllm", help="rollout engine (default: vllm)")
    parser.add_argument("--out", default="results", help="output folder; rerun with the same one to resume")
    sampling = parser.add_argument_group("sampling (defaults: the recipe's validation sampling)")
    sampling.add_argument("--temperature", type=float, default=val.temperature)
    sampling.add_argument("--top-p", type=float, default=val.top_p)
    sampling.add_argument("--top-k", type=int, default=val.top_k, help="-1: off")
    sampling.add_argument("--max-tokens", type=int, default=None,
                          help=f"response length (default: the run's, else {RECIPE_MAX_RESPONSE_LENGTH})")
    sampling.add_argument("--max-prompt-length", type=int, default=None,
                          help=f"turn-1 and fix prompts (default: the run's, else {DataConfig().max_prompt_length})")
    sampling.add_argument("--max-feedback-chars", type=int, default=3000, help="longer Lean feedback gets no fix")
    sampling.add_argument("--seed", type=int, default=0)
    sampling.add_argument("--batch-problems", type=int, default=64, help="problems per generate call (default: 64)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                        help="compute dtype of an HF folder's model and of vLLM (a checkpoint keeps its own)")
    engine.add_argument("--gpu-memory-utilization", type=float, default=0.9, help="vLLM (default: 0.9)")
    engine.add_argument("--kv-cache-bytes", type=int, default=None,
                        help="the engine's KV cache size (vLLM on CPU needs it; JAX sampler default: 16 GiB)")
    engine.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM, HF folders only")
    engine.add_argument("--enforce-eager", action="store_true", help="vLLM: no CUDA graphs")
    verifier = parser.add_argument_group(f"verifier (server address from ${ENV_URL}, its key from ${ENV_KEY})")
    verifier.add_argument("--verifier", choices=["lean", "standin"], default="lean",
                          help="standin: a LOCAL STAND-IN with text rules, NOT Lean (pipeline checks only)")
    verifier.add_argument("--lean-timeout-s", type=float, default=lean.timeout_s)
    verifier.add_argument("--lean-batch-size", type=int, default=lean.batch_size)
    verifier.add_argument("--lean-max-in-flight", type=int, default=lean.max_in_flight)
    verifier.add_argument("--lean-retries", type=int, default=lean.retries)
    args = parser.parse_args(argv)
    for name in ("n", "batch_problems", "max_feedback_chars"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.engine == "vllm":
        # JAX must not preallocate the GPU vLLM needs (read when JAX first touches the device, not at import).
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    try:
        summary = run_evaluation(args)
    except KiminaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"wrote {Path(args.out) / SAMPLES_FILE} and {Path(args.out) / SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
