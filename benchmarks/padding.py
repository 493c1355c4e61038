"""Padding of packed mini-batches on a device mesh: what `pack_samples` gives the train step, without devices.

For a recipe's mini-batch (`ppo_mini_batch_size` prompts x `rollout.n` responses, its maximum lengths and row
length buckets) on `--devices` data-parallel devices (`rows_multiple` = devices x `algorithm.micro_batch_rows`),
`--batches` mini-batches of random lengths are packed and the table gives, min / mean / max over them:
- padded slots: slots of the computed (and transferred) micro-batches that hold no token, 1 - tokens / slots;
- one length: the same packed with `mixed_lengths=False` (one row length per mini-batch), which `pack_samples`
  leaves for mixed row lengths where those save 2% of the slots;
- mixed: mini-batches packed with several row lengths; shapes: distinct (micro-batches, row length) of the runs
  of micro-batches of one length, each a compilation of the gradient pass and of the log-prob pass; pack s:
  seconds per `pack_samples` call.
Lengths: a prompt length per group (lognormal, median 400 tokens), responses lognormal with median a quarter of
the maximum (`lognormal`, a few percent cut at the maximum) or uniform up to it (`uniform`).

    python benchmarks/padding.py                      # the 1.7B recipe and its dry run, 8 devices
    python benchmarks/padding.py --recipes kimina_prover_0.6B --devices 4 --batches 50
"""
from __future__ import annotations

import argparse
import functools
import time

import numpy as np

from kimina_jax.config import ENV_URL, load_config
from kimina_jax.grpo import PackItem, pack_samples, row_length_buckets


def response_lengths(rng: np.random.Generator, kind: str, n: int, max_response: int) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(1, max_response + 1, n)
    return np.clip(rng.lognormal(np.log(max_response / 4), 0.8, n), 1, max_response).astype(int)


def percent(values: list[float]) -> str:
    return f"{100 * min(values):.1f} / {100 * np.mean(values):.1f} / {100 * max(values):.1f}"


def measure(recipe: str, kind: str, devices: int, batches: int, seed: int) -> dict[str, str]:
    # The Lean server's address is only checked, never used: packing needs the lengths alone.
    cfg = load_config(recipe, env={ENV_URL: "http://localhost"})
    data, algorithm = cfg.data, cfg.algorithm
    buckets = row_length_buckets(algorithm.pack_length, min_length=min(256, algorithm.pack_length))
    rows_multiple = devices * algorithm.micro_batch_rows
    rng = np.random.default_rng(seed)
    padded, one_length, mixed, shapes, seconds = [], [], 0, set(), []
    for _ in range(batches):
        items = []
        for _ in range(algorithm.ppo_mini_batch_size):
            prompt = int(np.clip(rng.lognormal(np.log(400), 0.5), 16, data.max_prompt_length))
            for response in response_lengths(rng, kind, cfg.rollout.n, data.max_response_length):
                items.append(PackItem([1] * prompt, [2] * int(response), 0.0))
        pack = functools.partial(pack_samples, items, buckets, loss_agg_mode=algorithm.loss_agg_mode,
                                 max_response_len=algorithm.loss_norm_length, rows_multiple=rows_multiple)
        start = time.perf_counter()
        batch = pack()
        seconds.append(time.perf_counter() - start)
        padded.append(batch.padding_fraction)
        one_length.append(pack(mixed_lengths=False).padding_fraction)
        micro_lengths = [length for _, length in batch.micro_batches(rows_multiple)]
        mixed += len(set(micro_lengths)) > 1
        shapes.update((micro_lengths.count(length), length) for length in micro_lengths)
    return {
        "recipe": recipe, "lengths": kind, "items": str(len(items)), "padded slots %": percent(padded),
        "one length %": percent(one_length), "mixed": f"{mixed}/{batches}", "shapes": str(len(shapes)),
        "pack s": f"{np.mean(seconds):.3f}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["kimina_prover_1.7B", "dry_run"])
    parser.add_argument("--lengths", nargs="+", choices=["lognormal", "uniform"], default=["lognormal", "uniform"])
    parser.add_argument("--devices", type=int, default=8, help="data-parallel devices (batch rows split over them)")
    parser.add_argument("--batches", type=int, default=20, help="mini-batches per row of the table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"{args.devices} data-parallel devices, {args.batches} mini-batches per row, min / mean / max")
    rows = [measure(recipe, kind, args.devices, args.batches, args.seed)
            for recipe in args.recipes for kind in args.lengths]
    print_markdown_table(rows)


def print_markdown_table(rows: list[dict[str, str]]) -> None:
    """Rows of column -> text as a right-aligned Markdown table (also used by kv_capacity.py)."""
    widths = {name: max(len(name), *(len(row[name]) for row in rows)) for name in rows[0]}
    print("| " + " | ".join(name.rjust(width) for name, width in widths.items()) + " |")
    print("|" + "|".join("-" * (width + 2) for width in widths.values()) + "|")
    for row in rows:
        print("| " + " | ".join(row[name].rjust(width) for name, width in widths.items()) + " |")


if __name__ == "__main__":
    main()
