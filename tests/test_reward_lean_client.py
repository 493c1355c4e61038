"""LeanClient against the REAL Kimina Lean Server (kimina-ast-server 2.1.3) with the stand-in REPL (NOT Lean).

The stand-in's verdicts are not Lean's: these tests check the HTTP path, batching, order, auth, timeouts, crashes,
restarts and load. Snippets steer the stand-in REPL with `-- standin: ...` comment lines (tests/lean_harness).
"""
from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time
from pathlib import Path

import pytest

from kimina_jax.config import load_config
from kimina_jax.errors import KiminaError
from kimina_jax.reward import LeanClient
from kimina_jax.reward.feedback import build_feedback
from kimina_jax.reward.lean_text import split_header
from kimina_jax.reward.rewarder import Rewarder
from tests.lean_harness.server import CodeLinesProxy, FaultProxy, LeanServer, free_port

FIXTURE = Path(__file__).parent / "fixtures/lean_verdicts_sample.jsonl"
EXPECTED_STATUS = {"pass": "valid", "fail": "lean_error", "sorry": "sorry", "timeout": "timeout"}
KEY = "test-key-8d0c1f"  # a made-up key for a throwaway server


def valid(i: int, directive: str = "") -> str:
    return f"import Mathlib\n\n{directive}theorem t{i} (n : ℕ) : n + 0 = n := by\n  simp"


def client(url: str, **options: object) -> LeanClient:
    options = {"timeout_s": 20, "backoff_s": 0.05, "message_lines": "body", **options}
    return LeanClient(url, **options)


@pytest.mark.lean_server
def test_recorded_proofs_get_their_recorded_verdicts(lean_server: LeanServer) -> None:
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    with client(lean_server.url, timeout_s=2) as lean:  # recorded timeouts: the stand-in never answers
        verdicts = lean.check_sync([r["code"] for r in records])
    for record, verdict in zip(records, verdicts, strict=True):
        assert verdict.status == EXPECTED_STATUS[record["verdict"]], record["id"]
        assert [m["data"] for m in verdict.messages] == [m["data"] for m in record["messages"]]  # real Lean texts
        assert verdict.line_offset == split_header(record["code"])[2]
    timeouts = [v for v in verdicts if v.status == "timeout"]
    assert timeouts and all(v.error == "Lean REPL command timed out in 2.0 seconds" for v in timeouts)


@pytest.mark.lean_server
def test_2000_snippets_come_back_in_order(lean_server: LeanServer) -> None:
    kinds = ["valid", "sorry", "lean_error"]
    proofs = {"valid": "trivial", "sorry": "sorry", "lean_error": "exact (trivial"}
    codes = [f"theorem t{i} : True := by\n  {proofs[kinds[i % 3]]}" for i in range(2000)]
    with client(lean_server.url, batch_size=8, max_in_flight=16) as lean:
        verdicts = lean.check_sync(codes)
        assert lean.requests == 250 and lean.retried == 0
    assert [v.status for v in verdicts] == [kinds[i % 3] for i in range(2000)]


@pytest.mark.lean_server
def test_identical_codes_are_checked_once(lean_server: LeanServer) -> None:
    a, b = valid(1), "theorem s : True := by sorry"
    with client(lean_server.url) as lean:
        first = lean.check_sync([a, a, b, a])
        assert (lean.cache_hits, lean.cache_misses, lean.requests) == (2, 2, 1)
        again = lean.check_sync([b, a])
        assert (lean.cache_hits, lean.cache_misses, lean.requests) == (4, 2, 1)
        assert lean.cache_hit_rate == pytest.approx(4 / 6)
        assert lean.stats() == {"reward/cache_hit_rate": pytest.approx(4 / 6)}
    assert [v.status for v in first] == ["valid", "valid", "sorry", "valid"]
    assert again == [first[2], first[0]]


@pytest.mark.lean_server
def test_only_leans_judgements_are_cached(lean_server: LeanServer) -> None:
    slow = valid(1, "-- standin: sleep-once 4\n")  # times out the first time only
    broken = valid(2, "-- standin: repl-error-once\n")  # a REPL-level error the first time only
    judged = [valid(3), "theorem s : True := by sorry", "theorem e : True := by\n  exact (trivial"]
    with client(lean_server.url, timeout_s=2) as lean:
        first = lean.check_sync([slow, broken, *judged])
        assert [v.status for v in first] == ["timeout", "repl_error", "valid", "sorry", "lean_error"]
        assert lean.requests == 1
        again = lean.check_sync([slow, broken, *judged])
        assert lean.requests == 2 and lean.cache_hits == 3  # only the two transient failures went back
    assert [v.status for v in again] == ["valid", "valid", "valid", "sorry", "lean_error"]
    assert again[2:] == first[2:]


# Lines 1-3 are the import header; the stand-in flags the unclosed `(` on line 6 (line 3 of the body).
FAILING = ("import Mathlib\nimport Aesop\n\ntheorem t (n : ℕ) : n + 0 = n := by\n  have h : n + 0 = n := by simp\n"
           "  exact (h\n  -- done\n  -- really")
