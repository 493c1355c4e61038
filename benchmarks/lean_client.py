"""Throughput of our LeanClient vs the official kimina-client 0.2.1, against the same real server + stand-in REPL.

    python benchmarks/lean_client.py [--snippets 2000] [--in-flight 40] [--batch-size 8] [--rounds 3]

Starts kimina-ast-server 2.1.3 (tests/lean_harness, venv created on first use) with the stand-in REPL (NOT Lean:
it answers at once, so the numbers measure the HTTP path, the server and the clients). Each client checks the
same number of distinct snippets with the same batch size and requests in flight; the official client runs in
the server's venv (its `kimina_client` import needs that venv's pins and the TypedDict shim on Python 3.11).
Prints snippets/s (median over rounds) and client CPU time per snippet.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kimina_jax.reward import LeanClient  # noqa: E402
from tests.lean_harness.server import LeanServer  # noqa: E402
from tests.lean_harness.venv import OFFICIAL_CLIENT, OFFICIAL_CLIENT_DIR, SHIMS_DIR, ensure_server_venv  # noqa: E402

OFFICIAL_SCRIPT = """
import asyncio, json, sys, time
import kimina_client
from kimina_client import AsyncKiminaClient, KiminaClient
args = json.load(sys.stdin)
codes, kind = args["codes"], args["kind"]
wall, cpu = time.perf_counter(), time.process_time()
if kind == "sync":
    result = KiminaClient(api_url=args["url"]).check(codes, timeout=60, batch_size=args["batch_size"],
                                                     max_workers=args["in_flight"], show_progress=False)
else:
    result = asyncio.run(AsyncKiminaClient(api_url=args["url"]).check(
        codes, timeout=60, batch_size=args["batch_size"], max_workers=args["in_flight"], show_progress=False))
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
statuses = [r.analyze().status.value for r in result.results]
print(json.dumps({"wall": wall, "cpu": cpu, "valid": statuses.count("valid"), "n": len(statuses),
                  "module": kimina_client.__file__}))
"""


def codes(round_index: int, client: str, n: int) -> list[str]:
    """Distinct snippets, never repeated across runs (no cache can help)."""
    statement = "import Mathlib\n\ntheorem b_{}_{}_{} (n : ℕ) : n + 0 = n := by\n  simp"
    return [statement.format(client, round_index, i) for i in range(n)]


def run_ours(url: str, snippets: list[str], batch_size: int, in_flight: int) -> dict:
    with LeanClient(url, batch_size=batch_size, max_in_flight=in_flight) as client:
        wall, cpu = time.perf_counter(), time.process_time()
        verdicts = client.check_sync(snippets)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"wall": wall, "cpu": cpu, "valid": sum(v.status == "valid" for v in verdicts), "n": len(verdicts)}


def run_official(venv: Path, kind: str, url: str, snippets: list[str], batch_size: int, in_flight: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{venv / OFFICIAL_CLIENT_DIR}{os.pathsep}{SHIMS_DIR}"}
    args = {"codes": snippets, "kind": kind, "url": url, "batch_size": batch_size, "in_flight": in_flight}
    done = subprocess.run([str(venv / "bin/python"), "-c", OFFICIAL_SCRIPT], input=json.dumps(args), env=env,
                          capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert OFFICIAL_CLIENT_DIR in result.pop("module"), "the official client was not the one imported"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snippets", type=int, default=2000)
    parser.add_argument("--in-flight", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-repls", type=int, default=4)
    args = parser.parse_args()

    venv = ensure_server_venv()
    server = LeanServer(venv, Path(tempfile.mkdtemp(prefix="lean-bench-")), max_repls=args.max_repls).start()
    clients = {
        "kimina-jax LeanClient (async, pooled)": lambda s: run_ours(server.url, s, args.batch_size, args.in_flight),
        f"{OFFICIAL_CLIENT} KiminaClient (sync, the recipe's)":
            lambda s: run_official(venv, "sync", server.url, s, args.batch_size, args.in_flight),
        f"{OFFICIAL_CLIENT} AsyncKiminaClient":
            lambda s: run_official(venv, "async", server.url, s, args.batch_size, args.in_flight),
    }
    runs: dict[str, list[dict]] = {name: [] for name in clients}
    try:
        run_ours(server.url, codes(-1, "warmup", 200), args.batch_size, args.in_flight)  # start the REPLs
        for round_index in range(args.rounds):
            for c, (name, run) in enumerate(clients.items()):
                result = run(codes(round_index, str(c), args.snippets))
                assert result["valid"] == result["n"] == args.snippets, (name, result)
                runs[name].append(result)
    finally:
        server.stop()

    print(f"\n{args.snippets} snippets, batch {args.batch_size}, {args.in_flight} requests in flight, "
          f"server with {args.max_repls} stand-in REPLs, {os.cpu_count()} CPU cores, median of {args.rounds} rounds")
    print(f"| {'client':<56} | {'snippets/s':>10} | {'client CPU ms/snippet':>21} |")
    print(f"|{'-' * 58}|{'-' * 12}|{'-' * 23}|")
    for name, results in runs.items():
        rate = statistics.median(r["n"] / r["wall"] for r in results)
        cpu_ms = statistics.median(1000 * r["cpu"] / r["n"] for r in results)
        print(f"| {name:<56} | {rate:>10.0f} | {cpu_ms:>21.3f} |")


if __name__ == "__main__":
    main()
