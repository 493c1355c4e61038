"""A broken Lean server (issue 16, items 1 and 3), against the REAL Kimina Lean Server with the stand-in REPL:
training fails at start on an unreachable, refusing or failing server; a run whose server breaks checkpoints and
stops; a server restart costs latency, not samples."""
from __future__ import annotations

import concurrent.futures
import time

import pytest

from kimina_jax import train
from kimina_jax.config import load_config
from kimina_jax.errors import KiminaError
from kimina_jax.reward import LeanClient
from kimina_jax.reward.rewarder import Rewarder
from tests.lean_harness.server import FaultProxy, free_port
from tests.test_eval_training_validation import EmptyProofs
from tests.test_reward_lean_client import KEY, valid

SCORE_POINTS = ("critic/score/mean", "critic/rewards/mean", "critic/advantages/mean", "reward/accuracy")


def start_error(capsys, monkeypatch, tmp_path, url: str, key: str | None = None) -> str:
    """What `python -m kimina_jax.train` on the tiny recipe says when the start-up check fails; the model is
    never built and the run folder never written."""
    monkeypatch.setenv("LEAN_SERVER_API_URL", url)
    if key:
        monkeypatch.setenv("LEAN_SERVER_API_KEY", key)
    else:
        monkeypatch.delenv("LEAN_SERVER_API_KEY", raising=False)
    monkeypatch.setattr(train.Trainer, "_load_model", lambda self: pytest.fail("the model was built"))
    assert train.main(["--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and url in err
    assert not (tmp_path / "run" / "config.yaml").exists()
    return err


@pytest.mark.lean_server
def test_training_stops_at_start_on_a_broken_server(start_lean_server, capsys, monkeypatch, tmp_path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    assert "unreachable (ConnectError" in start_error(capsys, monkeypatch, tmp_path, down)
    server = start_lean_server(api_key=KEY)
    for wrong in ("not-the-key", None):
        err = start_error(capsys, monkeypatch, tmp_path, server.url, wrong)
        assert "HTTP 401" in err and "LEAN_SERVER_API_KEY" in err and KEY not in err
    with FaultProxy(server.url, faults=[500] * 10) as failing:
        assert "/health answered HTTP 500" in start_error(capsys, monkeypatch, tmp_path, failing.url, KEY)


@pytest.mark.lean_server
def test_start_check_tells_a_failing_check_apart(lean_server) -> None:
    with FaultProxy(lean_server.url, path="/api/check") as proxy, LeanClient(proxy.url) as lean:
        lean.check_ready()  # /health, then the line-number probe, which it settles
        assert lean.message_lines == "body" and proxy.requests == 2
        proxy.faults = [500]
        with pytest.raises(KiminaError, match=f"{proxy.url} did not check a test snippet: HTTP 500"):
            lean.check_ready()


@pytest.mark.lean_server
def test_a_run_whose_server_breaks_checkpoints_and_stops(lean_server, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(train, "make_engine", lambda rollout, model, tokenizer, model_dir=None: EmptyProofs(tokenizer))
    overrides = ["verifier.retries=0", "verifier.retry_budget_s=0", "verifier.max_unverified_steps=2",
                 "trainer.total_steps=6", "trainer.save_freq=100", "trainer.test_freq=100",
                 "data.error_fix.enabled=false", "logging.tensorboard=false", "logging.progress_bars=false"]
    with FaultProxy(lean_server.url) as proxy:
        cfg = load_config("tiny", overrides, run_dir=tmp_path, env={"LEAN_SERVER_API_URL": proxy.url})
        trainer = train.Trainer(cfg)
        logged, train_step = {}, trainer.train_step

        def spy_step():
            logged[trainer.step] = metrics = train_step()
            if trainer.step == 1:
                proxy.faults = [500] * 1000  # the server breaks after step 1
            return metrics

        trainer.train_step = spy_step
        with pytest.raises(KiminaError) as stopped:
            trainer.fit()
    assert sorted(logged) == [1, 2, 3]  # steps 2 and 3 had nothing verified: the run stopped after step 3
    message = str(stopped.value)
    assert f"Lean server {proxy.url}" in message and "last error: HTTP 500" in message and "step 3" in message
    assert (tmp_path / "checkpoints" / "3").is_dir()
    assert all(name in logged[1] for name in SCORE_POINTS) and logged[1]["reward/unverified"] == 0
    for step in (2, 3):
        assert not any(name in logged[step] for name in SCORE_POINTS)  # no 0.0 that reads as wrong proofs
        assert logged[step]["reward/unverified"] == 16


@pytest.mark.lean_server
def test_a_server_restart_costs_latency_not_samples(start_lean_server) -> None:
    server = start_lean_server()
    options = {"timeout_s": 20, "message_lines": "body", "retries": 1, "backoff_s": 0.2, "backoff_max_s": 1.0}
    with LeanClient(server.url, retry_budget_s=60, **options) as lean:
        server.kill()
        futures = lean.submit([valid(i) for i in range(40)])
        time.sleep(6)  # two retries would have given up long ago
        server.start()
        done, waiting = concurrent.futures.wait(futures, timeout=60)
        assert not waiting
        assert [f.result().status for f in futures] == ["valid"] * 40 and lean.retried > 40


def test_the_retry_budget_bounds_the_wait() -> None:
    down = f"http://127.0.0.1:{free_port()}"
    with LeanClient(down, message_lines="body", retries=0, backoff_s=0.1, backoff_max_s=0.5, retry_budget_s=2) as lean:
        start = time.monotonic()
        verdict = lean.check_sync([valid(1)])[0]
        elapsed = time.monotonic() - start
    assert verdict.status == "unverified" and "ConnectError" in verdict.error
    assert 2 <= elapsed < 4 and lean.requests >= 5  # waits of 0.05-0.5 s, none above backoff_max_s


def test_retry_settings_reach_the_client() -> None:
    cfg = load_config("tiny", env={"LEAN_SERVER_API_URL": "http://127.0.0.1:9"})
    v = cfg.verifier
    assert (v.retries, v.retry_budget_s, v.backoff_max_s, v.max_unverified_steps) == (3, 120.0, 10.0, 3)
    cfg = load_config("tiny", ["verifier.retry_budget_s=30", "verifier.backoff_max_s=2"],
                      env={"LEAN_SERVER_API_URL": "http://127.0.0.1:9"})
    with Rewarder.from_config(cfg.verifier, cfg.reward.format).verifier as lean:
        assert (lean.retry_budget_s, lean.backoff_max_s) == (30, 2)
    for bad in ("verifier.retry_budget_s=-1", "verifier.backoff_max_s=0", "verifier.max_unverified_steps=-1"):
        with pytest.raises(KiminaError, match=bad.split("=")[0]):
            load_config("tiny", [bad], env={})
