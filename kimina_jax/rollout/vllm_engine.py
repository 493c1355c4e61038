"""vLLM in the trainer's process, fed the trainer's weights in memory after every step.

What the installed vLLM offers decides the path, once, at start (facts read from vLLM 0.32's source, SPEC 12):
- The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker): the weight stream and its
  tensors reach the worker as Python objects, so GPU tensors stay zero-copy DLPack views of the JAX arrays.
- Torch backends (CUDA, CPU): the worker's `reload_weights(weights_iterator=...)` (layerwise in-place reload),
  called through `LLM.collective_rpc` with a lazy (HF name, torch.Tensor) stream from `weights.py`. It re-runs
  the backend's weight processing, which is why the plain `model.load_weights` is not used: on the CPU backend
  weights are repacked after loading and a second `load_weights` fails. vLLM's weight-transfer engines
  (`init_weight_transfer_engine` / `update_weights`, NCCL or CUDA IPC) move weights between processes; with the
  engine in this process they would only add copies, so they are not used.
- TPU (tpu-inference, weights are JAX arrays): `tpu_inference.push_weights` (not run in this project's CI).
- Then `reset_prefix_cache()`: cached prompt KV was computed with the old weights.
- Workers in other processes (tensor_parallel_size > 1): Python objects cannot reach them, so the weights go
  through a temporary HF folder (in `TMPDIR`: point it at a RAM disk such as /dev/shm to stay off disk) that
  every worker reads with `reload_weights(weights_path=...)`, as a vllm-server does. An engine started with
  dummy weights is first switched to the safetensors loader (the worker's `update_config`).

Log-probs: `logprobs_mode="processed_logprobs"`, so vLLM reports log_softmax(logits / temperature) at the sampled
token, the trainer's definition, whenever no top-k / top-p filter is set (the training recipe: top_p 1). With a
filter vLLM renormalises over the kept tokens and the numbers are that distribution's; the "raw" mode would
instead ignore the temperature. Greedy requests get log_softmax(logits).

Partial rollouts (`continue_samples`) step vLLM's engine themselves, as `LLM.generate` does, but with the default
CUMULATIVE output kind, so every step's output of a request holds all its tokens so far (`LLM.generate` asks for
FINAL_ONLY); to stop part way, the requests left are aborted (`LLMEngine.abort_request`), which drops them from
the scheduler and the output processor at once: nothing stays pending for the next call.

Text is decoded here with the caller's tokenizer (vLLM runs without one), and stop ids are passed explicitly,
so both engines stop on the same ids. Sleep mode (where vLLM has it: CUDA, ROCm, XPU) uses level 1: weights go
to host memory, the KV cache is dropped. Elsewhere (the CPU backend) `enable_sleep_mode` is ignored and
`sleep`/`wake` only guard against use while asleep.
"""
from __future__ import annotations

import collections
import inspect
import itertools
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kimina_jax.errors import KiminaError
from kimina_jax.models import Qwen3Config, save_hf_checkpoint
from kimina_jax.rollout.base import OnFinished, SampleRequest, SampleResult, SamplingParams, check_requests
from kimina_jax.rollout.vllm_adapter import SAFETENSORS_LOADER, VllmAdapter, dtype_name
from kimina_jax.types import Completion

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'kimina-jax[gpu]' on a GPU host, or 'kimina-jax[cpu-vllm]' on CPU"