HEAD = ("# Error 1:\nError message: \nunexpected token '(' (stand-in rule: unbalanced bracket)\n\n"
        "Lean 4 code snippet with error:\n```lean4\n")
FEEDBACK = {
    "body": HEAD + ("001  | theorem t (n : ℕ) : n + 0 = n := by\n002  |   have h : n + 0 = n := by simp\n"
                    "003 >|   exact (h\n004  |   -- done\n005  |   -- really\n```\n"),
    "code": HEAD + ("004  | theorem t (n : ℕ) : n + 0 = n := by\n005  |   have h : n + 0 = n := by simp\n"
                    "006 >|   exact (h\n007  |   -- done\n008  |   -- really\n```\n"),
}
# kimina-ast-server 2.1.3 as it is (lines from the body), and as upstream main since #56 (from the top).
SERVER_AS = {"body": FaultProxy, "code": CodeLinesProxy}


@pytest.mark.lean_server
@pytest.mark.parametrize("convention", ["body", "code"])
def test_message_lines_auto_marks_the_error_line(lean_server: LeanServer, convention: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kimina_jax.reward.lean_client")
    with SERVER_AS[convention](lean_server.url) as server, client(server.url, message_lines="auto") as lean:
        verdict = lean.check_sync([FAILING])[0]
        assert lean.message_lines == convention
        assert lean.requests == server.requests == 2  # the probe, then the snippet
        lean.check_sync([valid(4)])
        assert server.requests == 3  # probed once
    assert build_feedback(FAILING, verdict) == FEEDBACK[convention]
    assert f"auto -> '{convention}'" in caplog.text


@pytest.mark.lean_server
@pytest.mark.parametrize("convention, setting, lines", [
    # Body line 3 read as line 3 of the whole code: the blank line after the imports.
    ("body", "code", "001  | import Mathlib\n002  | import Aesop\n003 >| \n"
                     "004  | theorem t (n : ℕ) : n + 0 = n := by\n005  |   have h : n + 0 = n := by simp\n```\n"),
    # Code line 6 read as line 6 of the 5-line body: past its end, nothing marked.
    ("code", "body", "004  |   -- done\n005  |   -- really\n```\n"),
])
def test_a_wrong_message_lines_setting_marks_the_wrong_line(lean_server: LeanServer, convention: str, setting: str,
                                                           lines: str) -> None:
    with SERVER_AS[convention](lean_server.url) as server, client(server.url, message_lines=setting) as lean:
        verdict = lean.check_sync([FAILING])[0]
    assert build_feedback(FAILING, verdict) == HEAD + lines


def test_message_lines_setting_reaches_the_client() -> None:
    assert load_config("tiny", env={}).verifier.message_lines == "auto"
    with pytest.raises(KiminaError, match="'verifier.message_lines' must be one of 'auto', 'body', 'code'"):
        load_config("tiny", ["verifier.message_lines=lines"], env={})
    cfg = load_config("tiny", ["verifier.message_lines=code"], env={"LEAN_SERVER_API_URL": "http://127.0.0.1:9"})
    verifier = Rewarder.from_config(cfg.verifier, cfg.reward.format).verifier
    with verifier:
        assert isinstance(verifier, LeanClient) and verifier.message_lines == "code"


@pytest.mark.lean_server
def test_submit_while_generating_then_collect(lean_server: LeanServer) -> None:
    with client(lean_server.url) as lean:
        futures = []
        for i in range(5):  # completions arrive a few at a time
            futures += lean.submit([valid(10 * i + j) for j in range(3)])
            time.sleep(0.05)
        verdicts = lean.collect(futures)
        async_verdicts = asyncio.run(lean.check([valid(100), "theorem s : True := by sorry"]))
    assert [v.status for v in verdicts] == ["valid"] * 15
    assert [v.status for v in async_verdicts] == ["valid", "sorry"]


@pytest.mark.lean_server
def test_api_key(start_lean_server, caplog: pytest.LogCaptureFixture) -> None:
    server = start_lean_server(api_key=KEY)
    caplog.set_level(logging.DEBUG)
    with client(server.url, api_key=KEY) as lean:
        assert lean.check_sync([valid(1)])[0].status == "valid"
        assert KEY not in repr(lean)
    with FaultProxy(server.url) as proxy:
        for wrong in ("not-the-key", None):
            with client(proxy.url, api_key=wrong) as lean:
                with pytest.raises(KiminaError, match="HTTP 401") as raised:
                    lean.check_sync([valid(2)])
                assert KEY not in str(raised.value) and "LEAN_SERVER_API_KEY" in str(raised.value)
        assert proxy.requests == 2  # one request each: a 401 is never retried
    assert KEY not in caplog.text


@pytest.mark.lean_server
def test_lean_timeout_and_transport_timeout(lean_server: LeanServer) -> None:
    slow = valid(1, "-- standin: sleep 3\n")
    with client(lean_server.url, timeout_s=1) as lean:
        verdict = lean.check_sync([slow])[0]
        assert (verdict.status, verdict.error) == ("timeout", "Lean REPL command timed out in 1.0 seconds")
    with client(lean_server.url, timeout_s=10, http_timeout_s=1, retries=1) as lean:
        verdict = lean.check_sync([valid(2, "-- standin: sleep 3\n")])[0]
        assert verdict.status == "unverified" and "ReadTimeout" in verdict.error
        assert lean.requests == 2


@pytest.mark.lean_server
def test_repl_crash_mid_batch(lean_server: LeanServer) -> None:
    codes = [valid(i) for i in range(5)]
    codes[1] = valid(1, "-- standin: crash\n")  # crashes every time
    codes[2] = valid(2, "-- standin: crash-once\n")  # crashes, then works when retried
    codes[3] = valid(3, "-- standin: garbage\n")  # answers with text that is not JSON
    with client(lean_server.url, batch_size=8, retries=2) as lean:
        verdicts = lean.check_sync(codes)
        assert [v.status for v in verdicts] == ["valid", "server_error", "valid", "server_error", "valid"]
        assert "Snippet execution failed" in verdicts[1].error
        assert lean.check_sync([valid(99)])[0].status == "valid"  # the server recovered


@pytest.mark.lean_server
def test_whole_request_failures_of_the_older_server_are_retried(lean_server: LeanServer) -> None:
    with FaultProxy(lean_server.url, faults=[429, 500, 503]) as proxy, client(proxy.url) as lean:
        assert [v.status for v in lean.check_sync([valid(1), valid(2)])] == ["valid", "valid"]
        assert proxy.requests == 4
    with FaultProxy(lean_server.url, faults=[504, 499, 502, 500]) as proxy, client(proxy.url) as lean:
        verdict = lean.check_sync([valid(3)])[0]
        assert verdict.status == "unverified" and verdict.error.startswith("HTTP 500")
        assert proxy.requests == 4
    with FaultProxy(lean_server.url, faults=[422]) as proxy, client(proxy.url) as lean:
        with pytest.raises(KiminaError, match="HTTP 422"):
            lean.check_sync([valid(4)])
        assert proxy.requests == 1


@pytest.mark.lean_server
def test_no_free_repl_is_retried(start_lean_server) -> None:
    server = start_lean_server(max_repls=1, max_wait_s=1)
    with client(server.url, backoff_s=0.5, retries=5) as lean:
        verdicts = lean.check_sync([valid(i, "-- standin: sleep 0.8\n") for i in range(3)])
        assert [v.status for v in verdicts] == ["valid"] * 3
        assert lean.retried >= 1


@pytest.mark.lean_server
def test_server_killed_and_restarted_mid_run(start_lean_server) -> None:
    server = start_lean_server()
    codes = [valid(i, "-- standin: sleep 0.05\n") for i in range(300)]  # about 4 s with 4 REPLs
    with client(server.url, batch_size=8, max_in_flight=8, backoff_s=0.5, retries=4) as lean:
        futures = lean.submit(codes)
        deadline = time.monotonic() + 60  # a loaded machine starts the REPLs late: kill once a batch is back
        while not any(f.done() for f in futures) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill()
        done_before_kill = sum(f.done() for f in futures)
        server.start()
        verdicts = lean.collect(futures)
    statuses = [v.status for v in verdicts]
    assert len(verdicts) == 300
    assert set(statuses) <= {"valid", "unverified"}
    assert 0 < done_before_kill < statuses.count("valid")  # some were verified after the restart


def test_server_down_gives_unverified_never_a_verdict() -> None:
    with LeanClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01) as lean:
        assert not lean.health()
        verdicts = lean.check_sync([valid(1), valid(2)])
        assert lean.requests == 3 and lean.message_lines == "auto"  # each try was a failed probe; none settled it
    assert [v.status for v in verdicts] == ["unverified", "unverified"]
    assert "ConnectError" in verdicts[0].error and not verdicts[0].is_verified


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(KiminaError, match="url"):
        LeanClient("localhost:8000")
    with pytest.raises(KiminaError, match="batch_size"):
        LeanClient("http://localhost", batch_size=0)
    with pytest.raises(KiminaError, match="message_lines"):
        LeanClient("http://localhost", message_lines="lines")  # type: ignore[arg-type]


@pytest.mark.lean_server
def test_split_header_matches_the_server(lean_server_venv: Path) -> None:
    """Our copy of the server's header split gives the same header and body as the server's own function."""
    codes = [
        "import Mathlib\nimport Aesop\n\nset_option maxHeartbeats 400000\n\ntheorem a : True := by trivial\n",
        "\n\n  import Mathlib.Tactic\nimport Aesop\nimport Aesop\n\ntheorem a : True := trivial",
        "theorem a : True := trivial",
        "import Mathlib\r\n\r\ntheorem a :\r\n  True := by\u2028 trivial\x0c",
        "import Mathlib\nimport Mathlib",
        "",
    ]
    script = ("import json, sys\nfrom server.split import split_snippet\n"
              "print(json.dumps([list(split_snippet(c)) for c in json.load(sys.stdin)]))")
    done = subprocess.run([str(lean_server_venv / "bin/python"), "-c", script], input=json.dumps(codes),
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [list(split_header(c)[:2]) for c in codes]
