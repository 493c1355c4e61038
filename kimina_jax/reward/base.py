"""The interfaces of the reward room: `Verifier` (whatever checks Lean snippets) and `RewardFunction` (completions
-> scored samples: the built-in format x Lean reward or a user's function), with what a user's function receives."""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence

from tqdm import tqdm

from kimina_jax.types import Completion, Prompt, Sample, Verdict


class Verifier(abc.ABC):
    """Verdicts for Lean snippets, in input order. Also a context manager (`close` on exit)."""

    @abc.abstractmethod
    def submit(self, snippets: Iterable[str]) -> list[concurrent.futures.Future[Verdict]]:
        """Start checking `snippets` now; one future per snippet, in order."""

    @abc.abstractmethod
    def health(self) -> bool:
        """Whether the verifier can answer now."""

    def stats(self) -> dict[str, float]:
        """Metrics of the verifier's work so far, by their logged names (`reward/...`); none by default."""
        return {}

    def abandon(self, reason: str) -> None:
        """Stop waiting for answers: what is unanswered, and what comes later, is `unverified` with `reason`
        (a run stopping on SIGTERM). Nothing by default: a local verifier answers quickly."""

    def close(self) -> None:
        """Release what the verifier holds."""

    @staticmethod
    def collect(futures: Sequence[concurrent.futures.Future[Verdict]]) -> list[Verdict]:
        """Wait for the verdicts of earlier `submit` calls."""
        return [future.result() for future in futures]

    def check_sync(self, snippets: Iterable[str]) -> list[Verdict]:
        """Verdicts for `snippets`, in order (blocking)."""
        return self.collect(self.submit(snippets))

    async def check(self, snippets: Iterable[str]) -> list[Verdict]:
        """Verdicts for `snippets`, in order (from any event loop)."""
        return list(await asyncio.gather(*(asyncio.wrap_future(f) for f in self.submit(snippets))))

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclasses.dataclass(frozen=True)
class RewardInput:
    """What a user's reward function receives for one response (verl's custom reward arguments, in spirit).

    extra_info holds `turn`, `formal_statement`, `sample_index` and `finish_reason`.
    """

    data_source: str
    statement_id: str
    messages: tuple[dict, ...]  # the prompt's chat messages
    response: str
    response_ids: tuple[int, ...]
    extra_info: dict


@dataclasses.dataclass(frozen=True)
class PendingSample:
    """A completion handed to a reward function and being scored; each reward function subclasses it with what
    its `collect` needs."""

    prompt: Prompt
    completion: Completion


class RewardFunction(abc.ABC):
    """Completions -> scored `Sample`s in two halves: `submit` starts scoring (non-blocking, so a caller keeps
    generating meanwhile) and `collect` waits for it. Also a context manager (`close` on exit)."""

    verifier: Verifier | None = None  # the Lean verifier, for rewards that use one

    @abc.abstractmethod
    def submit(self, prompt: Prompt, completions: Sequence[Completion]) -> list[PendingSample]:
        """Start scoring `completions` of `prompt`; one pending sample per completion, in order."""

    @abc.abstractmethod
    def collect(self, pending: Sequence[PendingSample], progress: str | None = None) -> list[Sample]:
        """The scored samples of earlier `submit` calls, in order; `progress` labels a progress bar."""

    def stats(self) -> dict[str, float]:
        """Metrics of the work so far, by their logged names (`reward/...`); none by default."""
        return {}

    def abandon(self, reason: str) -> None:
        """Stop waiting for the verifier (`Verifier.abandon`); a reward function's own work is waited for."""
        if self.verifier is not None:
            self.verifier.abandon(reason)

    def close(self) -> None:
        """Release what the reward function holds."""

    def score_groups(self, prompts: Sequence[Prompt], groups: Sequence[Sequence[Completion]]) -> list[Sample]:
        """Scores every group (all in flight together); samples come back flat, in order."""
        pending = [p for prompt, group in zip(prompts, groups) for p in self.submit(prompt, group)]
        return self.collect(pending)

    def __enter__(self) -> RewardFunction:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def wait_all(futures: Iterable[concurrent.futures.Future], progress: str | None, unit: str) -> None:
    """Wait until every future is done, with a progress bar labelled `progress` (none when None)."""
    futures = set(futures)
    with tqdm(total=len(futures), desc=progress, unit=unit, leave=False, disable=progress is None) as bar:
        for _ in concurrent.futures.as_completed(futures):
            bar.update()


def extra_means(samples: Sequence[Sample]) -> dict[str, float]:
    """`reward_extra/<name>/mean` of each extra value, over the samples that carry it."""
    values: dict[str, list[float]] = defaultdict(list)
    for sample in samples:
        for name, value in sample.extras.items():
            values[name].append(value)
    return {f"reward_extra/{name}/mean": sum(v) / len(v) for name, v in sorted(values.items())}
