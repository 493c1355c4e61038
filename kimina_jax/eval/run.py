"""One resumable evaluation run (SPEC 8): every problem's samples generated, verified and recorded in an output
folder, then summarized. `python -m kimina_jax.evaluate` is its command line."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import zlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from kimina_jax.checkpoint import load_config_dict
from kimina_jax.run_folder import MODEL_FILES, load_model_for_export, step_folder, writable_folder
from kimina_jax.config import ENV_URL, EvalConfig, uses_lean
from kimina_jax.data import PromptRenderer, load_prompt_dataset, load_tokenizer
from kimina_jax.data.datasets import column_names
from kimina_jax.errors import KiminaError
from kimina_jax.eval.metrics import summarize, turn_values, val_metric_names
from kimina_jax.eval.records import SampleStore, restore_sample, sample_record
from kimina_jax.eval.validation import fix_params, fix_targets, sample_and_submit
from kimina_jax.models import load_hf_checkpoint
from kimina_jax.reward import RewardFunction, reward_from_config
from kimina_jax.rollout import RolloutEngine, SamplingParams
from kimina_jax.rollout.factory import make_engine
from kimina_jax.types import Prompt
from kimina_jax.urls import redact_url

log = logging.getLogger("kimina_jax.eval")

SAMPLES_FILE = "samples.jsonl"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "settings.json"
STANDIN_WARNING = (
    "verifier.kind standin: verdicts come from the LOCAL STAND-IN verifier (a few text rules), NOT from Lean. "
    "These numbers say nothing about proofs; set LEAN_SERVER_API_URL and use --verifier lean."
)


@dataclasses.dataclass
class ModelSource:
    """What `eval.model` names: an HF folder, or a training checkpoint step folder."""

    path: Path
    kind: str  # "hf" or "checkpoint"
    files_dir: Path  # config.json and the tokenizer files
    saved_config: dict  # the training run's resolved config ({} for an HF folder)

    @classmethod
    def resolve(cls, given: str) -> ModelSource:
        path = Path(given)
        if (path / "config.json").is_file():
            return cls(path, "hf", path, {})
        step = step_folder(path, "--model")  # a run folder: its newest checkpoint
        if step is not None:
            return cls(step, "checkpoint", step.absolute().parent.parent / MODEL_FILES, load_config_dict(step))
        raise KiminaError(
            f"--model {given}: neither an HF folder (config.json) nor a training run / checkpoint folder (params/)"
        )


def load_problems(cfg: EvalConfig, tokenizer) -> tuple[list[Prompt], PromptRenderer, str]:
    """(turn-1 prompts, renderer, data source name) of the selected rows; every prompt must fit."""
    dataset, split = cfg.eval.dataset, cfg.eval.split
    has_split = bool(split) and "split" in column_names(dataset.files[0], dataset.hub_split)
    if split and not has_split:
        log.warning("eval.dataset %s has no 'split' column: using all its rows (eval.split ignored)", dataset.files[0])
    if has_split:
        dataset = dataclasses.replace(dataset, where={**dataset.where, "split": split})
    renderer = PromptRenderer(tokenizer, cfg.data.max_prompt_length)
    loaded = load_prompt_dataset(dataset, renderer, filter_overlong=True, key="eval.dataset")
    if loaded.dropped:
        raise KiminaError(
            f"eval.dataset: {loaded.dropped} problem(s) have prompts longer than data.max_prompt_length "
            f"({cfg.data.max_prompt_length} tokens); raise it so that every problem is evaluated"
        )
    prompts = loaded.all_prompts()
    seen: dict[str, str] = {}
    for row in loaded.rows:
        if row.statement_id in seen:
            first = seen[row.statement_id]
            raise KiminaError(f"{row.origin}: problem '{row.statement_id}' appears twice (first at {first})")
        seen[row.statement_id] = row.origin
    name = dataset.name or prompts[0].data_source
    if has_split and not dataset.name and not name.endswith(f"_{split}"):
        name = f"{name}_{split}"
    return prompts, renderer, name


def check_settings(out: Path, settings: dict) -> None:
    """The folder's samples must come from the same settings (eval.n and eval.error_fix may change between runs)."""
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


