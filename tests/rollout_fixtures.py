"""Session-wide vLLM engines (each start costs seconds and about 1 GB: reuse them, don't start more), real vLLM
servers for the `vllm-server` engine, and the trainer-side references the rollout tests compare engines with.

Tests may change an engine's weights: a test that needs particular weights pushes them itself.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_models import make_hf_model, save_hf_model
from tests.vllm_support import VLLM_CPU_ARGS, VLLM_ENV, set_vllm_env


@pytest.fixture(scope="session")
def tiny_tied_hf_folder(tmp_path_factory):
    """A tied tiny Qwen3 folder (tied like the tiny recipe and Qwen3-0.6B/1.7B)."""
    return save_hf_model(make_hf_model(tie=True, seed=2), tmp_path_factory.mktemp("hf_tiny_tied"))


@pytest.fixture(scope="session")
def vllm_engine(tiny_tied_hf_folder, tmp_path_factory):
    """fp32 VllmEngine with random (`dummy`) weights, started from a folder holding only the tied tiny config.json."""
    set_vllm_env()
    from kimina_jax.rollout import VllmEngine

    folder = tmp_path_factory.mktemp("config_only")
    shutil.copyfile(tiny_tied_hf_folder / "config.json", folder / "config.json")
    engine = VllmEngine(folder, load_format="dummy", seed=0, **VLLM_CPU_ARGS)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def vllm_engine_bf16(tiny_hf_folder):
    """bf16 VllmEngine started from the untied tiny HF folder's weights."""
    set_vllm_env()
    from kimina_jax.rollout import VllmEngine

    # Sleep mode as the recipe asks for it: vLLM's CPU backend has none, the engine must start anyway.
    engine = VllmEngine(tiny_hf_folder, seed=0, enable_sleep_mode=True, **{**VLLM_CPU_ARGS, "dtype": "bfloat16"})
    yield engine
    engine.close()


class VllmServer:
    """A real vLLM OpenAI-compatible server on a free loopback port, started with launch/vllm_server.sh in its own
    process group (the API server and its engine process), so that `kill` and `stop` reach both."""

    LAUNCH = Path(__file__).resolve().parents[1] / "launch" / "vllm_server.sh"

    def __init__(self, model_dir: Path, log_path: Path, cpu: int | None = None, load_format: str = "auto"):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {
            **os.environ, **VLLM_ENV, "PYTHON": sys.executable, "ROLLOUT_HOST": "127.0.0.1",
            "ROLLOUT_PORT": str(self.port), "ROLLOUT_DTYPE": VLLM_CPU_ARGS["dtype"],
            "ROLLOUT_MAX_MODEL_LEN": str(VLLM_CPU_ARGS["max_model_len"]), "ROLLOUT_LOAD_FORMAT": load_format,
        }
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # a server keeps its engine in its own process
        if cpu is not None:  # one core per server: two OpenMP pools spinning on the same cores crawl
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu)
        extra = ["--enforce-eager", "--kv-cache-memory-bytes", str(VLLM_CPU_ARGS["kv_cache_memory_bytes"])]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                ["bash", str(self.LAUNCH), str(model_dir), *extra], env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"vLLM server on port {self.port} did not start:\n{self.log_path.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes mid-request, as a crashed host would."""
        self._signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
        self._signal(signal.SIGKILL)  # whatever of the group outlived the API server

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_servers(tiny_tied_hf_folder, tmp_path_factory):
    """Two real vLLM servers for the tied tiny model, started in parallel (about 20 s each), stopped by process
    group: the first from the folder's weights, the second from its config.json alone (random weights)."""
    logs = tmp_path_factory.mktemp("vllm_server_logs")
    config_only = tmp_path_factory.mktemp("server_config_only")
    shutil.copyfile(tiny_tied_hf_folder / "config.json", config_only / "config.json")
    cpus = sorted(os.sched_getaffinity(0))
    servers = []
    try:
        for i, (folder, load_format) in enumerate([(tiny_tied_hf_folder, "auto"), (config_only, "dummy")]):
            cpu = cpus[i % len(cpus)] if len(cpus) > 1 else None
            servers.append(VllmServer(folder, logs / f"server{i}.log", cpu, load_format))
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def trainer_logprobs(model, prompt, tokens, temperature: float = 1.0) -> np.ndarray:
    """log_softmax(logits / temperature) of `tokens` after `prompt` (temperature 0: greedy, plain log_softmax),
    from one plain full forward with a float64 softmax."""
    sequence = list(prompt) + list(tokens)
    # Right-padded to a multiple of 64 so that the jitted forward compiles once per bucket; the model is causal,
    # so the padding changes nothing before it.
    padded = np.zeros((1, -(-len(sequence) // 64) * 64), np.int32)
    padded[0, : len(sequence)] = sequence
    logits = np.asarray(_forward(model, jnp.asarray(padded))[0, : len(sequence)], np.float64) / (temperature or 1.0)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return logp[np.arange(len(prompt) - 1, len(sequence) - 1), list(tokens)]


@nnx.jit
def _forward(model, tokens):
    return model(tokens)[0]


def perturbed(model, scale: float, seed: int):
    """A copy of `model` with Gaussian noise of std `scale` added to every parameter."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))