class VllmEngine(VllmAdapter):
    """`vllm.LLM` started from an HF folder (`load_format="dummy"`: config.json only, random weights).

    `engine_kwargs` go to `vllm.LLM` as they are (and win over the arguments above). `last_sync_s` is the
    duration of the last weight push.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        tokenizer=None,
        eos_token_ids: Sequence[int] | None = None,
        load_format: str = "auto",
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.6,
        max_model_len: int | None = None,
        kv_cache_memory_bytes: int | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool = False,
        enable_sleep_mode: bool = False,
        seed: int = 0,
        engine_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(Qwen3Config.from_pretrained(model_path), tokenizer=tokenizer, eos_token_ids=eos_token_ids,
                         folder=model_path)
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        if enable_sleep_mode and not current_platform.is_sleep_mode_available():
            log.info("vLLM has no sleep mode on %s: sleep() and wake() do nothing", current_platform.device_type)
            enable_sleep_mode = False
        args = dict(
            model=str(model_path),
            skip_tokenizer_init=True,
            load_format=load_format,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=enforce_eager,
            enable_sleep_mode=enable_sleep_mode,
            seed=seed,
            logprobs_mode="processed_logprobs",
        )
        args = {k: v for k, v in args.items() if v is not None}
        self.llm = vllm.LLM(**{**args, **(engine_kwargs or {})})
        self._vllm = vllm
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.sleep_mode = enable_sleep_mode
        self._push = _choose_weight_push(self.llm)
        self._request_ids = itertools.count()

    @classmethod
    def from_config(cls, cfg, model_path: str | Path, **kwargs) -> "VllmEngine":
        """From the recipe's `rollout.vllm` section (`config.VllmConfig`); `kwargs` as for the constructor."""
        return cls(
            model_path,
            dtype=cfg.dtype,
            tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            max_model_len=cfg.max_model_len,
            kv_cache_memory_bytes=cfg.kv_cache_bytes,
            enable_prefix_caching=cfg.enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            enable_sleep_mode=cfg.enable_sleep_mode,
            **kwargs,
        )

    def _sample(self, prompts: list[tuple[int, ...]], params: SamplingParams) -> list[list[Completion]]:
        sampling = self._vllm.SamplingParams
        requests = [sampling(**self._request(params, i), detokenize=False) for i in range(len(prompts))]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], requests, use_tqdm=False)
        return [
            self._completions(i, [_sample_of(c) for c in output.outputs], params.n, f"vLLM (prompt {i})")
            for i, output in enumerate(outputs)
        ]

    def continue_samples(
        self, requests: Sequence[SampleRequest], params: SamplingParams, on_finished: OnFinished | None = None
    ) -> list[SampleResult]:
        """Request i goes to vLLM as prompt + response so far, for the tokens its cap leaves (module docstring)."""
        from vllm.sampling_params import RequestOutputKind

        self._check_usable()
        requests = check_requests(requests, params, self.max_model_len, self.config.vocab_size)
        engine = self.llm.llm_engine
        index: dict[str, int] = {}
        latest: dict[int, Any] = {}  # request -> its last CompletionOutput
        results: dict[int, SampleResult] = {}

        def result(i: int) -> SampleResult:
            _, ids, logprobs, reason = _sample_of(latest[i]) if i in latest else (0, [], [], None)
            return self._continued(i, requests[i], ids, logprobs, reason, "vLLM")

        def add(i: int) -> None:
            # Not a number: `LLM.generate` numbers its own requests, and sorts them by int(request_id).
            request_id = f"continue-{next(self._request_ids)}"
            sampling = self._vllm.SamplingParams(**self._continued_request(params, requests[i]), detokenize=False,
                                                 output_kind=RequestOutputKind.CUMULATIVE)
            engine.add_request(request_id, {"prompt_token_ids": [*requests[i].prompt_token_ids,
                                                                 *requests[i].response]}, sampling)
            index[request_id] = i

        # Requests go in as the scheduler's token budget and sequence slots allow, each prefilled whole in one step:
        # a prefill cut across steps discards a sampled token by rewinding the request's seeded generator, which
        # vLLM's CPU backend cannot do ("CPU Generator does not use offset"). Only a request longer than the budget
        # is cut.
        scheduler = engine.vllm_config.scheduler_config
        waiting = collections.deque(range(len(requests)))
        stop = False
        try:
            while len(results) < len(requests) and not stop:
                running = len(index) - len(results)
                room = scheduler.max_num_batched_tokens - running
                while waiting and running < scheduler.max_num_seqs:
                    length = len(requests[waiting[0]].prompt_token_ids) + len(requests[waiting[0]].response)
                    if length > room and running:
                        break
                    add(waiting.popleft())
                    room, running = room - length, running + 1
                for output in engine.step():
                    i = index[output.request_id]
                    (latest[i],) = output.outputs
                    if output.finished:
                        results[i] = result(i)
                        # The others finished in this step are finished too: each is still told.
                        if on_finished is not None:
                            stop = bool(on_finished(i, results[i])) or stop
        finally:
            # Also on an error: a request left in the engine would run into the next `generate`.
            left = [request_id for request_id, i in index.items() if i not in results]
            if left:
                engine.abort_request(left)
        return [results[i] if i in results else result(i) for i in range(len(requests))]

    def _push_weights(self, model) -> None:
        self._push(self.llm, model)
        self.llm.reset_prefix_cache()

    def sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
        self._asleep = True

    def wake(self) -> None:
        if self.sleep_mode and self._asleep:
            self.llm.wake_up()
        self._asleep = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.llm.llm_engine.engine_core.shutdown()
            del self.llm


