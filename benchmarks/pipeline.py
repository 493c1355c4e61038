"""Wall time of a full training step split by phase: synchronous vs overlapped rollouts vs one-step off-policy;
with `--long-tail`, synchronous vs overlapped vs partial rollouts on long-tailed responses.

    python benchmarks/pipeline.py [--steps 5] [--warmup 5] [--prompts 16] [--n 4] [--max-tokens 128]
                                  [--latency-s 0.25] [--repls 8] [--chunks 2] [--verifier-batch 8] [--in-flight 40]
    python benchmarks/pipeline.py --long-tail [--max-tokens 512] ...

The tiny recipe on CPU (random tiny Qwen3, JAX sampler) against the real Kimina Lean Server (kimina-ast-server,
tests/lean_harness) with the stand-in REPL, NOT Lean. The random model writes no proofs, so each completion's
text is replaced, before scoring, by a response holding a proof of its statement with a stand-in directive that
makes the REPL answer after `--latency-s` seconds: every sample costs one Lean check of fixed latency (the
rewards mean nothing). The client sends the recipes' `verifier.batch_size` (8) proofs per request with up to their
`verifier.max_in_flight` (40) requests in flight, so the server always holds proofs for every REPL: with one proof
per request and one request per REPL, each REPL would idle after each proof until the server's reply (kimina-ast-server
2.1.3 answers a request at its next 0.1 s client-disconnect poll), about 0.05 s a proof. Modes:
- sync: `rollout.overlap_chunks=1`, all generation, then all verification;
- overlapped: `rollout.overlap_chunks=--chunks`, each call's proofs are checked while the next call generates;
- off-policy: overlapped, plus `algorithm.off_policy=true` (the next step generates while this one trains).
Each mode runs `--warmup` untimed steps (compilation: a new response length can bring a new packed shape in the
first steps), then `--steps` measured steps. The table shows `step` as their mean (wall time / steps: off-policy
steps alternate between short and long as verification runs ahead, so that is its throughput) and the phases as
medians, in seconds; `compile` is the XLA compilation time within a step.
`rollout` is the trainer's time spent getting a step's samples (generation + verification it waited for).

`--long-tail`: each response stops at a length drawn lognormal (sigma 1) around a median of max_tokens / 16, cut at
max_tokens (the recipe's shape, 24,576 over a median of about 1.5k, scaled to CPU), by the STAND-IN for EOS of
tests/length_standin.py (the random model never samples EOS); modes sync, overlapped and partial
(`rollout.partial.enabled`, over_provision 1.5). Besides the phases: trained response tokens per second of step
time, and sequential decode iterations per trained token (`rollout/decode_steps`: the exact count, the figure
that matters on a GPU or TPU, where a decode step costs about the same for few rows as for a full batch).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from jax._src.dispatch import BACKEND_COMPILE_EVENT  # noqa: E402

from kimina_jax.config import load_config  # noqa: E402
from kimina_jax.pipeline import MainProcessRewarder  # noqa: E402
from kimina_jax.reward import Rewarder  # noqa: E402
from kimina_jax.reward.extract import normalize_statement  # noqa: E402
from kimina_jax.train import Trainer  # noqa: E402
from tests.lean_harness.server import LeanServer  # noqa: E402
from tests.lean_harness.venv import ensure_server_venv  # noqa: E402
from tests.length_standin import DrawnLengths, lognormal_length  # noqa: E402

COLUMNS = ("step", "rollout", "gen", "verify", "verify_wait", "gen_wait", "old_log_prob", "update_actor",
           "sync_weights", "compile")
COMPILE_S: list[float] = []  # XLA compilations' seconds, as jax.monitoring reports them
jax.monitoring.register_event_duration_secs_listener(
    lambda name, seconds, **_: COMPILE_S.append(seconds) if name == BACKEND_COMPILE_EVENT else None)


class FixedLatencyProofs(Rewarder):
    """Scores a stand-in response instead of the model's: a proof of the prompt's statement that the stand-in
    REPL answers after a fixed pause. A counter keeps every proof distinct (no cache can answer it)."""

    def __init__(self, verifier, thresholds, latency_s: float):
        super().__init__(verifier, thresholds)
        self.latency_s = latency_s
        self.sent = 0

    def submit(self, prompt, completions):
        replaced = []
        for completion in completions:
            self.sent += 1
            proof = (f"```lean4\n{normalize_statement(prompt.formal_statement)}\n"
                     f"  -- standin: sleep {self.latency_s}\n  norm_num -- proof {self.sent}\n```")
            replaced.append(dataclasses.replace(completion, text=proof))
        return super().submit(prompt, replaced)


def run_mode(args, url: str, overrides: list[str]) -> dict[str, float]:
    base = [
        f"data.train_batch_size={args.prompts}", f"algorithm.ppo_mini_batch_size={args.prompts // 2}",
        f"rollout.n={args.n}", f"data.max_response_length={args.max_tokens}",
        f"trainer.total_steps={args.warmup + args.steps + 10}", "trainer.val_before_train=false",
        f"verifier.batch_size={args.verifier_batch}", f"verifier.max_in_flight={args.in_flight}",
        "logging.console=false", "logging.tensorboard=false", "logging.progress_bars=false",
        "logging.dump_rollouts=false", "data.error_fix.enabled=false",
    ]
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as run_dir:
        cfg = load_config("tiny", [*base, *overrides], run_dir=run_dir, env={"LEAN_SERVER_API_URL": url})
        trainer = Trainer(cfg)
        verifier = trainer.rewarder.verifier
        trainer.rewarder = MainProcessRewarder(FixedLatencyProofs(verifier, cfg.reward.format, args.latency_s))
        if args.long_tail:
            lengths = lognormal_length(max(1, args.max_tokens // 16), args.max_tokens)
            trainer.engine = DrawnLengths(trainer.engine, lengths, trainer.tokenizer)
        steps = []
        try:
            for _ in range(args.warmup + args.steps):
                trainer.step += 1
                started, compiled = time.perf_counter(), sum(COMPILE_S)
                metrics = trainer.train_step()
                steps.append({**metrics, "timing_s/step": time.perf_counter() - started,  # `fit` times the step
                              "timing_s/compile": sum(COMPILE_S) - compiled})
        finally:
            trainer.close()
    measured = steps[args.warmup:]
    phases = {name: statistics.median(m.get(f"timing_s/{name}", 0.0) for m in measured) for name in COLUMNS}
    trained = sum(m["response_length/mean"] * args.prompts * args.n for m in measured)
    seconds = sum(m["timing_s/step"] for m in measured)
    return {**phases, "step": seconds / len(measured), "trained_tok_s": trained / seconds,
            "decode_per_token": sum(m["rollout/decode_steps"] for m in measured) / trained}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="measured steps per mode")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per mode before them")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per step")
    parser.add_argument("--n", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=128, help="max response tokens")
    parser.add_argument("--latency-s", type=float, default=0.25, help="stand-in Lean time per proof")
    parser.add_argument("--repls", type=int, default=8, help="stand-in REPLs in the server (proofs checked at once)")
    # The JAX sampler on CPU pays per call: fewer, bigger calls keep generation about as fast as one call.
    parser.add_argument("--chunks", type=int, default=2, help="rollout.overlap_chunks of the overlapped modes")
    parser.add_argument("--verifier-batch", type=int, default=8, help="verifier.batch_size (proofs per request)")
    parser.add_argument("--in-flight", type=int, default=40, help="verifier.max_in_flight (requests at once)")
    parser.add_argument("--long-tail", action="store_true", help="lognormal response lengths; partial rollouts")
    return parser.parse_args(argv)


def modes(args) -> dict[str, list[str]]:
    chunks = f"rollout.overlap_chunks={args.chunks}"
    third = (["rollout.partial.enabled=true", "rollout.partial.over_provision=1.5"] if args.long_tail
             else [chunks, "algorithm.off_policy=true"])
    return {"sync": ["rollout.overlap_chunks=1"], "overlapped": [chunks],
            "partial" if args.long_tail else "off-policy": third}


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    server = LeanServer(ensure_server_venv(), Path(tempfile.mkdtemp(prefix="lean-bench-")), max_repls=args.repls)
    server.start()
    try:
        results = {name: run_mode(args, server.url, overrides) for name, overrides in modes(args).items()}
    finally:
        server.stop()

    print(f"\ntiny Qwen3 on {os.cpu_count()} CPU cores, {args.prompts} prompts x {args.n} samples x <= "
          f"{args.max_tokens} tokens per step; real Lean server, {args.repls} stand-in REPLs answering each proof "
          f"after {args.latency_s} s, {args.verifier_batch} per request, <= {args.in_flight} requests in flight; "
          f"overlapped modes in {args.chunks} engine calls; {args.steps} steps after {args.warmup} untimed (s): "
          "step mean, phase medians" + ("; lengths lognormal, median max_tokens / 16 (stand-in EOS)" if args.long_tail
                                        else ""))
    columns = (*COLUMNS, "trained_tok_s", "decode_per_token")
    print("| mode       | " + " | ".join(f"{c:>16}" for c in columns) + " |")
    print("|------------|" + "|".join("-" * 18 for _ in columns) + "|")
    for name, values in results.items():
        print(f"| {name:<10} | " + " | ".join(f"{values[c]:>16.4f}" if c == "decode_per_token" else
                                             f"{values[c]:>16.2f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
