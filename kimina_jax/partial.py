"""Partial rollouts (`rollout.partial`): a step never waits for its longest response.

Each process keeps `ceil(over_provision x its share of data.train_batch_size)` groups (a prompt and its n
samples) in flight. A step continues every unfinished sample of them in one engine call
(`RolloutEngine.continue_samples`) that stops as soon as the process has its share of groups with all n samples
finished; those groups train now (the earliest finished first, surplus finished groups in a later step), the
other samples are carried, with their tokens so far, and continued in the next step with the weights then: never
restarted. Each token keeps the behaviour log-prob of the weights that sampled it and the step those weights
started (its staleness is counted from there), so the policy loss corrects each token by its own ratio
(the rollout correction, `algorithm.rollout_correction`: token-level truncated weights unless set otherwise).
A group whose oldest token would train more than `max_staleness` steps after it was sampled is dropped.

Prompts are drawn a whole batch at a time (the data position advances as with dynamic sampling's extra
batches); drawn prompts wait here until a group's place is free. Everything held (groups, their tokens,
log-probs and steps, the prompts waiting) is in `state_dict`, saved with each checkpoint: a resumed run
continues the same samples and draws the same prompts.
"""
from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from kimina_jax.parallel import allgather_objects
from kimina_jax.pipeline import collect_in_order
from kimina_jax.rollout import RolloutEngine, SampleRequest, SampleResult, SamplingParams, make_completion
from kimina_jax.types import Completion, Prompt


@dataclasses.dataclass(eq=False)
class SampleSoFar:
    """One sample's response so far: its tokens, their behaviour log-probs and the step whose weights sampled
    each."""

    tokens: np.ndarray  # int32
    logprobs: np.ndarray  # float32
    steps: np.ndarray  # int32
    finish_reason: str | None = None

    @classmethod
    def empty(cls) -> "SampleSoFar":
        return cls(np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int32))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, result: SampleResult, step: int) -> None:
        """Take what a call generated with step `step`'s weights (its result starts with the tokens held)."""
        new = len(result.token_ids) - len(self.tokens)
        self.tokens = np.asarray(result.token_ids, np.int32)
        self.logprobs = np.asarray(result.logprobs, np.float32)  # the head handed back as held (the engine contract)
        self.steps = np.concatenate([self.steps, np.full(new, step, np.int32)])
        self.finish_reason = result.finish_reason


@dataclasses.dataclass(eq=False)  # a group is itself: held in sets, never compared by value
class Group:
    """A prompt and its n samples in flight; `uid` (the prompt's global draw position) seeds the samples' streams."""

    uid: int
    prompt: Prompt
    samples: list[SampleSoFar]

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def first_step(self) -> int | None:
        """The step whose weights sampled its oldest token (None: no token yet)."""
        return min((int(s.steps[0]) for s in self.samples if len(s.steps)), default=None)


@dataclasses.dataclass
class PartialStep:
    """What one step's generation gave: the groups to train, in the order they finished, and its counts."""

    groups: list[Group]
    continued: int  # samples continued from tokens of an earlier step
    carried: int  # unfinished samples carried to a later step
    dropped_stale: int  # samples dropped (with their group) for staleness