class Evaluation:
    """One evaluation run; the engine and the verifier are started only when there is work for them."""

    def __init__(
        self, cfg: EvalConfig, source: ModelSource, prompts: list[Prompt], renderer: PromptRenderer,
        store: SampleStore,
    ):
        self.cfg, self.source, self.prompts, self.renderer, self.store = cfg, source, prompts, renderer, store
        val = cfg.rollout.val
        self.params = SamplingParams(
            n=cfg.eval.n, temperature=val.temperature, top_p=val.top_p, top_k=val.top_k,
            max_tokens=cfg.rollout.max_tokens, seed=cfg.eval.seed,
        )
        self.verified_now = 0

    @functools.cached_property
    def engine(self) -> RolloutEngine:
        cfg, source = self.cfg, self.source
        if cfg.rollout.engine == "vllm" and source.kind == "hf":
            model = None  # vLLM reads the folder's weights itself
        elif source.kind == "hf":
            model = load_hf_checkpoint(source.path, cfg.model.dtype)  # parameters in the compute dtype: no training
        else:
            model, _ = load_model_for_export(source.path)
        # Nothing here puts the engine to sleep: no sleep-mode allocator.
        rollout = dataclasses.replace(cfg.rollout, vllm=dataclasses.replace(cfg.rollout.vllm, enable_sleep_mode=False))
        return make_engine(rollout, model, self.renderer.tokenizer, model_dir=source.files_dir)

    @functools.cached_property
    def rewarder(self) -> RewardFunction:
        rewarder = reward_from_config(self.cfg.reward, self.cfg.verifier)
        if uses_lean(self.cfg) and not rewarder.verifier.health():
            rewarder.close()
            url = redact_url(self.cfg.verifier.url)
            raise KiminaError(f"the Lean server at {url} does not answer /health: is it running?")
        return rewarder

    def close(self) -> None:
        if "engine" in self.__dict__:
            self.engine.close()
        if "rewarder" in self.__dict__:
            self.rewarder.close()

    def _seed(self, turn: int, first_problem: int, first_index: int) -> int:
        """A seed per generate call, so a resumed or extended run does not repeat earlier samples."""
        return zlib.crc32(f"{self.cfg.eval.seed}:{turn}:{first_problem}:{first_index}".encode())

    def run(self) -> None:
        size = self.cfg.eval.batch_problems
        with tqdm(total=len(self.prompts), desc="evaluate", unit="problem", dynamic_ncols=True) as bar:
            for start in range(0, len(self.prompts), size):
                chunk = self.prompts[start : start + size]
                self._turn_1(chunk, start)
                if self.cfg.eval.error_fix:
                    self._turn_2(chunk, start)
                bar.set_postfix(verified=self.verified_now, refresh=False)
                bar.update(len(chunk))

    def _turn_1(self, chunk: list[Prompt], start: int) -> None:
        missing: list[list[int]] = []
        again: list[tuple[Prompt, dict]] = []
        for prompt in chunk:
            indices = []
            for i in range(self.cfg.eval.n):
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
            for i in range(self.cfg.eval.n)
            if (key := (prompt.statement_id, 1, i)) in self.store.records and self.store.outcomes[key].verified
        ]
        targets, _ = fix_targets(failed, self.renderer, self.cfg.data.error_fix.max_feedback_chars)
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


def run_evaluation(cfg: EvalConfig, source: ModelSource) -> dict:
    """Sample, verify, record, summarize. Returns the summary (also written to summary.json)."""
    run, verifier = cfg.eval, cfg.verifier
    if uses_lean(cfg) and not verifier.url:
        raise KiminaError(f"verifier.kind lean needs the Lean server's address in ${ENV_URL} (e.g. http://localhost)")
    if verifier.kind == "standin" and cfg.reward.function in (None, "lean"):
        print(f"WARNING: {STANDIN_WARNING}", file=sys.stderr)
    tokenizer = load_tokenizer(str(source.files_dir))
    prompts, renderer, data_source = load_problems(cfg, tokenizer)

    out = writable_folder(run.out, "--out")
    given = run.dataset.files[0]
    dataset = str(Path(given).absolute()) if Path(given).exists() else given
    val = cfg.rollout.val
    sampling = {"temperature": val.temperature, "top_p": val.top_p, "top_k": val.top_k,
                "max_tokens": cfg.rollout.max_tokens, "seed": run.seed}
    check_settings(out, {
        "model": str(source.path.absolute()), "dataset": dataset, "split": run.split, **sampling,
        "max_prompt_length": cfg.data.max_prompt_length,
        "max_feedback_chars": cfg.data.error_fix.max_feedback_chars, "verifier": verifier.kind,
        "reward": cfg.reward.function or "lean",
    })
    store = SampleStore(out / SAMPLES_FILE)
    evaluation = Evaluation(cfg, source, prompts, renderer, store)
    try:
        evaluation.run()
    finally:
        evaluation.close()

    ks = sorted(set(run.k))
    averaged, per_problem, counts = store_summary(store, prompts, run.n, ks, run.error_fix)
    summary = {
        "model": str(source.path), "dataset": given, "split": run.split, "data_source": data_source,
        "problems": len(prompts), "n": run.n, "k": ks, "error_fix": run.error_fix, "sampling": sampling,
        "verifier": "lean" if verifier.kind == "lean" else "standin (LOCAL STAND-IN, NOT Lean)",
        "reward": cfg.reward.function or "lean",
        "samples_verified_this_run": evaluation.verified_now, "counts": counts, "metrics": averaged,
        "val_metrics": val_metric_names(averaged, data_source, run.n), "per_problem": per_problem,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
