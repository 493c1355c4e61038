"""Data: statement datasets, the recipe's prompts, the training-batch iterator, and the error-fix cache."""
from kimina_jax.data.datasets import StatementRow, detect_layout, read_rows
from kimina_jax.data.fix_cache import FixCache, build_fix_prompts, fix_messages
from kimina_jax.data.iterator import PromptIterator, train_iterator
from kimina_jax.data.prompts import (
    SYSTEM_PROMPT,
    USER_TEMPLATE,
    PromptDataset,
    PromptRenderer,
    load_prompt_dataset,
    make_messages,
)
from kimina_jax.data.tokenizer import build_tiny_tokenizer, load_tokenizer

__all__ = [
    "SYSTEM_PROMPT",
    "USER_TEMPLATE",
    "FixCache",
    "PromptDataset",
    "PromptIterator",
    "PromptRenderer",
    "StatementRow",
    "build_fix_prompts",
    "build_tiny_tokenizer",
    "detect_layout",
    "fix_messages",
    "load_prompt_dataset",
    "load_tokenizer",
    "make_messages",
    "read_rows",
    "train_iterator",
]