class PartialRollouts:
    """The groups in flight on this process and the prompts drawn for later (module docstring).

    `share` groups train per step; the group drawn as row r of batch b gets uid `b * batch_size + first + r`
    (`first`: this process's first row of a global batch), so uids are global.
    """

    def __init__(self, n: int, share: int, batch_size: int, first: int, over_provision: float, max_staleness: int):
        self.n, self.share, self.batch_size, self.first = n, share, batch_size, first
        self.in_flight = math.ceil(over_provision * share)
        self.max_staleness = max_staleness
        self.groups: list[Group] = []
        self.waiting: list[tuple[int, Prompt]] = []
        self.batches_drawn = 0

    def top_up(self, draw: Callable[[], Sequence[Prompt]], any_process: Callable[[bool], bool] = bool) -> None:
        """Fill the free places in flight with waiting prompts, drawing batches (`draw`: this process's share of the
        next one) while too few wait on any process (`any_process`: every process draws alike, so the data
        position is the same on all)."""
        while any_process(len(self.groups) + len(self.waiting) < self.in_flight):
            base = self.batches_drawn * self.batch_size + self.first
            self.waiting += [(base + r, prompt) for r, prompt in enumerate(draw())]
            self.batches_drawn += 1
        free = self.in_flight - len(self.groups)
        self.groups += [Group(uid, prompt, [SampleSoFar.empty() for _ in range(self.n)])
                        for uid, prompt in self.waiting[:free]]
        del self.waiting[:free]

    def generate(self, engine: RolloutEngine, params: SamplingParams, step: int, weights_step: int | None = None,
                 on_group: Callable[[Group], None] | None = None) -> PartialStep:
        """Training step `step`'s generation with the weights step `weights_step` started from (default `step`;
        off-policy the one before): stale groups dropped, then every unfinished sample continued until `share`
        groups are finished; `on_group` is called with each group to train as soon as it is (verification can
        start while the engine goes on). The groups returned leave the flight. A token's step is its weights'."""
        weights_step = step if weights_step is None else weights_step
        dropped = self._drop_stale(step)
        ready = [g for g in self.groups if g.finished]  # finished in an earlier step, beyond its share
        for group in ready[: self.share]:
            if on_group is not None:
                on_group(group)
        places = [(g, j) for g in self.groups for j, s in enumerate(g.samples) if not s.finished]
        continued = 0
        if len(ready) < self.share and places:
            continued = sum(len(g.samples[j].tokens) > 0 for g, j in places)
            left = {g: sum(not s.finished for s in g.samples) for g, _ in places}

            def finished(i: int, result: SampleResult) -> bool:
                group, j = places[i]
                group.samples[j].extend(result, weights_step)
                left[group] -= 1
                if not left[group]:
                    ready.append(group)
                    if len(ready) <= self.share and on_group is not None:
                        on_group(group)
                return len(ready) >= self.share

            requests = [SampleRequest(g.prompt.token_ids, (g.uid, j), tuple(int(t) for t in g.samples[j].tokens),
                                      g.samples[j].logprobs) for g, j in places]
            results = engine.continue_samples(requests, params, finished)
            for (group, j), result in zip(places, results):
                if not result.finished:
                    group.samples[j].extend(result, weights_step)
        trained = ready[: self.share]
        taken = set(trained)
        self.groups = [g for g in self.groups if g not in taken]
        carried = sum(not s.finished for g in self.groups for s in g.samples)
        return PartialStep(trained, continued, carried, dropped)

    def _drop_stale(self, step: int) -> int:
        """Drop the groups whose oldest token would train more than `max_staleness` steps after it was sampled."""
        stale = {g for g in self.groups if g.first_step() is not None and step - g.first_step() > self.max_staleness}
        self.groups = [g for g in self.groups if g not in stale]
        return len(stale) * self.n

    # ---------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """Everything held, as JSON values (arrays as base64 of their bytes: exact)."""
        return {
            "batches_drawn": self.batches_drawn,
            "waiting": [[uid, _prompt_dict(p)] for uid, p in self.waiting],
            "groups": [{"uid": g.uid, "prompt": _prompt_dict(g.prompt), "samples": [
                {"tokens": _pack(s.tokens), "logprobs": _pack(s.logprobs), "steps": _pack(s.steps),
                 "finish_reason": s.finish_reason} for s in g.samples]} for g in self.groups],
        }

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn = int(state["batches_drawn"])
        self.waiting = [(int(uid), _prompt(p)) for uid, p in state["waiting"]]
        self.groups = [Group(int(g["uid"]), _prompt(g["prompt"]), [
            SampleSoFar(_unpack(s["tokens"], np.int32), _unpack(s["logprobs"], np.float32),
                        _unpack(s["steps"], np.int32), s["finish_reason"]) for s in g["samples"]])
            for g in state["groups"]]


def completions(group: Group, tokenizer=None) -> list[Completion]:
    """The group's finished samples as `Completion`s (behaviour log-probs and the steps of their weights per
    token)."""
    return [dataclasses.replace(make_completion(group.uid, j, s.tokens, s.logprobs, s.finish_reason, tokenizer),
                                token_steps=s.steps) for j, s in enumerate(group.samples)]


