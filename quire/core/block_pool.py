"""The pool of fixed-size KV blocks: reference counts, an LRU free queue, and the prefix-cache map.

A block is *free* when no request references it (``ref_cnt == 0``); a free block may still hold
cached K/V under a content hash, and is then reusable by a later request with the same prefix
until it is evicted. The free queue is kept in eviction order (least recently freed first), so
LRU eviction is a pop from the front, and reusing a cached free block is a removal by key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class KVBlock:
    """One block of ``block_size`` token slots in every layer's K and V cache."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None  # set only while registered in the prefix cache

    def __repr__(self) -> str:
        return f"KVBlock(id={self.block_id}, ref={self.ref_cnt}, cached={self.block_hash is not None})"


class BlockPool:
    """Owns every block. Invariants (checked by ``check_invariants`` in tests):

    - a block is in the free queue iff its ``ref_cnt`` is 0;
    - ``cached[h] is b`` iff ``b.block_hash == h``.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    def allocate(self, count: int) -> list[KVBlock]:
        """Take ``count`` free blocks, evicting their cached contents (LRU first)."""
        if count > len(self._free):
            raise ValueError(f"cannot allocate {count} blocks, only {len(self._free)} free")
        taken = []
        for _ in range(count):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            taken.append(block)
        return taken

    def acquire(self, blocks: Iterable[KVBlock]) -> None:
        """Add a reference to blocks already holding wanted K/V (prefix hits, forks)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: Iterable[KVBlock]) -> None:
        """Drop a reference; blocks reaching zero join the back of the free queue in the given
        order, so the first ones released are the first evicted."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of {block!r}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def lookup(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def register(self, block: KVBlock, block_hash: bytes) -> None:
        """Publish a full, computed block under its content hash. If another block already holds
        the same content (two requests computed it in the same step), the first one stays."""
        if not self.enable_caching or block.block_hash is not None or block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def num_evictable_hits(self, blocks: Iterable[KVBlock]) -> int:
        """How many of these cached blocks are currently free (acquiring them shrinks the free pool)."""
        return sum(1 for b in blocks if b.ref_cnt == 0)

    def check_invariants(self) -> None:
        for block in self.blocks:
            assert block.ref_cnt >= 0, block
            assert (block.ref_cnt == 0) == (block.block_id in self._free), block
            if block.block_hash is not None:
                assert self._cached.get(block.block_hash) is block, block
        for block_hash, block in self._cached.items():
            assert block.block_hash == block_hash, block
