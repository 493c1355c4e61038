"""The rollout half of a training step: prompts -> completions -> scored samples, overlapped and across processes.

- Overlap: a process generates its prompts of a step in `rollout.overlap_chunks` engine calls, and each group
  of n completions goes to the reward function as soon as its call returns, so Lean (or a user's reward) checks
  one call's responses while the engine generates the next; when it keeps up, only the last call's are waited
  for (`timing_s/verify_wait`).
- Background generation (one-step off-policy): `StepRollouts.start_in_background` generates in a thread while
  the caller waits for its current step's verdicts and trains; `finish` picks the results up.
- Processes: every process generates its own share of the global batch with its own engine; the completions
  are gathered so that every process holds the whole batch; only process 0 scores them (`MainProcessRewarder`)
  and its results are broadcast, so every process goes on with the same samples, in global batch order.

Seeds: the engine call for the prompts starting at global batch position g samples with `chunk_seed(seed, g)`,
so a step's samples depend on the chunk layout but not on the number of processes when each process's share
is a whole number of chunks.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence

import jax
from tqdm import tqdm

from kimina_jax.errors import KiminaError, VerifierError
from kimina_jax.parallel import allgather_objects, broadcast_object
from kimina_jax.reward import LeanClient, PendingSample, RewardFunction
from kimina_jax.rollout import RolloutEngine, SamplingParams, WrappedEngine
from kimina_jax.types import Completion, Prompt, Sample
from kimina_jax.urls import redact_url

# (global batch position, prompt, its completions) for each prompt of one engine call
Groups = list[tuple[int, Prompt, list[Completion]]]
_SCORED_FIELDS = tuple(f.name for f in dataclasses.fields(Sample) if f.name not in ("prompt", "completion"))


def chunk_seed(seed: int | None, first_index: int) -> int | None:
    """The sampling seed of an engine call whose first prompt sits at `first_index` of the global batch."""
    return None if seed is None else (seed + 1_000_003 * first_index) % 2**31


class MainProcessRewarder:
    """Scoring by process 0 alone, its results broadcast to every process.

    Wraps the `RewardFunction` on process 0 (`None` on the others, which never reach the verifier or the user's
    function). Every process calls `submit` for the same groups and `collect` at the same points; on the others
    `submit` only records the completions. With one process it is the reward function itself.
    """

    def __init__(self, rewarder: RewardFunction | None):
        self.rewarder = rewarder

    @property
    def verifier(self):
        """Process 0's verifier (None with a reward that uses none); None elsewhere."""
        return None if self.rewarder is None else self.rewarder.verifier

    @property
    def scores_here(self) -> bool:
        """Whether this process scores (process 0)."""
        return self.rewarder is not None

    def check_ready(self) -> None:
        """Process 0's start-up check of its Lean server (`LeanClient.check_ready`; nothing for other verifiers),
        its failure raised on every process (none is left waiting for the others); the reward is closed then."""
        failure = None
        if isinstance(self.verifier, LeanClient):
            try:
                self.verifier.check_ready()
            except KiminaError as err:
                failure = str(err)
        failure = broadcast_object(failure)
        if failure is not None:
            self.close()
            raise KiminaError(failure)

    def abandon(self, reason: str) -> None:
        """Process 0 stops waiting for its verifier (`RewardFunction.abandon`)."""
        if self.rewarder is not None:
            self.rewarder.abandon(reason)

    def stats(self) -> dict[str, float]:
        """Process 0's `RewardFunction.stats()`; empty elsewhere."""
        return {} if self.rewarder is None else self.rewarder.stats()

    def submit(self, prompt: Prompt, completions: Sequence[Completion]) -> list[PendingSample]:
        if self.rewarder is None:
            return [PendingSample(prompt, completion) for completion in completions]
        return self.rewarder.submit(prompt, completions)

    def collect(self, pending: Sequence[PendingSample], progress: str | None = None) -> list[Sample]:
        if jax.process_count() == 1:
            return self.rewarder.collect(pending, progress)
        scored = None
        if self.rewarder is not None:
            try:
                samples = self.rewarder.collect(pending, progress)
                scored = [{name: getattr(s, name) for name in _SCORED_FIELDS} for s in samples]
            except VerifierError as err:  # every process must learn of it, not wait for the broadcast forever
                scored = str(err)
        scored = broadcast_object(scored)  # the others hold the prompts and completions already
        if isinstance(scored, str):
            raise VerifierError(scored)
        return [Sample(prompt=p.prompt, completion=p.completion, **fields) for p, fields in zip(pending, scored)]

    def close(self) -> None:
        if self.rewarder is not None:
            self.rewarder.close()


def collect_in_order(
    rewarder: MainProcessRewarder, pending: dict, progress: str | None, on_generated: Callable[[], None] | None
) -> tuple[list[Sample], float]:
    """`on_generated()`, then the scored samples of `pending` (key -> its pending samples) in key order, and the
    seconds waited for them; `progress`: a bar's label."""
    if on_generated is not None:
        on_generated()
    start = time.perf_counter()
    samples = rewarder.collect([p for key in sorted(pending) for p in pending[key]],
                               None if progress is None else f"{progress} verify")
    return samples, time.perf_counter() - start


