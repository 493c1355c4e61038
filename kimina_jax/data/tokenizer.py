"""Tokenizers: a checkpoint's own (transformers), or `tiny`: a small byte-level BPE trained on the fly.

The tiny tokenizer lets the `tiny` recipe run with no download. It is trained deterministically on the recipe's
messages for the bundled statements, so every run (and every process of a multi-host run) builds the same
vocabulary. It has Qwen's special tokens and a ChatML template like Qwen's (without Qwen3's thinking switches).
"""
from __future__ import annotations

from kimina_jax.errors import KiminaError

TINY_VOCAB_SIZE = 1024
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
THINK_TOKENS = ("<think>", "</think>")  # added tokens, not "special" (as in Qwen3): decoding keeps them
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Words a prover writes that the statements alone would not teach the BPE.
_RESPONSE_WORDS = (
    "<think>\nLet me plan the proof.\n</think>\n\n```tactics\nnlinarith [sq_nonneg (a - b)]\n```\n"
    "```lean4\ntheorem := by\n  intro h\n  simp_all\n  norm_num\n  linarith\n  omega\n  ring_nf\n```\n"
)


def load_tokenizer(name_or_path: str):
    """`tiny`, or a Hugging Face folder / hub name loaded with transformers' AutoTokenizer."""
    if name_or_path == "tiny":
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise KiminaError(f"cannot load a tokenizer from '{name_or_path}': {exc}") from exc


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    """A `PreTrainedTokenizerFast` trained on the bundled statements (eos `<|im_end|>`, pad `<|endoftext|>`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kimina_jax.config import DatasetConfig
    from kimina_jax.data.datasets import BUNDLED_DIR, BUNDLED_PREFIX, read_rows
    from kimina_jax.data.prompts import make_messages

    # The messages exactly as the recipe writes them, so the template text gets merged into few tokens.
    texts = [_RESPONSE_WORDS]
    for path in sorted(BUNDLED_DIR.glob("*.jsonl")):
        for row in read_rows(DatasetConfig(files=[BUNDLED_PREFIX + path.name])):
            texts.extend(m["content"] for m in make_messages(row.problem, row.formal_statement))

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(THINK_TOKENS),
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
        model_max_length=1 << 20,
    )
