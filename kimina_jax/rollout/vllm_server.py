"""Engine `vllm-server`: a pool of vLLM OpenAI-compatible servers (launch/vllm_server.sh), fed weights through
storage that the trainer and every server can read at the same path.

- Start: each server's settings come from `GET /server_info` (served only in vLLM's dev mode, which the weight
  reload needs too). The shortest `max_model_len` bounds the prompts, weights are written in the servers' dtype,
  each server's batch size bounds its load, and a server that does not report `processed_logprobs` (the
  trainer's definition, see vllm_engine.py) is refused. A server started with random weights (`--load-format
  dummy`) is switched to reading safetensors (the worker's `update_config`): the dummy loader cannot reload.
- `generate`: one `POST /v1/completions` per prompt: the prompt as token ids, the sampling fields and seed of
  `vllm_adapter.py` (as the in-process engine), `return_token_ids`, and `return_tokens_as_token_ids` for the
  log-probs (the servers need no tokenizer; text is decoded here). A prompt goes to the live server with the fewest
  sequences in flight, and a server takes at most one batch at once (its `max_num_seqs`, or `max_seqs_in_flight`),
  so the rest wait here and go to whichever server frees room first: faster servers take more.
- Failures: a request that fails in transport (refused, reset, timed out), gets a 5xx / 408 / 429, or comes back
  aborted is retried on the same server after `retry_delay_s`, doubled each time, up to `retries` times. Then
  the server leaves the pool for good, with a warning, and its prompts (those in flight too) go to the others.
  A prompt's n samples always come from one complete reply, so nothing is lost or mixed. With no server left,
  KiminaError. Another 4xx is the request's fault: KiminaError at once, with the server's message.
- `update_weights`: the HF folder is written to `weights_dir` (`save_hf_checkpoint`; for tied models with
  `lm_head.weight`, which vLLM's reload needs, see weights.py), then every server gets
  `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": weights_dir}}` and
  `POST /reset_prefix_cache` (cached prompt KV was computed with the old weights); failures as above.
  Several JAX processes (each sampling its share of the prompts from the same pool): each passes the whole
  model (the trainer gathers one per process), process 0 alone writes and reloads, and every process waits
  for its outcome before going on.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import jax

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3Config, save_hf_checkpoint
from kimina_jax.parallel import broadcast_object
from kimina_jax.rollout.base import SamplingParams
from kimina_jax.rollout.vllm_adapter import SAFETENSORS_LOADER, VllmAdapter, dtype_name
from kimina_jax.types import Completion
from kimina_jax.urls import server_address

log = logging.getLogger(__name__)

RETRYABLE_HTTP_STATUSES = frozenset({408, 429})
LAUNCH_HINT = "start it with launch/vllm_server.sh (VLLM_SERVER_DEV_MODE=1, --logprobs-mode processed_logprobs)"


@dataclasses.dataclass(eq=False)
class ServerState:
    """One server of the pool: whether it is still used, and its load."""

    url: str  # without credentials: shown in messages
    auth: httpx.BasicAuth | None = None  # from credentials in the given address
    alive: bool = True
    max_seqs: int = 0  # sequences it takes at once: its batch size (max_num_seqs)
    seqs_in_flight: int = 0
    prompts_done: int = 0  # prompts it answered, over the engine's life
    trouble: str = ""  # the failure it was dropped for


class VllmServerEngine(VllmAdapter):
    """Rollouts on remote vLLM servers. `config` is the served model's (vocabulary, EOS ids, weight checks).

    `servers` holds each server's state (alive, load, prompts answered); `max_model_len` and `dtype` are the
    pool's; `last_sync_s` is the duration of the last weight push (writing the folder and every reload).
    `generate` and `update_weights` run their own event loop: call them from plain (not async) code.
    `max_seqs_in_flight` caps each server's load (default: its batch size, vLLM's `max_num_seqs`).
    """

    def __init__(
        self,
        urls: Sequence[str],
        weights_dir: str | Path,
        config: Qwen3Config,
        *,
        tokenizer=None,
        eos_token_ids: Sequence[int] | None = None,
        timeout_s: float = 3600.0,
        retries: int = 3,
        retry_delay_s: float = 1.0,
        max_seqs_in_flight: int | None = None,
    ):
        if not urls:
            raise KiminaError("rollout.servers.urls: no vLLM server given")
        if retries < 0 or timeout_s <= 0 or (max_seqs_in_flight is not None and max_seqs_in_flight < 1):
            raise KiminaError(
                f"vllm-server: need retries >= 0, timeout_s > 0, max_seqs_in_flight >= 1 "
                f"(got {retries}, {timeout_s}, {max_seqs_in_flight})"
            )
        super().__init__(config, tokenizer=tokenizer, eos_token_ids=eos_token_ids)
        self.servers = [ServerState(*server_address(url, "rollout.servers.urls")) for url in urls]
        self.weights_dir = Path(os.path.abspath(weights_dir))
        self.timeout_s = timeout_s
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self.max_seqs_in_flight = max_seqs_in_flight
        self.max_model_len, self.dtype = asyncio.run(self._read_settings())

    @classmethod
    def from_config(cls, cfg, config: Qwen3Config, **kwargs) -> "VllmServerEngine":
        """From the recipe's `rollout.servers` section (`config.ServerPoolConfig`); `kwargs` as for the constructor."""
        if not cfg.weights_dir:
            raise KiminaError("rollout.servers.weights_dir: not set (storage every server can read)")
        return cls(cfg.urls, cfg.weights_dir, config, timeout_s=cfg.timeout_s, retries=cfg.retries, **kwargs)

    @property
    def live_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.alive]

    # ------------------------------------------------------------------------------------------------ start
    async def _read_settings(self) -> tuple[int, str]:
        async with _Session(self) as session:
            settings = await asyncio.gather(*(self._server_settings(session, s) for s in self.servers))
        found = {s.url: values for s, values in zip(self.servers, settings) if values is not None}
        if not found:
            raise self._all_gone()
        dtypes = {url: dtype for url, (_, dtype) in found.items()}
        if len(set(dtypes.values())) > 1:
            raise KiminaError(f"vllm-server: the servers run different dtypes: {dtypes}")
        return min(length for length, _ in found.values()), next(iter(dtypes.values()))

    async def _server_settings(self, session: _Session, server: ServerState) -> tuple[int, str] | None:
        try:
            info = await session.call(server, "GET", "/server_info", params={"config_format": "json"},
                                      hint=f"is it in dev mode? {LAUNCH_HINT}")
        except _ServerGone:
            return None
        try:
            config = info["vllm_config"]
            model = config["model_config"]
            mode, dtype, length = model["logprobs_mode"], model["dtype"], int(model["max_model_len"])
            batch = int(config["scheduler_config"]["max_num_seqs"])
            load_format = config["load_config"]["load_format"]
        except (KeyError, TypeError, ValueError) as err:
            raise KiminaError(f"{server.url}/server_info: no vllm_config field {err} in the reply") from err
        if mode != "processed_logprobs":
            raise KiminaError(f"{server.url}: reports {mode!r} log-probs, not 'processed_logprobs': {LAUNCH_HINT}")
        dtype = dtype_name(dtype, server.url)
        if load_format == "dummy":
            switch = {"method": "update_config", "kwargs": {"overrides": SAFETENSORS_LOADER}}
            try:
                await session.call(server, "POST", "/collective_rpc", json=switch, hint=LAUNCH_HINT)
            except _ServerGone:
                return None
        server.max_seqs = self.max_seqs_in_flight or batch
        return length, dtype

    # ------------------------------------------------------------------------------------------------ generate
    def _sample(self, prompts: list[tuple[int, ...]], params: SamplingParams) -> list[list[Completion]]:
        requests = [
            {"prompt": list(prompt), **self._request(params, i), "return_token_ids": True,
             "return_tokens_as_token_ids": True}
            for i, prompt in enumerate(prompts)
        ]
        return asyncio.run(self._generate(requests))

    async def _generate(self, requests: list[dict]) -> list[list[Completion]]:
        async with _Session(self) as session:
            tasks = [asyncio.create_task(self._complete(session, i, r)) for i, r in enumerate(requests)]
            try:
                return list(await asyncio.gather(*tasks))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _complete(self, session: _Session, prompt_index: int, request: dict) -> list[Completion]:
        """Prompt `prompt_index`'s n completions, from the first server that answers them all."""
        n = request["n"]
        while True:
            server = await session.acquire(n)
            try:
                reply = await session.call(server, "POST", "/v1/completions", json=request, retry_if=_aborted)
            except _ServerGone:
                continue
            finally:
                await session.release(server, n)
            server.prompts_done += 1
            where = f"{server.url}/v1/completions (prompt {prompt_index})"
            try:
                samples = [(c["index"], c["token_ids"], c["logprobs"]["token_logprobs"], c["finish_reason"])
                           for c in reply["choices"]]
            except (KeyError, TypeError) as err:
                raise KiminaError(f"{where}: malformed reply, no {err} ({str(reply)[:300]})") from err
            return self._completions(prompt_index, samples, n, where)

    # ------------------------------------------------------------------------------------------------ weights
    def _push_weights(self, model) -> None:
        """Every process passes the whole model; process 0 alone writes and reloads."""
        if jax.process_count() == 1:
            self._push(model)
        else:
            self._push_from_process_zero(model)

    def _push(self, model) -> None:
        save_hf_checkpoint(model, self.weights_dir, dtype=self.dtype, tied_lm_head=True)
        asyncio.run(self._reload_all())

    def _push_from_process_zero(self, model) -> None:
        # The others wait for the outcome: none may sample from servers still holding the old weights, and a
        # failed push must stop every process rather than leave them waiting.
        error = None
        if jax.process_index() == 0:
            try:
                self._push(model)
            except Exception as err:  # noqa: BLE001 (re-raised below, after the others heard of it)
                error = err
        outcome = broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if outcome is not None:
            raise KiminaError(f"vllm-server: the weight push failed on process 0: {outcome}")

    async def _reload_all(self) -> None:
        async with _Session(self) as session:
            await asyncio.gather(*(self._reload(session, s) for s in self.servers if s.alive))
        if not self.live_urls:
            raise self._all_gone()

    async def _reload(self, session: _Session, server: ServerState) -> None:
        reload = {"method": "reload_weights", "kwargs": {"weights_path": str(self.weights_dir)}}
        try:
            await session.call(server, "POST", "/collective_rpc", json=reload, hint=LAUNCH_HINT)
            await session.call(server, "POST", "/reset_prefix_cache", retry_if=_not_reset)
        except _ServerGone:
            pass

    # ------------------------------------------------------------------------------------------------ the rest
    def close(self) -> None:
        self._closed = True  # the servers belong to whoever started them

    def _all_gone(self) -> KiminaError:
        why = "; ".join(f"{s.url}: {s.trouble}" for s in self.servers)
        return KiminaError(f"vllm-server: no vLLM server is left in the pool ({why})")


