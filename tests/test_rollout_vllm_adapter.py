"""The part both vLLM engines share (rollout/vllm_adapter.py), on a stand-in engine: no vLLM needed."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3Config, abstract_model, load_hf_checkpoint
from kimina_jax.reward import LeanClient
from kimina_jax.rollout import SamplingParams, VllmServerEngine
from kimina_jax.rollout.vllm_adapter import VllmAdapter, dtype_name, prompt_seed
from kimina_jax.urls import server_url

EOS = 2  # tests/tiny_models.py


class RecordingEngine(VllmAdapter):
    """Answers every request with n one-token samples (token = prompt index) and records what it was sent."""

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.requests, self.pushed = [], []

    def _sample(self, prompts, params):
        self.requests = [self._request(params, i) for i in range(len(prompts))]
        return [self._completions(i, [(j, [i], [-0.5], "stop") for j in range(params.n)], params.n, "here")
                for i in range(len(prompts))]

    def _push_weights(self, model):
        self.pushed.append(model)


@pytest.fixture(scope="module")
def config(tiny_hf_folder) -> Qwen3Config:
    return Qwen3Config.from_pretrained(tiny_hf_folder)


def test_eos_ids_are_the_given_ones_else_the_models(config, tiny_hf_folder, tmp_path):
    assert RecordingEngine(config).eos_token_ids == (EOS,)
    assert RecordingEngine(config, eos_token_ids=[7, 3]).eos_token_ids == (7, 3)
    assert RecordingEngine(config, eos_token_ids=()).eos_token_ids == ()
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, 9]}))
    assert RecordingEngine(config, folder=tmp_path).eos_token_ids == (EOS, 9)


def test_requests_carry_the_sampling_fields_the_stop_ids_and_one_seed_per_prompt(config):
    engine = RecordingEngine(config, eos_token_ids=[5, EOS])
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, max_tokens=4, stop_token_ids=(9, 5), seed=11)
    out = engine.generate([[3, 4], [6], [3, 4]], params)
    assert [[(c.prompt_index, c.sample_index, c.token_ids) for c in row] for row in out] == [
        [(i, 0, (i,)), (i, 1, (i,))] for i in range(3)
    ]
    first = {"n": 2, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "max_tokens": 4, "stop_token_ids": [EOS, 5, 9],
             "seed": 11, "logprobs": 0}
    assert engine.requests == [{**first, "seed": 11 + i} for i in range(3)]  # equal prompts, own seeds
    engine.generate([[3]], dataclasses.replace(params, seed=None, top_k=4))
    assert (engine.requests[0]["seed"], engine.requests[0]["top_k"]) == (None, 4)
    assert [prompt_seed(None, 3), prompt_seed(0, 3), prompt_seed(100, 0)] == [None, 3, 100]


def test_replies_become_completions_only_when_whole_and_finished(config):
    engine = RecordingEngine(config)
    made = engine._completions(4, [(1, [7, 8], [-1.0, -2.0], "length"), (0, [EOS], [-0.25], "stop")], 2, "here")
    assert [(c.prompt_index, c.sample_index, c.token_ids, c.finish_reason) for c in made] == [
        (4, 0, (EOS,), "stop"), (4, 1, (7, 8), "length")]
    np.testing.assert_array_equal(made[1].logprobs, np.float32([-1.0, -2.0]))
    bad = {
        r"here: samples \[0\] in the reply, expected 2 \(0..1\)": ([(0, [1], [-1.0], "stop")], 2),
        r"here: samples \[0, 2\] in the reply": ([(0, [1], [-1.0], "stop"), (2, [1], [-1.0], "stop")], 2),
        "here: sample 0 ended with 'abort'": ([(0, [1], [-1.0], "abort")], 1),
        "here: sample 0 has 2 tokens but 1 log-probs": ([(0, [1, 2], [-1.0], "stop")], 1),
    }
    for message, (samples, n) in bad.items():
        with pytest.raises(KiminaError, match=message):
            engine._completions(0, samples, n, "here")


def test_weight_push_checks_the_model_and_times_the_push(config, tiny_hf_folder):
    engine = RecordingEngine(config)
    model = load_hf_checkpoint(tiny_hf_folder)
    engine.update_weights(model)
    assert engine.pushed == [model] and engine.last_sync_s > 0
    other = abstract_model(dataclasses.replace(config, num_hidden_layers=1))
    with pytest.raises(KiminaError, match="architecture differs"):
        engine.update_weights(other)
    engine._asleep = True
    with pytest.raises(KiminaError, match="RecordingEngine: asleep"):
        engine.generate([[3]], SamplingParams())
    engine._asleep, engine._closed = False, True
    for use in (lambda: engine.generate([[3]], SamplingParams()), lambda: engine.update_weights(model)):
        with pytest.raises(KiminaError, match="RecordingEngine: used after close"):
            use()
    assert len(engine.pushed) == 1


def test_dtype_names_are_the_models():
    torch = pytest.importorskip("torch")
    assert [dtype_name(d, "here") for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        "float32", "bfloat16", "float16"]
    assert dtype_name("torch.bfloat16", "here") == "bfloat16"  # as a server's /server_info reports it
    for unsupported in (torch.float64, "torch.int8"):
        with pytest.raises(KiminaError, match=r"here: vLLM runs dtype torch\.\w+; .*choose one of"):
            dtype_name(unsupported, "here")


def test_server_urls_are_checked_alike_for_every_client(config, tmp_path):
    assert server_url("http://host:8000/", "f") == "http://host:8000"
    assert server_url("https://host/prefix", "f") == "https://host/prefix"
    for bad in ("host:8000", "ftp://host", ""):
        with pytest.raises(KiminaError, match=f"f: expected http\\(s\\)://host\\[:port\\], got '{bad}'"):
            server_url(bad, "f")
    with pytest.raises(KiminaError, match="LeanClient url: expected http"):
        LeanClient("localhost:8000")
    with pytest.raises(KiminaError, match="rollout.servers.urls: expected http"):
        VllmServerEngine(["http://127.0.0.1:9", "127.0.0.1:1"], tmp_path, config)
