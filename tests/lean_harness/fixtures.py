"""Pytest fixtures for tests against the real Kimina Lean Server + stand-in REPL (registered in tests/conftest.py).

- `lean_server_venv`: the server's cached venv; skips (with pip's reason) only when the package index is unreachable.
- `lean_server`: one shared server for the session (no API key, 4 REPLs).
- `start_lean_server(**options)`: a fresh server for tests that need their own (API key, kill/restart, few
  REPLs); stopped at the end of the test.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.lean_harness.server import LeanServer
from tests.lean_harness.venv import ServerVenvUnavailable, ensure_server_venv


@pytest.fixture(scope="session")
def lean_server_venv() -> Path:
    try:
        return ensure_server_venv()
    except ServerVenvUnavailable as exc:
        pytest.skip(f"real Lean server tests need the kimina-ast-server venv, which could not be created: {exc}")


@pytest.fixture(scope="session")
def lean_server(lean_server_venv: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LeanServer]:
    server = LeanServer(lean_server_venv, tmp_path_factory.mktemp("lean_server")).start()
    yield server
    server.stop()


@pytest.fixture
def start_lean_server(lean_server_venv: Path, tmp_path: Path) -> Iterator[Callable[..., LeanServer]]:
    servers: list[LeanServer] = []

    def start(**options: object) -> LeanServer:
        server = LeanServer(lean_server_venv, tmp_path / f"server{len(servers)}", **options).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