class _ServerGone(Exception):
    """The server was dropped from the pool; the work goes elsewhere."""


def _aborted(reply: dict) -> str | None:
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if any(isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices or []):
        return "the request was aborted"
    return None


def _not_reset(reply: dict) -> str | None:
    return None if isinstance(reply, dict) and reply.get("success") else f"prefix cache not reset: {reply}"


class _Session:
    """One event loop's use of the pool: the HTTP client, the in-flight accounting, retries and drops."""

    def __init__(self, engine: VllmServerEngine):
        self.engine = engine
        self.room = asyncio.Condition()
        timeout = httpx.Timeout(engine.timeout_s, connect=min(10.0, engine.timeout_s))
        self.http = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None))

    async def __aenter__(self) -> _Session:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.http.aclose()

    async def acquire(self, n: int) -> ServerState:
        """The live server with the fewest sequences in flight that has room for `n` more (an idle server always
        has); waits for room, raises when no server is left."""
        async with self.room:
            while True:
                alive = [s for s in self.engine.servers if s.alive]
                if not alive:
                    raise self.engine._all_gone()
                free = [s for s in alive if s.seqs_in_flight == 0 or s.seqs_in_flight + n <= s.max_seqs]
                if free:
                    server = min(free, key=lambda s: s.seqs_in_flight)
                    server.seqs_in_flight += n
                    return server
                await self.room.wait()

    async def release(self, server: ServerState, n: int) -> None:
        async with self.room:
            server.seqs_in_flight -= n
            self.room.notify_all()

    async def call(
        self, server: ServerState, method: str, path: str, *, retry_if: Callable[[Any], str | None] | None = None,
        hint: str = "", **kwargs,
    ) -> Any:
        """The JSON reply of `server`; retried on trouble, then `_ServerGone` once the server is dropped.

        `retry_if(reply)` names trouble in a 200 reply. `hint` is added to the error of a 4xx reply.
        """
        engine = self.engine
        for attempt in range(engine.retries + 1):
            if not server.alive:
                raise _ServerGone
            try:
                response = await self.http.request(method, server.url + path, auth=server.auth, **kwargs)
                trouble = self._trouble(server, path, response, hint)
                if trouble is None:
                    reply = response.json()
                    trouble = retry_if(reply) if retry_if is not None else None
                    if trouble is None:
                        return reply
            except httpx.TransportError as err:
                trouble = f"{type(err).__name__}: {err}"
            except ValueError as err:  # not JSON
                trouble = f"unreadable reply ({err})"
            if attempt < engine.retries:
                log.info("vLLM server %s%s: %s; retry %d of %d", server.url, path, trouble, attempt + 1,
                         engine.retries)
                await asyncio.sleep(engine.retry_delay_s * 2**attempt)
        await self._drop(server, f"{path}: {trouble}")
        raise _ServerGone

    @staticmethod
    def _trouble(server: ServerState, path: str, response: httpx.Response, hint: str) -> str | None:
        status = response.status_code
        if status < 400:
            return None
        if status >= 500 or status in RETRYABLE_HTTP_STATUSES:
            return f"HTTP {status}: {response.text[:300]}"
        raise KiminaError(
            f"{server.url}{path}: HTTP {status}: {response.text[:500]}" + (f" ({hint})" if hint else "")
        )

    async def _drop(self, server: ServerState, trouble: str) -> None:
        async with self.room:
            if server.alive:
                server.alive, server.trouble = False, trouble
                left = [s.url for s in self.engine.servers if s.alive]
                log.warning("vLLM server %s dropped from the pool after %d retries (%s); left: %s",
                            server.url, self.engine.retries, trouble, left or "none")
            self.room.notify_all()
