"""Run twice by test_rollout_vllm_server.py, as JAX processes 0 and 1 of one job: both push the same perturbed
weights to a vLLM server pool (process 0 alone writes and reloads), then each samples its share of the prompts
greedily from the pool and process 0 writes every share to a JSON file.

    python tests/vllm_server_two_processes.py COORDINATOR PROCESS_ID HF_FOLDER WEIGHTS_DIR OUT URL [URL ...]
"""
from __future__ import annotations

import json
import sys

import jax


def main(coordinator: str, process_id: int, hf_folder: str, weights_dir: str, out: str, urls: list[str]) -> None:
    jax.distributed.initialize(coordinator, num_processes=2, process_id=process_id)
    from kimina_jax.models import load_hf_checkpoint
    from kimina_jax.parallel import allgather_objects, make_mesh
    from kimina_jax.rollout import SamplingParams, VllmServerEngine
    from tests.rollout_fixtures import perturbed
    from tests.test_rollout_vllm_server import PROMPTS, PUSHED_NOISE

    local = make_mesh(1, -1, 1, devices=jax.local_devices())
    model = perturbed(load_hf_checkpoint(hf_folder, mesh=local), *PUSHED_NOISE)
    engine = VllmServerEngine(urls, weights_dir, model.config)
    engine.update_weights(model)
    mine = PROMPTS[process_id::2]
    groups = engine.generate(mine, SamplingParams(temperature=0, max_tokens=8))
    shares = allgather_objects([[list(c.token_ids), c.logprobs.tolist()] for (c,) in groups])
    if process_id == 0:
        with open(out, "w") as file:
            json.dump({"shares": shares, "sync_s": engine.last_sync_s}, file)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])
