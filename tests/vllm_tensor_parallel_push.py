"""Run by test_rollout_vllm.py in its own process (vLLM spawns one worker process per tensor-parallel rank, and
the engines of the test session live in-process): a VllmEngine with tensor_parallel_size=2, started from a
folder's config.json with dummy weights, pushed perturbed weights twice; after each push, the greedy samples and
their log-probs go to a JSON file.

    python tests/vllm_tensor_parallel_push.py HF_FOLDER CONFIG_ONLY_FOLDER OUT
"""
from __future__ import annotations

import json
import os
import sys


def main(hf_folder: str, config_only: str, out: str) -> None:
    from tests.vllm_support import VLLM_CPU_ARGS, set_vllm_env

    set_vllm_env()
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # vLLM-CPU binds a NUMA node per rank; a VM has one
    from kimina_jax.models import load_hf_checkpoint
    from kimina_jax.rollout import SamplingParams, VllmEngine
    from tests.rollout_fixtures import perturbed
    from tests.test_rollout_vllm import PROMPTS, TP_PUSHES

    start = load_hf_checkpoint(hf_folder)
    engine = VllmEngine(config_only, load_format="dummy", seed=0, tensor_parallel_size=2, **VLLM_CPU_ARGS)
    results = []
    for noise in TP_PUSHES:
        engine.update_weights(perturbed(start, *noise))
        groups = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=8))
        results.append([[list(c.token_ids), c.logprobs.tolist()] for (c,) in groups])
    engine.close()
    with open(out, "w") as file:
        json.dump(results, file)


if __name__ == "__main__":  # vLLM starts its workers with `spawn`, which imports this module again
    main(*sys.argv[1:])
