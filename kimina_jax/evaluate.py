"""MiniF2F evaluation: pass@k and verl's mean@n, std@n, best@k and worst@k, with and without the error-fix turn
(SPEC 8). The command line of `kimina_jax.eval.run`.

    python -m kimina_jax.evaluate [--config <recipe>] --model <HF folder | run folder | checkpoint step folder> \\
        --dataset <minif2f file | hub name> [--n 32 --k 1,8,32 --error-fix --engine vllm|jax --out results/ ...] \\
        [key=value ...]

The config speaks training's language: `--config` takes a YAML file or a shipped recipe (a training recipe serves;
without one, the defaults), `key=value` overrides any key. Evaluation reads the sections training reads
(`model`, `data`, `rollout`, `verifier`, `reward`; the others are checked and ignored) and its own `eval` section:
sampling is `rollout.val`'s, the engine `rollout`'s, lengths `data`'s (for a training run or checkpoint: its saved
lengths, unless the config gives them). The short flags below only set config keys (shown with each), before the
`key=value` overrides.

Every problem gets `eval.n` samples (turn 1). With `eval.error_fix`, every failed turn-1 sample whose Lean feedback
makes a turn-2 prompt (SPEC 7: feedback non-empty and at most `data.error_fix.max_feedback_chars`, prompt within
`data.max_prompt_length`) gets ONE fix attempt: one sample for the prompt original messages + its response + the
feedback. Per sample: `acc_turn_1` = solved at turn 1; `acc_turn_2` = solved at turn 1 or by its fix ("solved within
one fix"). The headline `acc` is always turn 1, as in the original: the fix turn shows only under `acc_turn_2`.
Samples whose verification could not be done (`unverified`, `server_error`) are counted and left out, never scored
as failures; a fix that could not be verified leaves its sample out of acc_turn_2 only.

Output folder: `samples.jsonl` (every sample: problem, turn, sample index, response, extracted proof, verdict, Lean
messages, format error, feedback), `summary.json` (settings, averaged and per-problem metrics, counts) and
`settings.json`; a table is printed at the end. A rerun with the same `eval.out` continues: samples already verified
are kept, only missing ones are generated, and samples left unverified (server down) are verified again from their
stored responses; a larger `eval.n` adds samples. Sampling settings must match the folder's.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kimina_jax.config import ENV_KEY, ENV_URL, load_eval_config
from kimina_jax.errors import KiminaError
from kimina_jax.eval import pass_at_k
from kimina_jax.eval.run import SAMPLES_FILE, SUMMARY_FILE, ModelSource, run_evaluation
from kimina_jax.rollout.factory import share_accelerator_with_vllm

__all__ = ["format_table", "main", "pass_at_k"]


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


# The short flags, by help group: (flag, the config keys it sets, argparse options). No defaults here: the config's.
ALIASES: dict[str, list[tuple[str, tuple[str, ...], dict]]] = {
    "what to evaluate": [
        ("--model", ("eval.model",), {"help": "an HF folder, a training run folder or a checkpoint step"}),
        ("--dataset", ("eval.dataset.files",),
         {"type": lambda text: [text], "help": "a MiniF2F .jsonl/.parquet file or a Hub dataset name"}),
        ("--split", ("eval.split",), {"help": "rows whose 'split' column has this value"}),
        ("--hub-split", ("eval.dataset.hub_split",), {"help": "split loaded from a Hub dataset"}),
        ("--name", ("eval.dataset.name",), {"help": "data source name in metric names (none: <dataset>_<split>)"}),
        ("--limit", ("eval.dataset.limit",), {"type": int, "help": "only the first N problems"}),
        ("--n", ("eval.n",), {"type": int, "help": "samples per problem"}),
        ("--k", ("eval.k",), {"type": _int_list, "help": "pass@k / best@k sizes, comma-separated"}),
        ("--error-fix", ("eval.error_fix",), {"action": "store_const", "const": True,
                                              "help": "one fix attempt per failed sample (SPEC 7)"}),
        ("--out", ("eval.out",), {"help": "output folder; rerun with the same one to resume"}),
    ],
    "sampling": [
        ("--temperature", ("rollout.val.temperature",), {"type": float}),
        ("--top-p", ("rollout.val.top_p",), {"type": float}),
        ("--top-k", ("rollout.val.top_k",), {"type": int, "help": "-1: off"}),
        ("--max-tokens", ("data.max_response_length",), {"type": int, "help": "response length"}),
        ("--max-prompt-length", ("data.max_prompt_length",), {"type": int, "help": "turn-1 and fix prompts"}),
        ("--max-feedback-chars", ("data.error_fix.max_feedback_chars",),
         {"type": int, "help": "longer Lean feedback gets no fix"}),
        ("--seed", ("eval.seed",), {"type": int}),
        ("--batch-problems", ("eval.batch_problems",), {"type": int, "help": "problems per generate call"}),
    ],
    "engine": [
        ("--engine", ("rollout.engine",), {"help": "vllm, jax or vllm-server"}),
        ("--dtype", ("model.dtype", "rollout.vllm.dtype"),
         {"help": "compute dtype of an HF folder's model and of vLLM (a checkpoint keeps its own)"}),
        ("--gpu-memory-utilization", ("rollout.vllm.gpu_memory_utilization",), {"type": float}),
        ("--kv-cache-bytes", ("rollout.vllm.kv_cache_bytes", "rollout.jax.kv_cache_bytes"),
         {"type": int, "help": "the engine's KV cache size (vLLM on CPU needs it)"}),
        ("--tensor-parallel-size", ("rollout.vllm.tensor_parallel_size",), {"type": int, "help": "vLLM"}),
        ("--enforce-eager", ("rollout.vllm.enforce_eager",),
         {"action": "store_const", "const": True, "help": "vLLM: no CUDA graphs"}),
    ],
    f"verifier (server address from ${ENV_URL}, its key from ${ENV_KEY})": [
        ("--verifier", ("verifier.kind",),
         {"help": "lean, or standin: a LOCAL STAND-IN with text rules, NOT Lean (pipeline checks only)"}),
        ("--lean-timeout-s", ("verifier.timeout_s",), {"type": float}),
        ("--lean-batch-size", ("verifier.batch_size",), {"type": int}),
        ("--lean-max-in-flight", ("verifier.max_in_flight",), {"type": int}),
        ("--lean-retries", ("verifier.retries",), {"type": int}),
    ],
}


def parse_args(argv: Sequence[str] | None = None) -> tuple[str | None, list[str]]:
    """(the --config value, the overrides: those the short flags stand for, then the `key=value` ones)."""
    parser = argparse.ArgumentParser(
        prog="python -m kimina_jax.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="YAML file or shipped recipe name (none: the defaults)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.n=8 rollout.val.top_p=1.0")
    flags = []
    for title, aliases in ALIASES.items():
        group = parser.add_argument_group(title)
        for flag, keys, options in aliases:
            help_text = options.get("help")
            also = f"= {', '.join(keys)}"
            group.add_argument(flag, **{**options, "help": f"{help_text} ({also})" if help_text else also})
            flags.append((flag.removeprefix("--").replace("-", "_"), keys))
    args = parser.parse_intermixed_args(argv)
    # JSON is YAML: each value reads back as it was parsed (a --name of `1e3` stays a string).
    aliased = [f"{key}={json.dumps(value)}" for dest, keys in flags if (value := getattr(args, dest)) is not None
               for key in keys]
    return args.config, [*aliased, *args.overrides]


def format_table(summary: dict) -> str:
    """The printed result: one row per turn (`acc` = turn 1, then `acc_turn_2`), mean@n, pass@k, best@k in percent."""
    n, ks = summary["n"], summary["k"]
    columns = [f"mean@{n}", *(f"pass@{k}" for k in ks), *(f"best@{k}/mean" for k in ks if k > 1)]
    rows = [("acc (turn 1)", "acc")] + ([("acc_turn_2 (within one fix)", "acc_turn_2")] if summary["error_fix"] else [])
    width = max(len(c) for c in columns) + 2
    label_width = max(len(label) for label, _ in rows)
    lines = [
        f"{summary['data_source']}: {summary['problems']} problems, n={n} samples each, "
        f"verifier: {summary['verifier']}",
        f"{'':{label_width}}" + "".join(f"{c.removesuffix('/mean'):>{width}}" for c in columns),
    ]
    for label, var in rows:
        metrics = summary["metrics"][var]
        cells = [f"{100 * metrics[c]:.2f}%" if c in metrics else "-" for c in columns]
        lines.append(f"{label:{label_width}}" + "".join(f"{cell:>{width}}" for cell in cells))
    counts = summary["counts"]
    lines.append(
        f"unverified samples (left out): turn 1: {counts.get('unverified_turn_1', 0)}, "
        f"turn 2: {counts.get('unverified_turn_2', 0)}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, overrides = parse_args(argv)
    try:
        cfg = load_eval_config(config, overrides)
        # Before anything starts JAX (reading a checkpoint's config does): leave vLLM its share of the accelerator.
        share_accelerator_with_vllm(cfg.rollout)
        source = ModelSource.resolve(cfg.eval.model)
        cfg = load_eval_config(config, overrides, run_config=source.saved_config)  # with the run's saved lengths
        summary = run_evaluation(cfg, source)
    except KiminaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(summary))
    print(f"wrote {Path(cfg.eval.out) / SAMPLES_FILE} and {Path(cfg.eval.out) / SUMMARY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
