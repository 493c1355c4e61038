"""Evaluation's config speaks training's language: the same sections, recipes and `key=value` overrides, one default
per setting, and the short flags only as aliases of config keys."""
from __future__ import annotations

import os
import types
from pathlib import Path

import pytest

from kimina_jax.config import ErrorFixConfig, JaxSamplerConfig, ValSamplingConfig, VllmConfig, load_eval_config
from kimina_jax.errors import KiminaError
from kimina_jax.eval.run import Evaluation, ModelSource
from kimina_jax.evaluate import main, parse_args

RECIPE = Path(__file__).parents[1] / "configs/kimina_prover_1.7B.yaml"
REQUIRED = ["--model", "some/model", "--dataset", "minif2f.jsonl"]


def eval_config(argv, **kwargs):
    config, overrides = parse_args(argv)
    return load_eval_config(config, overrides, **kwargs)


def test_a_training_recipe_is_an_eval_config_with_overrides():
    cfg = eval_config(
        ["--config", str(RECIPE), *REQUIRED, "--n", "4", "--k", "1,4", "--engine", "jax", "eval.error_fix=true",
         "rollout.val.top_p=0.9", "data.error_fix.max_feedback_chars=500", "verifier.timeout_s=30"],
        env={"LEAN_SERVER_API_URL": "http://lean"},
    )
    assert (cfg.eval.model, cfg.eval.dataset.files) == ("some/model", ["minif2f.jsonl"])
    assert (cfg.eval.n, cfg.eval.k, cfg.eval.error_fix, cfg.rollout.engine) == (4, [1, 4], True, "jax")
    # The recipe's values, as training reads them, and the overrides on top.
    assert cfg.data.max_response_length == cfg.rollout.max_tokens == 24576 and cfg.rollout.vllm.max_model_len == 32768
    assert cfg.rollout.val.temperature == 1.0 and cfg.rollout.val.top_p == 0.9
    assert cfg.data.error_fix.max_feedback_chars == 500 and cfg.verifier.timeout_s == 30
    assert (cfg.verifier.kind, cfg.verifier.url, cfg.verifier.max_in_flight) == ("lean", "http://lean", 40)
    # Training-only sections are checked as training checks them.
    with pytest.raises(KiminaError, match="algorithm.ppo_mini_batch_size"):
        eval_config(["--config", str(RECIPE), *REQUIRED, "algorithm.ppo_mini_batch_size=3"])
    with pytest.raises(KiminaError, match="unknown key 'eval.sample'"):
        eval_config([*REQUIRED, "eval.sample=3"])


def test_defaults_come_from_the_one_config():
    cfg = eval_config(REQUIRED)
    assert cfg.rollout.vllm.gpu_memory_utilization == VllmConfig().gpu_memory_utilization == 0.6
    assert cfg.data.error_fix.max_feedback_chars == ErrorFixConfig().max_feedback_chars
    assert cfg.rollout.jax.kv_cache_bytes == JaxSamplerConfig().kv_cache_bytes
    assert cfg.rollout.vllm.kv_cache_bytes is None
    assert cfg.rollout.val == ValSamplingConfig()
    assert (cfg.eval.n, cfg.eval.k, cfg.eval.split, cfg.eval.error_fix) == (32, [1, 8, 32], "test", False)


