"""The host side of the engine's paged KV cache: how many blocks a memory budget buys, and who holds which.

A block holds `block_size` tokens' keys and values of every layer. Blocks are reference-counted: a prompt's full
blocks are shared by its samples (each holds a reference), the last partial block is copied for each sample that
writes into it (copy on write), and a block is free again once nobody holds it.
"""
from __future__ import annotations

from collections.abc import Iterable

import jax.numpy as jnp

from kimina_jax.errors import KiminaError


def block_bytes(config, dtype, block_size: int) -> int:
    """Bytes of one block on one device holding all KV heads: layers x K,V x KV heads x head_dim x itemsize x
    block_size (SPEC 13)."""
    per_token = config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim
    return per_token * jnp.dtype(dtype).itemsize * block_size


def pool_blocks(config, dtype, block_size: int, kv_cache_bytes: int, head_split: int = 1) -> int:
    """The blocks of one data shard's pool that fit `kv_cache_bytes` per device (its KV heads split `head_split`
    ways)."""
    per_device = block_bytes(config, dtype, block_size) // head_split
    blocks = kv_cache_bytes // per_device
    if blocks < 1:
        raise KiminaError(f"rollout.jax.kv_cache_bytes={kv_cache_bytes} holds no KV block of {block_size} tokens "
                          f"({per_device} bytes per device): raise it")
    return blocks


class BlockPool:
    """The free list and reference counts of one pool of `size` blocks."""

    def __init__(self, size: int):
        self.size = size
        self._refs = [0] * size
        self._free = list(range(size - 1, -1, -1))  # popped from the end: low ids first
        self.peak_used = 0

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.size - len(self._free)

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks, each held once."""
        if count > len(self._free):
            raise KiminaError(f"KV block pool: {count} blocks asked for, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        for block in blocks:
            self._refs[block] = 1
        self.peak_used = max(self.peak_used, self.used)
        return blocks

    def share(self, blocks: Iterable[int]) -> None:
        """One more holder of each of `blocks`."""
        for block in blocks:
            if self._refs[block] < 1:
                raise KiminaError(f"KV block pool: block {block} is shared while free")
            self._refs[block] += 1

    def release(self, blocks: Iterable[int]) -> None:
        """One holder fewer of each of `blocks`; those nobody holds are free again."""
        for block in blocks:
            if self._refs[block] < 1:
                raise KiminaError(f"KV block pool: block {block} released while free")
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free.append(block)

    def holders(self, block: int) -> int:
        return self._refs[block]
