"""Client for the Kimina Lean Server (SPEC 11): batched, bounded, retrying, cached, never losing a snippet.

How a server reply becomes a `Verdict` (SPEC 6):
- `valid`: a command response with no `error`-severity message and no sorries (warnings allowed).
- `sorry`: sorries and no errors; `lean_error`: an error message; `repl_error`: the REPL answered `{"message": ...}`;
  `timeout`: the server's Lean timeout (`Lean REPL command timed out in N seconds`). These four are acc 0.
- `server_error`: the server kept answering this snippet with an error about its own machinery (`No available
  REPLs`, REPL died, header import timed out, ...) after all retries; `unverified`: no usable answer after all
  retries (connection refused, HTTP 429/5xx/499/504, transport timeout). A snippet is retried at least `retries`
  times and then for as long as `retry_budget_s` since its first failure allows, so a server restart costs
  latency, not samples. Neither judges the proof: the trainer leaves them out of the loss and of accuracy
  (`Verdict.is_verified` is False).
HTTP 401 (bad or missing key), 422 (bad request) and other client errors are not retried: they raise
VerifierError. `check_ready()` is the start-up check: /health and one authenticated request, failing fast with a
clear error. `abandon()` stops waiting (a run stopping on SIGTERM): whatever is unanswered becomes `unverified`.
Only Lean's own judgements (`valid`, `sorry`, `lean_error`) are cached: a timeout under load, a REPL error or an
unanswered snippet is checked again when the same code comes back.

Message line numbers count from the code after its import header on server 2.0.0 and kimina-ast-server 2.1.3,
and from the top of the snippet on upstream builds since 2025-10-24 that still report 2.0.0 (SPEC 11). With
`message_lines="auto"` the client sends `PROBE_CODE`, whose error line is known, before its first request and
keeps the convention the answer shows.

The client runs its own event loop in a background thread with one pooled `httpx.AsyncClient`, so the trainer can
`submit()` snippets as completions arrive and collect verdicts later, call `check_sync()` from plain code, or
`await check()` from any event loop.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import random
import threading
from collections.abc import Iterable
from typing import Literal

import httpx

from kimina_jax.errors import KiminaError, VerifierError
from kimina_jax.reward.base import Verifier
from kimina_jax.reward.lean_text import split_header
from kimina_jax.types import Verdict
from kimina_jax.urls import server_address

logger = logging.getLogger(__name__)

RETRYABLE_HTTP_STATUSES = frozenset({408, 425, 429, 499, 500, 502, 503, 504})
CACHED_STATUSES = frozenset({"valid", "sorry", "lean_error"})  # Lean's judgements; the rest may change on a retry
# The stray `)` is an error on line 2 of the body (Lean and the stand-in agree), line 4 of the whole snippet.
PROBE_CODE = ("import Mathlib\n\n-- kimina-jax: on which line does the server report the error below?\n"
              "example : True := trivial)")
PROBE_ERROR_LINE = {"body": 2, "code": 4}


def verdict_from_result(result: dict, line_offset: int) -> Verdict | None:
    """The verdict for one entry of `/api/check`'s `results`, or None when the entry asks for a retry."""
    time_s = float(result.get("time") or 0.0)
    error = result.get("error")
    if error:
        if "timed out" in error and "header" not in error:
            return Verdict("timeout", time_s=time_s, error=error, line_offset=line_offset)
        return None  # no free REPL, REPL died, header import timed out...: the server's trouble, not the proof's
    response = result.get("response")
    if not isinstance(response, dict):
        return None
    if "message" in response:
        return Verdict("repl_error", time_s=time_s, error=str(response["message"]), line_offset=line_offset)
    messages = tuple(response.get("messages") or ())
    if any(m.get("severity") == "error" for m in messages):
        status = "lean_error"
    elif response.get("sorries"):
        status = "sorry"
    else:
        status = "valid"
    return Verdict(status, messages=messages, time_s=time_s, line_offset=line_offset)