def staleness(completions: Sequence[Completion], step: int) -> dict[str, float]:
    """`rollout/staleness/{mean,max}` over the tokens of `completions` trained at `step`: how many steps older than
    the step's weights the weights that sampled each were (none: not partial rollouts)."""
    lags = [step - c.token_steps for c in completions if c.token_steps is not None]
    if not lags or not sum(map(len, lags)):
        return {}
    lags = np.concatenate(lags)
    return {"rollout/staleness/mean": float(lags.mean()), "rollout/staleness/max": float(lags.max())}


class PartialStepRollouts:
    """One step's generation (`PartialRollouts.generate`) and verification, used as `pipeline.StepRollouts` is
    (`start_in_background`, `wait_generated`, `finish`): each group goes to the reward as soon as it is finished;
    `finish` exchanges the processes' groups (main thread: a collective) and returns the samples of every process's
    groups, in process order, with the timings and `rollout/partial/*` (summed over the processes)."""

    def __init__(self, engine: RolloutEngine, rewarder, partial: PartialRollouts, params: SamplingParams,
                 step: int, weights_step: int, tokenizer=None, progress: str | None = None):
        self.engine, self.rewarder, self.partial, self.params = engine, rewarder, partial, params
        self.step, self.weights_step, self.tokenizer, self.progress = step, weights_step, tokenizer, progress
        self._pending: dict[tuple[int, int], list] = {}
        self._generated: concurrent.futures.Future[PartialStep] | None = None
        self._gen_s = 0.0
        self._first_submit: float | None = None

    def start_in_background(self) -> None:
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="partial-rollout")
        self._generated = executor.submit(self._generate)
        executor.shutdown(wait=False)

    def wait_generated(self) -> None:
        if self._generated is not None:
            self._generated.result()

    def finish(self, on_generated: Callable[[], None] | None = None) -> tuple[list, dict[str, float]]:
        start = time.perf_counter()
        out = self._generated.result() if self._generated is not None else self._generate()
        here = jax.process_index()
        counts = np.array([out.continued, out.carried, out.dropped_stale], np.float64)
        if jax.process_count() > 1:
            mine = ([(g.prompt, completions(g, self.tokenizer)) for g in out.groups], counts)
            gathered = allgather_objects(mine)
            for process, (theirs, _) in enumerate(gathered):
                for k, (prompt, group) in enumerate(theirs):
                    if process != here:
                        self._submit((process, k), prompt, group)
            counts = np.sum([c for _, c in gathered], axis=0)
        samples, waited = collect_in_order(self.rewarder, self._pending, self.progress, on_generated)
        end = time.perf_counter()
        metrics = {
            "timing_s/gen": self._gen_s, "timing_s/verify_wait": waited, "timing_s/rollout": end - start,
            **dict(zip(("rollout/partial/continued", "rollout/partial/carried", "rollout/partial/dropped_stale"),
                       map(float, counts))),
        }
        if self._first_submit is not None and self.rewarder.scores_here:
            metrics["timing_s/verify"] = end - self._first_submit
        return samples, metrics

    def _generate(self) -> PartialStep:
        start = time.perf_counter()
        here = jax.process_index()
        submitted = itertools.count()
        out = self.partial.generate(
            self.engine, self.params, self.step, self.weights_step,
            on_group=lambda g: self._submit((here, next(submitted)), g.prompt, completions(g, self.tokenizer)))
        self._gen_s = time.perf_counter() - start
        return out

    def _submit(self, key: tuple[int, int], prompt: Prompt, group: list[Completion]) -> None:
        if self._first_submit is None:
            self._first_submit = time.perf_counter()
        self._pending[key] = self.rewarder.submit(prompt, group)


def _pack(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _unpack(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def _prompt_dict(prompt: Prompt) -> dict:
    return dataclasses.asdict(prompt)


def _prompt(fields: dict) -> Prompt:
    return Prompt(**{**fields, "messages": tuple(fields["messages"]), "token_ids": tuple(fields["token_ids"])})
