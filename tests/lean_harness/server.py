"""Run the REAL Kimina Lean Server (kimina-ast-server 2.1.3 from PyPI) with the stand-in REPL, on loopback.

The server spawns `lake env <REPL_PATH>` in `LEAN_SERVER_PROJECT_DIR`; the harness puts a stand-in `lake`
(`lake env CMD...` runs CMD) first on PATH and points REPL_PATH at a wrapper that runs `standin_repl.py` with the
project's Python. Everything the server needs lives in a work folder given by the caller.
"""
from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.lean_harness.venv import SHIMS_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURE_VERDICTS = REPO_ROOT / "tests/fixtures/lean_verdicts_sample.jsonl"
SHARED_VERDICTS = REPO_ROOT.parent / "shared/data/lean_verdicts.jsonl"


def recorded_verdict_files() -> list[Path]:
    """The recorded verdicts the stand-in REPL replays: the repo's sample, plus the shared full set if present."""
    return [p for p in (FIXTURE_VERDICTS, SHARED_VERDICTS) if p.exists()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


class LeanServer:
    """One server process. `start()` waits for `/health`; `kill()` is SIGKILL (a crash), `stop()` is SIGTERM."""

    def __init__(self, venv: Path, workdir: Path, *, api_key: str | None = None, max_repls: int = 4,
                 max_wait_s: int = 60, port: int | None = None) -> None:
        self.venv, self.workdir, self.api_key = venv, workdir, api_key
        self.max_repls, self.max_wait_s = max_repls, max_wait_s
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / "server.log"
        self._prepare()

    def _prepare(self) -> None:
        for name in ("bin", "project", "ast_export", "standin_state"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        _write_script(self.workdir / "bin/lake", '#!/bin/sh\n# Stand-in for Lean\'s lake: `lake env CMD...` runs CMD.\n'
                      '[ "$1" = env ] || { echo "stand-in lake: only `lake env` is supported" >&2; exit 2; }\n'
                      'shift\nexec "$@"\n')
        self.repl_path = _write_script(
            self.workdir / "bin/standin-repl",
            f'#!/bin/sh\nPYTHONPATH="{REPO_ROOT}" OPENBLAS_NUM_THREADS=1 exec "{sys.executable}" '
            f'-m tests.lean_harness.standin_repl\n')

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LEAN_SERVER_") and k != "PYTHONPATH"}
        env.update({
            "PATH": f"{self.workdir / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(SHIMS_DIR),
            "LEAN_SERVER_HOST": "127.0.0.1",
            "LEAN_SERVER_PORT": str(self.port),
            "LEAN_SERVER_LOG_LEVEL": "WARNING",
            "LEAN_SERVER_REPL_PATH": str(self.repl_path),
            "LEAN_SERVER_PROJECT_DIR": str(self.workdir / "project"),
            "LEAN_SERVER_AST_EXPORT_BIN": str(self.repl_path),
            "LEAN_SERVER_AST_EXPORT_PROJECT_DIR": str(self.workdir / "ast_export"),
            "LEAN_SERVER_MAX_REPLS": str(self.max_repls),
            "LEAN_SERVER_MAX_WAIT": str(self.max_wait_s),
            "KIMINA_STANDIN_VERDICTS": os.pathsep.join(str(p) for p in recorded_verdict_files()),
            "KIMINA_STANDIN_STATE_DIR": str(self.workdir / "standin_state"),
        })
        if self.api_key:
            env["LEAN_SERVER_API_KEY"] = self.api_key
        return env

    def start(self, timeout_s: float = 60.0) -> LeanServer:
        with open(self.log_path, "ab") as log:
            # Its own folder as cwd: the server reads a `.env` from there.
            self.process = subprocess.Popen([str(self.venv / "bin/kimina-ast-server")], cwd=self.workdir,
                                            env=self._env(), stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the Lean server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).json() == {"status": "ok"}:
                    return self
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the Lean server did not answer /health within {timeout_s} s:\n{self.log_tail()}")

    def _signal(self, sig: int, wait_s: float) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        self._signal(signal.SIGTERM, 10.0)

    def kill(self) -> None:
        self._signal(signal.SIGKILL, 10.0)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


class FaultProxy:
    """A loopback HTTP proxy in front of a server that first answers with given error statuses.

    Shows the client the whole-request failures of the upstream 2.0.0 build (429 no free REPL, 500 REPL died,
    503, 504) that kimina-ast-server 2.1.3 answers per snippet instead. Counts the requests it receives.
    `path`: only requests to it get the faults (e.g. "/api/check": /health still answers); None: every request.
    """

    def __init__(self, upstream: str, faults: list[int] | None = None, path: str | None = None) -> None:
        self.upstream, self.faults, self.path, self.requests = upstream, list(faults or []), path, 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _relay(self, method: str) -> None:
                proxy.requests += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.faults and proxy.path in (None, self.path):
                    status, data = proxy.faults.pop(0), json.dumps({"detail": "injected by FaultProxy"}).encode()
                else:
                    headers = {k: v for k, v in self.headers.items() if k.lower() in ("authorization", "content-type")}
                    reply = httpx.request(method, proxy.upstream + self.path, content=body, headers=headers,
                                          timeout=600)
                    status, data = reply.status_code, reply.content
                    if status == 200:
                        data = proxy.rewrite(self.path, body, data)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._relay("GET")

            def do_POST(self) -> None:
                self._relay("POST")

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def rewrite(self, path: str, request: bytes, reply: bytes) -> bytes:
        """The upstream server's reply body as the client gets it (unchanged here)."""
        return reply

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


class CodeLinesProxy(FaultProxy):
    """Makes kimina-ast-server 2.1.3 count message lines as upstream main since 2025-10-24 does (SPEC 11).

    That build's fix (#56, `_apply_header_offset` in server/routers/check.py) shifts the REPL's message and sorry
    lines by the count of leading import and blank lines it split off. The REPL only ever sees the body, so the
    shift is done here, on the /api/check replies, as the server does it (sorries only when there are messages).
    """

    def rewrite(self, path: str, request: bytes, reply: bytes) -> bytes:
        if path != "/api/check":
            return reply
        codes = {s["id"]: s["code"] for s in json.loads(request)["snippets"]}
        answer = json.loads(reply)
        for result in answer["results"]:
            response = result.get("response")
            if result.get("error") is not None or not response or not response.get("messages"):
                continue
            lines = codes[result["id"]].splitlines()
            offset = 0
            while offset < len(lines) and (not lines[offset].strip() or lines[offset].strip().startswith("import ")):
                offset += 1
            for entry in response["messages"] + (response.get("sorries") or []):
                for key in ("pos", "endPos"):
                    if entry.get(key):
                        entry[key]["line"] += offset
        return json.dumps(answer).encode()