def test_short_flags_set_their_config_keys_before_the_overrides():
    cfg = eval_config([
        *REQUIRED, "--split", "valid", "--hub-split", "test", "--name", "1e3", "--limit", "5", "--error-fix",
        "--out", "o", "--temperature", "0.5", "--top-p", "0.8", "--top-k", "20", "--max-tokens", "100",
        "--max-prompt-length", "200", "--max-feedback-chars", "300", "--seed", "7", "--batch-problems", "3",
        "--engine", "vllm", "--dtype", "float16", "--gpu-memory-utilization", "0.7", "--kv-cache-bytes", "4096",
        "--tensor-parallel-size", "2", "--enforce-eager", "--verifier", "standin", "--lean-timeout-s", "9",
        "--lean-batch-size", "2", "--lean-max-in-flight", "4", "--lean-retries", "1", "--k", "1,4", "--n", "4",
        "eval.n=8",
    ])
    run, data, rollout, verifier = cfg.eval, cfg.data, cfg.rollout, cfg.verifier
    assert (run.split, run.dataset.hub_split, run.dataset.name, run.dataset.limit) == ("valid", "test", "1e3", 5)
    assert (run.error_fix, run.out, run.seed, run.batch_problems, run.n) == (True, "o", 7, 3, 8)  # eval.n=8 last
    assert (rollout.val.temperature, rollout.val.top_p, rollout.val.top_k) == (0.5, 0.8, 20)
    assert (data.max_response_length, rollout.max_tokens, data.max_prompt_length) == (100, 100, 200)
    assert data.error_fix.max_feedback_chars == 300 and rollout.vllm.max_model_len == 300
    assert (rollout.engine, cfg.model.dtype, rollout.vllm.dtype) == ("vllm", "float16", "float16")
    assert (rollout.vllm.gpu_memory_utilization, rollout.vllm.tensor_parallel_size, rollout.vllm.enforce_eager) == (
        0.7, 2, True)
    assert rollout.vllm.kv_cache_bytes == rollout.jax.kv_cache_bytes == 4096
    assert (verifier.kind, verifier.timeout_s, verifier.batch_size, verifier.max_in_flight, verifier.retries) == (
        "standin", 9.0, 2, 4, 1)


def test_a_run_gives_its_saved_lengths_unless_the_config_does():
    saved = {"data": {"max_prompt_length": 100, "max_response_length": 50}}
    cfg = eval_config(REQUIRED, run_config=saved)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_tokens, cfg.rollout.vllm.max_model_len) == (100, 50, 150)
    cfg = eval_config([*REQUIRED, "--max-tokens", "70"], run_config=saved)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_tokens) == (100, 70)
    cfg = eval_config(["--config", str(RECIPE), *REQUIRED], run_config=saved, env={"LEAN_SERVER_API_URL": "http://x"})
    assert (cfg.data.max_prompt_length, cfg.rollout.max_tokens) == (8192, 24576)  # the recipe says


def test_the_evaluation_engine_gets_the_rollout_section(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("kimina_jax.eval.run.make_engine", lambda rollout, model, tokenizer, model_dir: built.append(
        (rollout, model, model_dir)))
    cfg = eval_config([*REQUIRED, "rollout.vllm.jax_memory_fraction=0.3", "rollout.vllm.enable_prefix_caching=false"])
    source = ModelSource(tmp_path, "hf", tmp_path, {})
    Evaluation(cfg, source, [], types.SimpleNamespace(tokenizer=None), None).engine
    ((rollout, model, model_dir),) = built
    assert model is None and model_dir == tmp_path  # vLLM reads the HF folder itself
    assert rollout.vllm.gpu_memory_utilization == 0.6 and rollout.vllm.jax_memory_fraction == 0.3
    assert not rollout.vllm.enable_prefix_caching and not rollout.vllm.enable_sleep_mode  # nothing sleeps here


def test_evaluation_with_vllm_leaves_it_the_configured_memory(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)  # restored after the test
    argv = ["--model", str(tmp_path), "--dataset", "minif2f.jsonl", "--engine", "vllm",
            "rollout.vllm.jax_memory_fraction=0.25"]
    assert main(argv) == 2  # the empty folder is no model: stops right after the memory split is set
    assert "neither an HF folder" in capsys.readouterr().err
    assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.25"


def test_eval_settings_are_checked():
    for argv, message in [
        (["--dataset", "d"], "'eval.model' \\(--model\\) is required"),
        (["--model", "m"], "'eval.dataset.files' \\(--dataset\\) must name one"),
        ([*REQUIRED, "--n", "0", "--k", "1"], "'eval.n' must be >= 1"),
        ([*REQUIRED, "--batch-problems", "0"], "'eval.batch_problems' must be >= 1"),
        ([*REQUIRED, "--k", "0,2"], "'eval.k' must be a non-empty list of positive integers"),
        ([*REQUIRED, "--max-feedback-chars", "0"], "'data.error_fix.max_feedback_chars' must be > 0"),
        ([*REQUIRED, "--engine", "tpu"], "'rollout.engine' must be one of"),
    ]:
        with pytest.raises(KiminaError, match=message):
            eval_config(argv)
