"""What a run stores and shows: no credentials from URLs, a failed rerun never rewrites the run's records, and a
non-finite update never replaces the last good checkpoint."""
from __future__ import annotations

import base64
import dataclasses
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kimina_jax import train
from kimina_jax.checkpoint import load_params
from kimina_jax.run_folder import saved_steps
from kimina_jax.config import TinyModelConfig, config_to_dict, load_config, save_resolved
from kimina_jax.errors import KiminaError
from kimina_jax.reward.lean_client import LeanClient
from kimina_jax.urls import redact_url, server_address

SECRET = "s3cr3tKEY"
MINIF2F_8 = Path(__file__).parent / "fixtures/minif2f_test8.jsonl"


def test_redact_url_and_server_address():
    assert redact_url(f"http://user:{SECRET}@host:8000/x") == "http://***@host:8000/x"
    assert redact_url(f"error from https://{SECRET}@h/api: refused") == "error from https://***@h/api: refused"
    assert redact_url("http://host/a@b") == "http://host/a@b" and redact_url(None) is None
    url, auth = server_address(f"http://us%40er:{SECRET}@host:8000/", "verifier.url")
    assert url == "http://host:8000" and auth is not None
    assert server_address("http://host:8000", "verifier.url") == ("http://host:8000", None)


def test_resolved_config_holds_no_url_credentials(tmp_path):
    cfg = load_config("tiny", env={"LEAN_SERVER_API_URL": f"http://user:{SECRET}@lean:8000"})
    assert cfg.verifier.url.endswith(f"{SECRET}@lean:8000")  # used as given
    assert SECRET not in str(config_to_dict(cfg))
    text = save_resolved(cfg, tmp_path).read_text()
    assert SECRET not in text and "http://***@lean:8000" in text


def test_lean_client_sends_url_credentials_and_never_shows_them():
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"status": "ok"}')

        def do_POST(self):
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b"down")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = LeanClient(f"http://user:{SECRET}@127.0.0.1:{server.server_address[1]}", retries=0,
                        message_lines="body", backoff_s=0.0)
    try:
        assert client.health()
        assert seen == ["Basic " + base64.b64encode(f"user:{SECRET}".encode()).decode()]
        [verdict] = client.check_sync(["theorem t : True := trivial"])
        assert verdict.error and "127.0.0.1" in verdict.error and SECRET not in verdict.error
        assert SECRET not in repr(client)
    finally:
        client.close()
        server.shutdown()


def test_vllm_pool_never_shows_url_credentials(tiny_tied_hf_folder, tmp_path, caplog):
    from kimina_jax.errors import KiminaError
    from kimina_jax.models import Qwen3Config
    from kimina_jax.rollout.vllm_server import VllmServerEngine

    config = Qwen3Config.from_pretrained(tiny_tied_hf_folder)
    with pytest.raises(KiminaError, match=r"\(http://127.0.0.1:9: /server_info") as raised:
        VllmServerEngine([f"http://user:{SECRET}@127.0.0.1:9"], tmp_path, config, retries=1, retry_delay_s=0.01)
    assert SECRET not in str(raised.value) + caplog.text


# ---------------------------------------------------------------------------------------------- a real run
def _run(module: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", **(env or {})}
    env.pop("LEAN_SERVER_API_KEY", None)
    return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.lean_server
def test_run_keeps_its_records_and_secrets(lean_server, tmp_path):
    host = lean_server.url.split("://")[1]
    env = {"LEAN_SERVER_API_URL": f"http://user:{SECRET}@{host}"}
    run = tmp_path / "run"
    done = _run("kimina_jax.train", "--run-dir", str(run), "trainer.total_steps=1", "trainer.val_before_train=false",
                env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert SECRET not in done.stdout + done.stderr
    leaks = [p for p in run.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaks and (run / "rollouts" / "step_1.jsonl").is_file()

    records = {name: (run / name).read_bytes() for name in ("config.yaml", "model_files/config.json")}
    bigger = _run("kimina_jax.train", "--run-dir", str(run), "trainer.total_steps=2", "model.tiny.hidden_size=128",
                  env=env)
    assert bigger.returncode == 2 and "Traceback" not in bigger.stderr, bigger.stderr[-3000:]
    [error] = [line for line in bigger.stderr.splitlines() if line.startswith("error: ")]
    assert "model.tiny.hidden_size: 64 there, 128 now" in error
    assert "trainer.resume=never" in error
    assert records == {name: (run / name).read_bytes() for name in records}

    exported = _run("kimina_jax.export", "--checkpoint", str(run), "--out", str(tmp_path / "hf"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    (tmp_path / "a_file").write_text("x")
    for module, args in (("kimina_jax.train", ("--run-dir", str(tmp_path / "a_file"))),
                         ("kimina_jax.export", ("--checkpoint", str(run), "--out", str(tmp_path / "a_file")))):
        failed = _run(module, *args, env=env)
        assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
        assert f"error: --{args[-2][2:]} {tmp_path / 'a_file'}: is a file, not a folder" in failed.stderr.splitlines()


def test_truncated_safetensors_and_out_files_are_one_clear_error(tmp_path, capsys):
    from kimina_jax.data import build_tiny_tokenizer
    from kimina_jax.evaluate import main as evaluate_main
    from kimina_jax.export import main as export_main
    from kimina_jax.models import save_hf_checkpoint
    from kimina_jax.models.tiny import build_tiny_model

    tokenizer = build_tiny_tokenizer()
    folder = tmp_path / "hf"
    save_hf_checkpoint(build_tiny_model(TinyModelConfig(), len(tokenizer), eos_token_id=tokenizer.eos_token_id), folder)
    tokenizer.save_pretrained(str(folder))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    evaluate = ["--model", str(folder), "--dataset", str(MINIF2F_8), "--n", "1", "--k", "1", "--engine", "jax",
                "--verifier", "standin", "--out"]
    assert evaluate_main([*evaluate, str(a_file)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out {a_file}: is a file, not a folder")

    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    assert export_main(["--checkpoint", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert f"error: {weights}: truncated" in capsys.readouterr().err
    assert evaluate_main([*evaluate, str(tmp_path / "results")]) == 2
    assert f"error: {weights}: truncated" in capsys.readouterr().err


def test_a_non_finite_update_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = load_config("tiny", ["trainer.total_steps=4", "trainer.save_freq=1", "trainer.val_before_train=false",
                               "trainer.test_freq=100", "logging.progress_bars=false"], run_dir=tmp_path, env={})
    trainer = train.Trainer(cfg)  # the local stand-in verifier
    update = trainer.step_fn.update_epochs

    def overflowing_update(state, batches, step):  # a finite gradient whose update overflows a weight at step 2
        state, metrics = update(state, batches, step)
        if trainer.step == 2:
            first, *rest = jax.tree.leaves(state.params)
            poisoned = jax.tree.unflatten(jax.tree.structure(state.params), [first * jnp.inf, *rest])
            state = dataclasses.replace(state, params=poisoned)
        return state, metrics

    monkeypatch.setattr(trainer.step_fn, "update_epochs", overflowing_update)
    with pytest.raises(KiminaError, match=r"step 2: the update left non-finite parameters.*checkpoints/1\b"):
        trainer.fit()
    assert saved_steps(tmp_path) == [1]
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(load_params(tmp_path / "checkpoints/1")))
