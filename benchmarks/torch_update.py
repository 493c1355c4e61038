"""The torch reference of the GRPO update (issue 17): transformers' Qwen3ForCausalLM doing `TrainStep.update`'s work.

The same work as ours: the same sequences in the same micro-batches (`train_step.synthetic_minibatch`'s packed
rows, one row per micro-batch), each micro-batch a forward + backward pass whose gradients add up, then global-norm
clipping and one AdamW step, all in fp32. Torch gets each micro-batch's sequences apart, as a [sequences, length]
batch under the plain causal mask: the sequences of these rows are of equal length, so nothing is padded and the
attention covers exactly the [segment, segment] causal blocks ours covers, by torch's fastest sdpa path. (Rows
given packed, with `position_ids` restarting per segment and `use_cache=False`, transformers builds the
block-diagonal mask itself, but sdpa then takes an explicit mask, slower in our runs; given packed
without that mask, the attention crosses segments: less masking work and wrong log-probs.) Unequal sequences would
be right-padded with an attention mask. The loss is ours (`grpo.math.ppo_token_loss`: dual-clip PPO with the
batch's `loss_weights`), from full [sequences, length, vocab] logits (ours chunks them). Given our model, the weights
are copied from it, so the first update's gradient norm can be compared with ours.

    python benchmarks/torch_update.py --shape tiny --steps 5     # 4 rows x 1024 tokens (8 sequences of 512)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
# Before torch loads OpenMP: on cores shared with other jobs its spinning threads lose 3-10x to contention
# (torch's update and vLLM-CPU alike; set OMP_WAIT_POLICY=ACTIVE to compare with spinning on a quiet machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from _common import UPDATE_SHAPES, update_batch  # noqa: E402
from kimina_jax.config import AlgorithmConfig, OptimConfig  # noqa: E402
from kimina_jax.grpo.math import LOG_RATIO_LIMIT  # noqa: E402
from kimina_jax.grpo.packing import PackedBatch  # noqa: E402
from kimina_jax.models import Qwen3Config  # noqa: E402


def torch_model(config: Qwen3Config, jax_model=None) -> transformers.Qwen3ForCausalLM:
    """An fp32 HF Qwen3 of `config`'s shape (sdpa attention), with `jax_model`'s weights when given."""
    hf_config = transformers.Qwen3Config(**{k: v for k, v in config.to_dict("float32").items()
                                            if k not in ("architectures", "dtype", "torch_dtype")})
    hf_config._attn_implementation = "sdpa"
    model = transformers.Qwen3ForCausalLM(hf_config).float()
    if jax_model is not None:
        from kimina_jax.rollout.weights import hf_torch_tensors

        weights = dict(hf_torch_tensors(jax_model, dtype=torch.float32))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.train()


def unpacked(batch: PackedBatch, rows) -> dict[str, torch.Tensor]:
    """The items of `rows` as [items, longest] tensors of the batch's per-token arrays, right-padded with zeros
    (loss_mask 0), and an `attention_mask` only where some item is padded."""
    items = [i for i in range(batch.num_items) if batch.item_row[i] in rows]
    longest = int(max(batch.item_length[items]))
    arrays = {}
    for name, packed in batch.token_arrays().items():
        if name in ("positions", "segment_ids"):  # implied by the layout: each item starts at 0, alone in its row
            continue
        out = np.zeros((len(items), longest), packed.dtype)
        for k, i in enumerate(items):
            start, length = batch.item_start[i], batch.item_length[i]
            out[k, :length] = packed[batch.item_row[i], start:start + length]
        arrays[name] = torch.from_numpy(out)
    arrays["tokens"], arrays["targets"] = arrays["tokens"].long(), arrays["targets"].long()
    if any(batch.item_length[i] < longest for i in items):
        arrays["attention_mask"] = (torch.arange(longest) < torch.tensor(batch.item_length[items])[:, None]).long()
    return arrays


def make_torch_update(
    config: Qwen3Config,
    batch: PackedBatch,
    micro_batch_rows: int,
    *,
    algorithm: AlgorithmConfig | None = None,
    optim: OptimConfig | None = None,
    jax_model=None,
) -> Callable[[], dict[str, float]]:
    """A callable that runs one GRPO update of a torch Qwen3 on `batch` (`micro_batch_rows` rows per micro-batch)
    and returns its pg_loss and pre-clip grad_norm; the model and AdamW state persist across calls."""
    algorithm = algorithm or AlgorithmConfig()
    optim = optim or OptimConfig(lr=1e-6)
    model = torch_model(config, jax_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    micro_batches = [unpacked(batch, range(start, start + micro_batch_rows))
                     for start in range(0, batch.num_rows, micro_batch_rows)]

    def micro_loss(micro: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(input_ids=micro["tokens"], attention_mask=micro.get("attention_mask"), use_cache=False).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, micro["targets"].unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(torch.clamp(logp - micro["old_logp"], -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        advantages = micro["advantages"]
        pessimistic = torch.maximum(-advantages * ratio, -advantages * torch.clamp(
            ratio, 1.0 - algorithm.clip_low, 1.0 + algorithm.clip_high))
        token_loss = torch.where(advantages < 0, torch.minimum(pessimistic, -advantages * algorithm.clip_c),
                                 pessimistic)
        mask = micro["loss_mask"]
        return torch.sum(torch.where(mask > 0, token_loss, 0.0) * mask * micro["loss_weights"])

    def update() -> dict[str, float]:
        optimizer.zero_grad(set_to_none=True)
        loss = 0.0
        for micro in micro_batches:
            value = micro_loss(micro)
            value.backward()
            loss += value.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        return {"pg_loss": loss, "grad_norm": float(grad_norm)}

    return update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(UPDATE_SHAPES), default="tiny")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per update")
    parser.add_argument("--row-length", type=int, default=1024, help="packed row length (one row per micro-batch)")
    parser.add_argument("--steps", type=int, default=5, help="timed updates (after one untimed)")
    args = parser.parse_args()

    config, batch = update_batch(args.shape, args.tokens, args.row_length)
    update = make_torch_update(config, batch, micro_batch_rows=1)
    update()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        metrics = update()
        times.append(time.perf_counter() - started)
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"{args.shape} shape ({config.num_params / 1e6:.1f}M params), fp32, {batch.num_rows} rows x "
          f"{args.row_length} tokens (two sequences each, given apart), one row per micro-batch: update s "
          f"min/median/max "
          f"{min(times):.3f} / {statistics.median(times):.3f} / {max(times):.3f}, "
          f"{batch.tokens.size / statistics.median(times):,.0f} tokens/s, grad_norm {metrics['grad_norm']:.3g}")


if __name__ == "__main__":
    main()
