"""The verifier interface: what the trainer and evaluation need from whatever checks Lean snippets."""
from __future__ import annotations

import abc
import asyncio
import concurrent.futures
from collections.abc import Iterable, Sequence

from kimina_jax.types import Verdict


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
