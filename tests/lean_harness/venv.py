"""The Kimina Lean Server's own virtual environment (SPEC 11), created on first use and cached.

Its pins fight the project's, so it lives apart: `$KIMINA_LEAN_SERVER_VENV`, else
`~/.cache/kimina-jax/lean-server-venv`. A marker file written last says the venv is complete and which
packages it holds; a venv without a matching marker is rebuilt.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# Newer FastAPI rejects the server's constructor arguments; these are the versions it was found to run with.
PINNED = [
    "fastapi==0.116.1",
    "starlette==0.47.2",
    "uvicorn==0.35.0",
    "pydantic==2.11.7",
    "pydantic-core==2.33.2",
    "pydantic-settings==2.10.1",
]
# What the server imports; its own metadata also asks for `datasets` and `prisma`, which it does not need here.
DEPENDENCIES = [
    "python-dotenv", "loguru", "psutil", "rich", "google-cloud-logging", "httpx", "tenacity", "tqdm",
    "tabulate", "colorama", "pygments", "typing_extensions",
]
SERVER = ["kimina-ast-server==2.1.3", "kimina-ast-client==0.2.2"]
# The official client, for the benchmark. It ships a `kimina_client` module like kimina-ast-client, so it goes
# into its own folder (put on PYTHONPATH only by the benchmark) instead of overwriting the server's copy.
OFFICIAL_CLIENT = "kimina-client==0.2.1"
OFFICIAL_CLIENT_DIR = "official-kimina-client"
SHIMS_DIR = Path(__file__).parent / "shims"
_MARKER = "kimina-jax-ready.json"
_BUILDING = "kimina-jax-building"
# pip's words when the index cannot be reached: only then is a missing venv a reason to skip.
_OFFLINE_SIGNS = ("NewConnectionError", "Temporary failure in name resolution", "Network is unreachable",
                  "No matching distribution found", "ProxyError", "Max retries exceeded")


class ServerVenvUnavailable(RuntimeError):
    """The venv could not be created because the package index is unreachable."""


def venv_dir() -> Path:
    return Path(os.environ.get("KIMINA_LEAN_SERVER_VENV") or Path.home() / ".cache/kimina-jax/lean-server-venv")


def _wanted() -> dict:
    return {"python": sys.version_info[:2], "packages": PINNED + DEPENDENCIES + SERVER + [OFFICIAL_CLIENT]}


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *args],
                          capture_output=True, text=True)
    if done.returncode:
        tail = (done.stdout + done.stderr).strip()[-1500:]
        if any(sign in tail for sign in _OFFLINE_SIGNS):
            raise ServerVenvUnavailable(f"cannot install the Kimina Lean Server (package index unreachable?): {tail}")
        raise RuntimeError(f"pip install {' '.join(args)} failed:\n{tail}")


def ensure_server_venv() -> Path:
    """The venv's folder, creating it first if needed (about 15 s with a warm pip cache)."""
    venv = venv_dir()
    marker = venv / _MARKER
    wanted = json.loads(json.dumps(_wanted()))
    if marker.exists() and json.loads(marker.read_text()) == wanted:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test processes: one builds, the others wait
        if marker.exists() and json.loads(marker.read_text()) == wanted:
            return venv
        if venv.exists() and not (marker.exists() or (venv / _BUILDING).exists()):
            raise RuntimeError(f"{venv} exists but was not made by this harness: remove it or set "
                               "KIMINA_LEAN_SERVER_VENV to another folder")
        shutil.rmtree(venv, ignore_errors=True)
        venv.mkdir()
        (venv / _BUILDING).touch()
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        python = venv / "bin" / "python"
        _pip(python, *PINNED, *DEPENDENCIES)
        _pip(python, "--no-deps", *SERVER)
        _pip(python, "--no-deps", "--target", str(venv / OFFICIAL_CLIENT_DIR), OFFICIAL_CLIENT)
        marker.write_text(json.dumps(wanted))
    return venv