@dataclasses.dataclass(eq=False)
class _Job:
    """One distinct code being checked, and every future waiting for its verdict."""

    code: str
    futures: list[concurrent.futures.Future[Verdict]]
    attempts: int = 0
    failed_at: float | None = None  # the event loop's time of the first failure: the retry budget counts from it


def _resolve(future: concurrent.futures.Future[Verdict], verdict: Verdict) -> None:
    if not future.done():
        future.set_result(verdict)


class LeanClient(Verifier):
    """HTTP client of the Kimina Lean Server. Defaults are the recipe's (SPEC 6).

    url: server address, e.g. `http://localhost` (`LEAN_SERVER_API_URL`); api_key: sent as `Authorization:
    Bearer` when set, never logged. timeout_s: Lean's time per snippet. batch_size snippets per request, at most
    max_in_flight requests at once. A failed snippet is retried at least `retries` times, then until
    `retry_budget_s` has passed since its first failure (0 here: `retries` alone; the recipe's
    verifier.retry_budget_s is 120 s), waiting backoff_s doubling each time, capped at backoff_max_s, times a jitter
    of 0.5..1 (so that requests failed together come back spread out). http_timeout_s: transport timeout of one
    request; by default 2 x timeout_s + 30 s: the server checks a request's snippets in parallel, each at most
    timeout_s for its import header and timeout_s for its body, so longer means a hung or overloaded server (the
    request is retried). cache_size: Lean's judgements kept by exact code (0 disables). message_lines: what the server's message line
    numbers count from: "body" (the code after its import header: server 2.0.0 and kimina-ast-server 2.1.3),
    "code" (the whole snippet: later upstream builds that shift them back), or "auto": probe the server lazily,
    just before the first request, so constructing the client never needs the server. A probe that gets no usable
    answer (server down, busy, timed out) is tried again with the next request, and that request's snippets are
    retried as if it had failed; an answer that fits neither convention, or HTTP 401/422, raises VerifierError from
    the verdicts' futures.
    """

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        *,
        timeout_s: int = 60,
        batch_size: int = 8,
        max_in_flight: int = 40,
        retries: int = 3,
        retry_budget_s: float = 0.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 10.0,
        http_timeout_s: float | None = None,
        cache_size: int = 100_000,
        message_lines: Literal["auto", "body", "code"] = "auto",
        batch_linger_s: float = 0.02,
    ) -> None:
        for name, value in (("timeout_s", timeout_s), ("batch_size", batch_size), ("max_in_flight", max_in_flight)):
            if value < 1:
                raise KiminaError(f"LeanClient {name}: must be >= 1, got {value}")
        if min(retries, cache_size, retry_budget_s) < 0:
            raise KiminaError(f"LeanClient retries / cache_size / retry_budget_s: must be >= 0, got {retries} / "
                              f"{cache_size} / {retry_budget_s}")
        if message_lines not in ("auto", "body", "code"):
            raise KiminaError(f"LeanClient message_lines: expected 'auto', 'body' or 'code', got {message_lines!r}")
        self.url, self._auth = server_address(url, "LeanClient url")  # credentials stay out of every message
        self.timeout_s = int(timeout_s)
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.retries = retries
        self.retry_budget_s = retry_budget_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.http_timeout_s = http_timeout_s or float(2 * timeout_s + 30)
        self.cache_size = cache_size
        self.message_lines = message_lines
        self.batch_linger_s = batch_linger_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

        self.requests = 0  # HTTP requests sent to /api/check, retries included
        self.retried = 0  # snippet retries scheduled
        self.cache_hits = 0  # answered from the cache or joined an identical snippet in flight
        self.cache_misses = 0
        self.status_counts: collections.Counter[str] = collections.Counter()

        self._cache: collections.OrderedDict[str, Verdict] = collections.OrderedDict()
        self._in_flight: dict[str, _Job] = {}
        self._tasks: set[asyncio.Task] = set()
        self._closed = False
        self._abandoned: str | None = None  # why verification was abandoned; from then on nothing is sent
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="lean-client", daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result()

    def __repr__(self) -> str:
        return f"LeanClient(url={self.url!r}, batch_size={self.batch_size}, max_in_flight={self.max_in_flight})"

    @property
    def cache_hit_rate(self) -> float:
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else 0.0

    def stats(self) -> dict[str, float]:
        return {"reward/cache_hit_rate": self.cache_hit_rate}

    async def _start(self) -> None:
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._slots = asyncio.Semaphore(self.max_in_flight)
        self._probe_lock = asyncio.Lock()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            auth=self._auth,
            headers=self._headers,
            timeout=httpx.Timeout(self.http_timeout_s, connect=min(10.0, self.http_timeout_s)),
            limits=httpx.Limits(max_connections=self.max_in_flight, max_keepalive_connections=self.max_in_flight),
        )
        self._dispatcher = asyncio.create_task(self._dispatch())

    # -- public API --------------------------------------------------------------------------------------------

    def submit(self, snippets: Iterable[str]) -> list[concurrent.futures.Future[Verdict]]:
        if self._closed:
            raise KiminaError("LeanClient.submit: the client is closed")
        codes = list(snippets)
        for i, code in enumerate(codes):
            if not isinstance(code, str):
                raise KiminaError(f"LeanClient.submit: snippet {i} is {type(code).__name__}, expected str")
        futures: list[concurrent.futures.Future[Verdict]] = [concurrent.futures.Future() for _ in codes]
        self._loop.call_soon_threadsafe(self._enqueue, codes, futures)
        return futures

    def health(self) -> bool:
        async def probe() -> bool:
            response = await self._http.get("/health", timeout=10.0)
            return response.status_code == 200 and response.json().get("status") == "ok"

        try:
            return asyncio.run_coroutine_threadsafe(probe(), self._loop).result()
        except (httpx.HTTPError, ValueError):
            return False

    def check_ready(self) -> None:
        """The start-up check: KiminaError naming the URL (never the key) unless the server answers `/health`
        and then checks one snippet with the key (/health asks for none, so only that request tells a wrong key
        apart). Not retried: a run should fail at once, before any compute, not after the retry budget."""
        async def ready() -> None:
            try:
                health = await self._http.get("/health", timeout=10.0)
                if health.status_code != 200:
                    raise KiminaError(f"the Lean server {self.url}/health answered HTTP {health.status_code}: "
                                      f"{health.text[:200]}")
                unsure = await self._probe(always=True)
            except httpx.TransportError as exc:
                raise KiminaError(f"the Lean server {self.url} is unreachable ({type(exc).__name__}: {exc}); "
                                  "is it running, and is LEAN_SERVER_API_URL right?") from None
            if unsure:
                raise KiminaError(f"the Lean server {self.url} did not check a test snippet: {unsure}")

        asyncio.run_coroutine_threadsafe(ready(), self._loop).result()

    def abandon(self, reason: str) -> None:
        """Stop checking: every snippet waiting for an answer, and every one submitted from now on, comes back
        `unverified` with `reason` at once; requests in flight are cancelled."""
        if not self._closed:
            asyncio.run_coroutine_threadsafe(self._abandon(reason), self._loop).result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    # -- inside the client's event loop ------------------------------------------------------------------------

    def _enqueue(self, codes: list[str], futures: list[concurrent.futures.Future[Verdict]]) -> None:
        for code, future in zip(codes, futures, strict=True):
            if self._abandoned is not None:
                _resolve(future, Verdict("unverified", error=self._abandoned, line_offset=self._line_offset(code)))
            elif code in self._cache:
                self._cache.move_to_end(code)
                self.cache_hits += 1
                _resolve(future, self._cache[code])
            elif code in self._in_flight:
                self.cache_hits += 1
                self._in_flight[code].futures.append(future)
            else:
                self.cache_misses += 1
                job = self._in_flight[code] = _Job(code, [future])
                self._queue.put_nowait(job)

    async def _dispatch(self) -> None:
        while True:
            await self._slots.acquire()
            batch = [await self._queue.get()]
            if self._queue.qsize() < self.batch_size - 1:
                await asyncio.sleep(self.batch_linger_s)  # let snippets submitted one by one share a request
            while len(batch) < self.batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [job for job in batch if self._in_flight.get(job.code) is job]  # none abandoned meanwhile
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, jobs: list[_Job]) -> None:
        try:
            await self._post(jobs)
        except Exception as exc:  # a bug here must not leave futures waiting forever
            self._fail(jobs, exc)

    def _payload(self, codes: list[str]) -> dict:
        return {
            "snippets": [{"id": str(i), "code": code} for i, code in enumerate(codes)],
            "timeout": self.timeout_s,
            "debug": False,
            "reuse": True,
            "infotree": None,
        }

    async def _post(self, jobs: list[_Job]) -> None:
        try:
            unsure = await self._probe() if self.message_lines == "auto" else None
            if unsure:
                self._retry(jobs, unsure, "unverified")
                return
            self.requests += 1
            response = await self._http.post("/api/check", json=self._payload([job.code for job in jobs]))
        except httpx.TransportError as exc:
            self._retry(jobs, f"{type(exc).__name__} talking to {self.url}: {exc}".rstrip(": "), "unverified")
            return
        finally:
            self._slots.release()

        if response.status_code == 200:
            results = self._results_by_id(response)
            if results is None:
                self._retry(jobs, f"malformed reply from {self.url}/api/check: {response.text[:200]!r}", "unverified")
                return
            retry = []
            for i, job in enumerate(jobs):
                result = results.get(str(i), {"error": "the reply has no result for this snippet"})
                verdict = verdict_from_result(result, self._line_offset(job.code))
                if verdict is None:
                    retry.append((job, str(result.get("error") or f"unusable result {result!r:.200}")))
                else:
                    self._finish(job, verdict)
            for job, reason in retry:
                self._retry([job], reason, "server_error")
        elif response.status_code in RETRYABLE_HTTP_STATUSES:
            reason = f"HTTP {response.status_code} from {self.url}/api/check: {response.text[:200]}"
            self._retry(jobs, reason, "unverified")
        else:
            self._fail(jobs, self._client_error(response))

    async def _probe(self, always: bool = False) -> str | None:
        """Settle message_lines "auto" with PROBE_CODE (`always`: send it even when settled, as a test that the
        server checks code); the reason when the server's answer could not tell."""
        async with self._probe_lock:
            if self.message_lines != "auto" and not always:  # settled by another request while this one waited
                return None
            self.requests += 1
            response = await self._http.post("/api/check", json=self._payload([PROBE_CODE]))
            if response.status_code in RETRYABLE_HTTP_STATUSES:
                return (f"HTTP {response.status_code} from {self.url}/api/check to the line-number probe: "
                        f"{response.text[:200]}")
            if response.status_code != 200:
                raise self._client_error(response)
            result = (self._results_by_id(response) or {}).get("0", {})
            verdict = verdict_from_result(result, 0)
            if verdict is None or verdict.status in ("timeout", "repl_error"):
                return f"no usable answer to the line-number probe from {self.url}: {result!r:.200}"
            if self.message_lines != "auto":
                return None
            lines = [(m.get("pos") or {}).get("line") for m in verdict.messages if m.get("severity") == "error"]
            picked = {line: name for name, line in PROBE_ERROR_LINE.items()}.get(lines[0] if lines else None)
            if picked is None:
                raise VerifierError(
                    f"verifier.message_lines 'auto': the Lean server {self.url} reported error lines {lines} for a "
                    f"probe whose error is on line {PROBE_ERROR_LINE['body']} of its body, "
                    f"{PROBE_ERROR_LINE['code']} of the whole snippet; set verifier.message_lines to 'body' or 'code'")
            self.message_lines = picked
            logger.info("Lean server %s counts message lines from the %s (probe): verifier.message_lines auto -> %r",
                        self.url, "code after the imports" if picked == "body" else "top of the snippet", picked)
            return None

    @staticmethod
    def _results_by_id(response: httpx.Response) -> dict[str, dict] | None:
        try:
            results = response.json()["results"]
            return {str(r["id"]): r for r in results if isinstance(r, dict)}
        except (ValueError, KeyError, TypeError):
            return None

    def _client_error(self, response: httpx.Response) -> VerifierError:
        detail = response.text[:300]
        if response.status_code == 401:
            hint = ("set LEAN_SERVER_API_KEY to the server's key" if self._headers
                    else "the server wants an API key: set LEAN_SERVER_API_KEY")
            return VerifierError(f"Lean server {self.url} refused the request (HTTP 401: {detail}); {hint}")
        return VerifierError(f"Lean server {self.url}/api/check answered HTTP {response.status_code}: {detail}")

    def _line_offset(self, code: str) -> int:
        return split_header(code)[2] if self.message_lines == "body" else 0

    def _retry(self, jobs: list[_Job], reason: str, final_status: Literal["unverified", "server_error"]) -> None:
        now, again = self._loop.time(), []
        for job in jobs:
            job.attempts += 1
            job.failed_at = now if job.failed_at is None else job.failed_at
            if job.attempts > self.retries and now - job.failed_at >= self.retry_budget_s:
                self._finish(job, Verdict(final_status, error=reason, line_offset=self._line_offset(job.code)))
            else:
                again.append(job)
        if not again:
            logger.warning("Lean server: %s; %d snippet(s) left %s after %d+ retries and %.0f s",
                           reason, len(jobs), final_status, self.retries, self.retry_budget_s)
            return
        self.retried += len(again)
        logger.info("Lean server: %s; retrying %d snippet(s)", reason, len(again))
        jitter = random.uniform(0.5, 1.0)  # one draw per failure, so a failed request's snippets stay together
        for attempts in sorted({job.attempts for job in again}):
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempts - 1)) * jitter
            self._loop.call_later(delay, self._requeue, [job for job in again if job.attempts == attempts])

    def _requeue(self, jobs: list[_Job]) -> None:
        for job in jobs:
            if job.code in self._in_flight:  # else abandoned while it waited
                self._queue.put_nowait(job)

    def _finish(self, job: _Job, verdict: Verdict) -> None:
        self._in_flight.pop(job.code, None)
        self.status_counts[verdict.status] += 1
        if verdict.status in CACHED_STATUSES and self.cache_size:
            self._cache[job.code] = verdict
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        for future in job.futures:
            _resolve(future, verdict)

    def _fail(self, jobs: list[_Job], error: Exception) -> None:
        for job in jobs:
            self._in_flight.pop(job.code, None)
            for future in job.futures:
                if not future.done():
                    future.set_exception(error)

    async def _abandon(self, reason: str) -> None:
        self._abandoned = reason
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        while not self._queue.empty():
            self._queue.get_nowait()
        jobs = list(self._in_flight.values())
        for job in jobs:
            self._finish(job, Verdict("unverified", error=reason, line_offset=self._line_offset(job.code)))
        if jobs:
            logger.warning("Lean server %s: %d snippet(s) left unverified: %s", self.url, len(jobs), reason)

    async def _shutdown(self) -> None:
        self._dispatcher.cancel()
        await self._abandon("the Lean client was closed before an answer came")
        await asyncio.gather(self._dispatcher, return_exceptions=True)
        await self._http.aclose()