class UnverifiedSteps:
    """Counts training steps in a row none of whose samples the verifier judged (server down, refusing, broken):
    after `limit` of them (0: never) the run should checkpoint and stop instead of training on nothing. Every
    process holds the same samples, so every process counts alike."""

    def __init__(self, limit: int, url: str | None):
        self.limit, self.url = limit, redact_url(url)
        self.count = 0
        self.last_error = ""

    def update(self, samples: Sequence[Sample]) -> None:
        unjudged = [s.verdict for s in samples if not s.is_verified]
        if len(unjudged) < len(samples) or not samples:
            self.count = 0
            return
        self.count += 1
        self.last_error = unjudged[-1].error or self.last_error

    @property
    def exceeded(self) -> bool:
        return 0 < self.limit <= self.count

    def error(self, step: int) -> KiminaError:
        return KiminaError(
            f"stopped after step {step} (checkpoint written): {self.count} steps in a row had no sample verified by "
            f"the Lean server {self.url} (verifier.max_unverified_steps={self.limit}); last error: {self.last_error}")


class ProcessShardedEngine(WrappedEngine):
    """An engine whose `generate` spreads the prompts over the processes (each one generates a contiguous share
    with its own engine) and gathers the groups, so every process gets all of them (validation across hosts).
    Every process must call `generate` with the same prompts."""

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        share = -(-len(prompt_token_ids) // jax.process_count())
        start = jax.process_index() * share
        mine = prompt_token_ids[start : start + share]
        local = []
        if mine:
            groups = self.engine.generate(mine, dataclasses.replace(params, seed=chunk_seed(params.seed, start)))
            local = [[dataclasses.replace(c, prompt_index=start + i) for c in group] for i, group in enumerate(groups)]
        return [group for part in allgather_objects(local) for group in part]


class StepRollouts:
    """Generation and verification of one training step's prompts (see the module docstring).

    `prompts` are this process's share of the global batch, starting at global position `first_index`. Call
    `finish` on every process at the same point; it returns the scored samples of the whole batch (prompt-major,
    n per prompt) and timings: `timing_s/gen` (engine calls), `timing_s/verify` (first proof sent to last verdict
    in, on process 0), `timing_s/verify_wait` (waiting for verdicts once generation was done) and
    `timing_s/rollout` (the caller's time inside `finish`).
    """

    def __init__(
        self,
        engine: RolloutEngine,
        rewarder: MainProcessRewarder,
        prompts: Sequence[Prompt],
        first_index: int,
        params: SamplingParams,
        chunks: int,
        progress: str | None = None,
    ):
        """`progress`: a label for progress bars of generation (prompts) and verification (samples); None: no bars."""
        self.engine, self.rewarder, self.params = engine, rewarder, params
        self.progress = progress
        size = max(1, -(-len(prompts) // chunks))
        self._chunks = [(first_index + s, list(prompts[s : s + size])) for s in range(0, len(prompts), size)]
        self._pending: dict[int, list[PendingSample]] = {}
        self._generated: concurrent.futures.Future[list[Groups]] | None = None
        self._gen_s = 0.0
        self._first_submit: float | None = None

    def start_in_background(self) -> None:
        """Generate every call now, in a thread; process 0 sends its groups for verification as they come."""
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        self._generated = executor.submit(lambda: list(self._generate()))
        executor.shutdown(wait=False)

    def wait_generated(self) -> None:
        """Block until background generation is over (before the engine's weights change); re-raises its error."""
        if self._generated is not None:
            self._generated.result()

    def finish(self, on_generated: Callable[[], None] | None = None) -> tuple[list[Sample], dict[str, float]]:
        """`on_generated`: called once every call is generated and exchanged, before waiting for the verdicts
        (the engine is free from then on)."""
        start = time.perf_counter()
        calls = self._generated.result() if self._generated is not None else self._generate()
        for groups in calls:  # generated inline: each call's groups are exchanged before the next call starts
            self._exchange(groups)
        samples, waited = collect_in_order(self.rewarder, self._pending, self.progress, on_generated)
        end = time.perf_counter()
        timings = {
            "timing_s/gen": self._gen_s,
            "timing_s/verify_wait": waited,
            "timing_s/rollout": end - start,
        }
        if self._first_submit is not None and self.rewarder.scores_here:
            timings["timing_s/verify"] = end - self._first_submit
        return samples, timings

    def _generate(self) -> Iterator[Groups]:
        total = sum(len(prompts) for _, prompts in self._chunks)
        label = f"{self.progress} rollout"
        with tqdm(total=total, desc=label, unit="prompt", leave=False, disable=self.progress is None) as bar:
            for groups in self._generate_calls():
                bar.update(len(groups))
                yield groups

    def _generate_calls(self) -> Iterator[Groups]:
        for first, prompts in self._chunks:
            start = time.perf_counter()
            params = dataclasses.replace(self.params, seed=chunk_seed(self.params.seed, first))
            completions = self.engine.generate([p.token_ids for p in prompts], params)
            self._gen_s += time.perf_counter() - start
            groups = [
                (first + i, prompt, [dataclasses.replace(c, prompt_index=first + i) for c in group])
                for i, (prompt, group) in enumerate(zip(prompts, completions))
            ]
            self._submit(groups)
            yield groups

    def _exchange(self, groups: Groups) -> None:
        """Hand this call's groups to the other processes and submit theirs (a collective; main thread only)."""
        if jax.process_count() == 1:
            return
        for process, theirs in enumerate(allgather_objects(groups)):
            if process != jax.process_index():
                self._submit(theirs)

    def _submit(self, groups: Groups) -> None:
        if self._first_submit is None:
            self._first_submit = time.perf_counter()
        for index, prompt, completions in groups:
            self._pending[index] = self.rewarder.submit(prompt, completions)
