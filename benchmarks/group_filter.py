"""What DAPO's group filter saves in the GRPO update: `TrainStep.update` on a step's batch with and without the
groups whose rewards are all equal (their GRPO advantages are 0, yet they cost forward and backward).

A random-weight Qwen3 of shape `--shape` (no download; the shapes of `train_step.py`) and `--groups` groups of `--n`
responses with random lengths; half of the groups are all-equal (alternately all-0 and all-1), the others mix 0 and
1. `full` packs every response, `filtered` only those `informative_groups` keeps. Both batches are compiled and run
once untimed, then timed in `--rounds` alternating rounds (min / median / max). Tokens: the packed rows' tokens
(what the update computes on) and the loss tokens (response tokens).

    python benchmarks/group_filter.py --dtype float32                                   # CPU, tiny shape
    python benchmarks/group_filter.py --shape qwen3-0.6b --groups 32 --n 8 --prompt-len 512 \\
        --max-response-len 3584 --row-length 16384 --dtype bfloat16 --remat full        # one GPU
"""
from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from train_step import SHAPES

from kimina_jax.config import AlgorithmConfig, OptimConfig
from kimina_jax.grpo import PackItem, TrainStep, compute_advantages, informative_groups, pack_samples
from kimina_jax.models import Qwen3Config, Qwen3ForCausalLM
from kimina_jax.models.qwen3 import REMAT_POLICIES

AGG_MODE = "seq-mean-token-sum-norm"  # the recipe's


def synthetic_step(groups: int, n: int, prompt_len: int, max_response_len: int, vocab: int, seed: int):
    """One step's responses as PackItems with GRPO advantages, and each response's score and group."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 2, (groups, n)).astype(np.float32)
    scores[0::2] = (np.arange(0, groups, 2) // 2 % 2)[:, None]  # even groups: all-0, all-1, all-0, ...
    for group in range(1, groups, 2):  # odd groups: at least one of each
        scores[group, :2] = [0.0, 1.0]
    scores, group_ids = scores.ravel(), np.repeat(np.arange(groups), n)
    advantages = np.asarray(compute_advantages("grpo", scores, group_ids))
    items = []
    for advantage in advantages:
        length = int(rng.integers(max(1, max_response_len // 4), max_response_len + 1))
        items.append(PackItem(rng.integers(0, vocab, prompt_len).tolist(), rng.integers(0, vocab, length).tolist(),
                              float(advantage), -rng.random(length).astype(np.float32)))
    return items, scores, group_ids


def time_updates(step: TrainStep, state, batches: dict[str, object], rounds: int):
    """Seconds of each batch's updates over `rounds` alternating rounds, after one untimed call each (compile)."""
    times: dict[str, list[float]] = {name: [] for name in batches}
    grad_norms: dict[str, float] = {}
    for round_index in range(rounds + 1):
        for name, batch in batches.items():
            started = time.perf_counter()
            state, metrics = step.update(state, batch, 0)
            jax.block_until_ready(metrics)
            if round_index:
                times[name].append(time.perf_counter() - started)
            grad_norms[name] = float(metrics["actor/grad_norm"])
    return times, grad_norms


def print_table(rows: list[dict[str, str]]) -> None:
    widths = [max(len(name), *(len(row[name]) for row in rows)) for name in rows[0]]
    print("| " + " | ".join(name.rjust(width) for name, width in zip(rows[0], widths)) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths) + "|")
    for row in rows:
        print("| " + " | ".join(value.rjust(width) for value, width in zip(row.values(), widths)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--groups", type=int, default=16, help="prompts in the step (even: half are all-equal)")
    parser.add_argument("--n", type=int, default=8, help="responses per prompt")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-response-len", type=int, default=224, help="lengths are uniform in [max/4, max]")
    parser.add_argument("--row-length", type=int, default=512, help="packed row length")
    parser.add_argument("--micro-batch-rows", type=int, default=1, help="rows per gradient-accumulation step")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="compute dtype")
    parser.add_argument("--remat", choices=REMAT_POLICIES, default="full")
    parser.add_argument("--rounds", type=int, default=5, help="timed updates per batch, alternating")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.groups < 2 or args.groups % 2:
        parser.error("--groups must be even (half of them are all-equal)")
    if args.n < 2 or args.rounds < 1:
        parser.error("--n must be >= 2 and --rounds >= 1")

    config = Qwen3Config(**SHAPES[args.shape], tie_word_embeddings=True)
    model = Qwen3ForCausalLM(config, dtype=jnp.dtype(args.dtype), remat=args.remat, rngs=nnx.Rngs(args.seed))
    algorithm = AlgorithmConfig(micro_batch_rows=args.micro_batch_rows, loss_agg_mode=AGG_MODE,
                                loss_norm_length=args.max_response_len)
    step = TrainStep(model, algorithm, OptimConfig(lr=1e-6))
    state = step.init_state(model)
    del model

    items, scores, group_ids = synthetic_step(args.groups, args.n, args.prompt_len, args.max_response_len,
                                              config.vocab_size, args.seed)
    keep = informative_groups(scores, group_ids)
    pack = functools.partial(pack_samples, row_buckets=(args.row_length,), loss_agg_mode=AGG_MODE,
                             max_response_len=args.max_response_len, rows_multiple=step.rows_multiple)
    batches = {"full": pack(items), "filtered": pack([item for item, kept in zip(items, keep) if kept])}
    times, grad_norms = time_updates(step, state, batches, args.rounds)

    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), shape {args.shape} "
          f"({config.num_params / 1e6:.1f}M params), {args.dtype}, remat {args.remat}, {args.groups} groups x "
          f"{args.n} responses (half all-equal), rows of {args.row_length} tokens, {args.micro_batch_rows} per "
          f"micro-batch, {args.rounds} rounds, compile excluded, compilations {step.compilations['update']}")
    full_median = float(np.median(times["full"]))
    rows = []
    for name, batch in batches.items():
        seconds = np.array(times[name])
        rows.append({
            "batch": name,
            "groups": str(len(np.unique(group_ids if name == "full" else group_ids[keep]))),
            "responses": str(batch.num_items),
            "rows": str(batch.num_rows),
            "tokens": str(batch.tokens.size),
            "loss tokens": str(int(batch.loss_mask.sum())),
            "update s min/median/max": f"{seconds.min():.3f} / {np.median(seconds):.3f} / {seconds.max():.3f}",
            "vs full": f"{np.median(seconds) / full_median:.2f}x",
            "grad_norm": f"{grad_norms[name]:.3g}",
        })
    print_table(rows)


if __name__ == "__main__":
    main()