def _sample_of(output):
    """A `vllm.CompletionOutput` as the adapter's (index, token ids, log-probs, finish reason)."""
    logprobs = [step[token].logprob for step, token in zip(output.logprobs, output.token_ids)]
    return output.index, list(output.token_ids), logprobs, output.finish_reason


def _import_vllm():
    # The weight push hands Python objects to the worker: the engine core must live in this process.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        import vllm
    except ModuleNotFoundError as err:
        if err.name != "vllm":
            raise KiminaError(f"vLLM failed to import: {err} ({INSTALL_HINT})") from err
        raise KiminaError(f"the vllm engine needs vLLM, which is not installed: {INSTALL_HINT}") from err
    _silence_rotary_reload_warning()
    return vllm


def _choose_weight_push(llm):
    """The weight-push function for this vLLM build and platform (see the module docstring)."""
    from vllm.platforms import current_platform

    executor = getattr(llm.llm_engine, "model_executor", None)
    if getattr(executor, "driver_worker", None) is None:
        if llm.llm_engine.vllm_config.load_config.load_format == "dummy":  # that loader cannot reload
            llm.collective_rpc("update_config", kwargs={"overrides": SAFETENSORS_LOADER})
        return _reload_from_folder
    if current_platform.is_tpu():
        from kimina_jax.rollout.tpu_inference import push_weights

        return push_weights
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if "weights_iterator" not in inspect.signature(GPUModelRunner.reload_weights).parameters:
        import vllm

        raise KiminaError(
            f"vLLM {vllm.__version__} has no in-place weight reload (worker.reload_weights(weights_iterator=...)); "
            f"install a newer one: {INSTALL_HINT}"
        )
    return _reload_weights


def _reload_weights(llm, model) -> None:
    # weights.py imports torch, which vLLM brings; imported here so that the JAX sampler never needs torch.
    from kimina_jax.rollout.weights import hf_torch_tensors

    model_config = llm.llm_engine.model_config
    device = llm.collective_rpc(lambda worker: worker.device)[0]
    stream = hf_torch_tensors(model, device=device, dtype=model_config.dtype)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})


def _reload_from_folder(llm, model) -> None:
    dtype = dtype_name(llm.llm_engine.model_config.dtype, "weight push")
    with tempfile.TemporaryDirectory(prefix="kimina-jax-weights-") as folder:
        save_hf_checkpoint(model, folder, dtype=dtype, tied_lm_head=True)
        llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's 'RotaryEmbedding: Failed to load weights': its cos/sin buffer has no checkpoint tensor and is
    kept as it is on every reload, which is right, but the warning would show after every training step."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("RotaryEmbedding: Failed to load weights")


def _silence_rotary_reload_warning() -> None:
    logger = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(_RotaryReloadFilter())
