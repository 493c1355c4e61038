"""A broken Lean server (issue 16, items 1 to 3), against the REAL Kimina Lean Server with the stand-in REPL:
training fails at start on an unreachable, refusing or failing server; a run whose server breaks checkpoints and
stops; a server restart costs latency, not samples; a hung server (SIGSTOP) does not hold SIGTERM's checkpoint
hostage; a key rotated mid-run (401) checkpoints before the run ends."""
from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import threading
import time

import pytest

from kimina_jax import train
from kimina_jax.config import load_config
from kimina_jax.errors import KiminaError, VerifierError
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


QUIET_RUN = ["trainer.save_freq=100", "trainer.test_freq=100", "data.error_fix.enabled=false",
             "logging.tensorboard=false", "logging.progress_bars=false"]


def proof_writing_trainer(monkeypatch, tmp_path, url: str, *overrides: str) -> train.Trainer:
    """A tiny-recipe trainer whose engine answers every prompt with a Lean snippet, so every sample is verified."""
    monkeypatch.setattr(train, "make_engine", lambda rollout, model, tokenizer, model_dir=None: EmptyProofs(tokenizer))
    cfg = load_config("tiny", [*QUIET_RUN, *overrides], run_dir=tmp_path, env={"LEAN_SERVER_API_URL": url})
    return train.Trainer(cfg)


def spy_steps(trainer: train.Trainer, before_step=lambda step: None) -> dict[int, dict]:
    """Records each step's metrics; `before_step(step)` runs as the step starts."""
    logged, train_step = {}, trainer.train_step

    def spy_step():
        before_step(trainer.step)
        logged[trainer.step] = metrics = train_step()
        return metrics

    trainer.train_step = spy_step
    return logged


@pytest.mark.lean_server
def test_a_run_whose_server_breaks_checkpoints_and_stops(lean_server, tmp_path, monkeypatch) -> None:
    with FaultProxy(lean_server.url) as proxy:
        trainer = proof_writing_trainer(monkeypatch, tmp_path, proxy.url, "verifier.retries=0",
                                        "verifier.retry_budget_s=0", "verifier.max_unverified_steps=2",
                                        "trainer.total_steps=6")

        def break_server(step: int) -> None:
            if step == 2:
                proxy.faults = [500] * 1000

        logged = spy_steps(trainer, break_server)
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


def test_request_timeout_follows_the_per_snippet_timeout() -> None:
    # The server checks a request's snippets in parallel (header, then body, each within timeout_s): a request that
    # takes longer than both plus a margin is hung, whatever the batch size (it was timeout_s x batch_size + 30).
    with LeanClient("http://127.0.0.1:9", timeout_s=60, batch_size=8) as lean:
        assert lean.http_timeout_s == 150
    with LeanClient("http://127.0.0.1:9", timeout_s=5, batch_size=64, http_timeout_s=7) as lean:
        assert lean.http_timeout_s == 7


@pytest.mark.lean_server
def test_abandon_answers_what_a_hung_server_holds(start_lean_server) -> None:
    server = start_lean_server()
    with LeanClient(server.url, message_lines="body", retry_budget_s=600) as lean:
        assert lean.check_sync([valid(0)])[0].status == "valid"
        server.process.send_signal(signal.SIGSTOP)  # hung: connections are accepted, nothing is answered
        try:
            futures = lean.submit([valid(i) for i in range(1, 20)])
            time.sleep(1)
            assert not any(f.done() for f in futures)
            start = time.monotonic()
            lean.abandon("abandoned 2 s after SIGTERM")
            verdicts = [f.result(timeout=5) for f in futures]
            assert time.monotonic() - start < 2
            assert {(v.status, v.error) for v in verdicts} == {("unverified", "abandoned 2 s after SIGTERM")}
            later = lean.submit([valid(99)])[0].result(timeout=1)  # nothing is sent any more
            assert later.status == "unverified"
        finally:
            server.process.send_signal(signal.SIGCONT)


@pytest.mark.lean_server
def test_sigterm_does_not_wait_for_a_hung_server(start_lean_server, tmp_path, monkeypatch) -> None:
    server = start_lean_server()
    trainer = proof_writing_trainer(monkeypatch, tmp_path, server.url, "trainer.total_steps=3",
                                    "trainer.stop_grace_s=2", "verifier.message_lines=body")
    watchdog = threading.Timer(90, server.process.send_signal, [signal.SIGCONT])  # bounds the test on old code

    def hang_then_terminate(step: int) -> None:
        if step == 2:
            server.process.send_signal(signal.SIGSTOP)
            threading.Timer(1.0, os.kill, [os.getpid(), signal.SIGTERM]).start()
            watchdog.start()

    logged = spy_steps(trainer, hang_then_terminate)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    start = time.monotonic()
    try:
        trainer.fit()  # returns: a stop on SIGTERM is a clean exit
    finally:
        elapsed = time.monotonic() - start
        watchdog.cancel()
        server.process.send_signal(signal.SIGCONT)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert sorted(logged) == [1, 2] and logged[1]["reward/unverified"] == 0
    assert logged[2]["reward/unverified"] == 16  # every snippet of step 2 was abandoned, none scored as wrong
    assert (tmp_path / "checkpoints" / "2").is_dir()
    assert elapsed < 60, f"the stop took {elapsed:.0f} s"


@pytest.mark.lean_server
@pytest.mark.parametrize("off_policy", [False, True])
def test_a_key_rotated_mid_run_checkpoints_before_the_run_ends(lean_server, tmp_path, monkeypatch, off_policy) -> None:
    # Off-policy, step 2's proofs were checked during step 1: step 3's are the first refused, while step 4's generate.
    lost = 3 if off_policy else 2
    with FaultProxy(lean_server.url, path="/api/check") as proxy:
        trainer = proof_writing_trainer(monkeypatch, tmp_path, proxy.url, "trainer.total_steps=4",
                                        f"algorithm.off_policy={str(off_policy).lower()}")

        def rotate_key(step: int) -> None:
            if step == 2:
                proxy.faults = [401] * 100

        logged = spy_steps(trainer, rotate_key)
        with pytest.raises(VerifierError, match=f"Lean server {proxy.url} refused the request \\(HTTP 401"):
            trainer.fit()
    assert sorted(logged) == list(range(1, lost))  # step `lost` was lost with its verdicts...
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [str(lost - 1)]
    # ... and the checkpoint is the step before's, with the data position before the lost step's prompts (not after
    # the next step's, drawn ahead off-policy): a rerun draws them again.
    loop = json.loads(next((tmp_path / "checkpoints" / str(lost - 1)).glob("loop*/metadata")).read_text())
    assert (loop["step"], loop["data"]["epoch"], loop["data"]["batch"]) == (lost - 1, 0, lost - 1)
