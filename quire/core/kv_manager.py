"""Per-request block tables on top of the block pool, with automatic prefix caching.

A full block's identity is a chained hash: sha256(parent hash, the block's token ids, salt).
Two requests share a cached block only if every token before and inside it is identical, so a
hit is never a near miss. SHA-256 (not Python's ``hash``) keeps a crafted prompt from colliding
with another tenant's prefix.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from quire.core.block_pool import BlockPool, KVBlock
from quire.core.request import Request

_ROOT_HASH = b"quire-prefix-root"


def hash_block(parent_hash: bytes, token_ids: list[int], salt: bytes = b"") -> bytes:
    payload = struct.pack(f"<{len(token_ids)}q", *token_ids)
    return hashlib.sha256(parent_hash + salt + payload).digest()


@dataclass
class PrefixCacheStats:
    """Counted in tokens, like the Prometheus metrics built from them."""

    queries: int = 0
    hits: int = 0


class KVCacheManager:
    """Allocates, shares and frees the blocks of each request."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.stats = PrefixCacheStats()
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_published: dict[str, int] = {}  # the request's leading blocks in the cache's map
        # Full blocks that running requests are computing and have not published yet: hash -> the
        # request computing it (the first admitted; see ``block_in_flight``).
        self._in_flight: dict[bytes, str] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self._blocks.get(request_id, ())]

    def num_blocks_of(self, request_id: str) -> int:
        return len(self._blocks.get(request_id, ()))

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_hash(self, request: Request, index: int) -> bytes:
        """The chained hash of the request's full block ``index``, computed once per request
        (``Request.block_hashes``, extended in order as far as asked)."""
        chain = request.block_hashes
        tokens = request.all_token_ids
        while len(chain) <= index:
            i = len(chain)
            parent = chain[-1] if chain else _ROOT_HASH
            block_tokens = tokens[i * self.block_size : (i + 1) * self.block_size]
            chain.append(hash_block(parent, block_tokens, request.cache_salt))
        return chain[index]

    def find_cached_prefix(self, request: Request) -> list[KVBlock]:
        """The longest run of cached blocks matching the request's leading tokens.

        At least one token is always left to compute, because its logits are what we sample from.
        """
        if not self.enable_caching:
            return []
        hits: list[KVBlock] = []
        for i in range((request.num_tokens - 1) // self.block_size):
            block = self.pool.lookup(self._block_hash(request, i))
            if block is None:
                break
            hits.append(block)
        return hits

    def block_in_flight(self, request: Request, cached_prefix: list[KVBlock]) -> bool:
        """Whether the block right after ``cached_prefix`` (``find_cached_prefix``'s hits) is
        being computed by another running request: admitted now, ``request`` would compute it
        too; admitted once it is published, it finds it in the cache."""
        index = len(cached_prefix)
        if not self._in_flight or index >= (request.num_tokens - 1) // self.block_size:
            return False
        owner = self._in_flight.get(self._block_hash(request, index))
        return owner is not None and owner != request.request_id

    def mark_in_flight(self, request: Request, cached_prefix: list[KVBlock]) -> None:
        """Note the full blocks a just-admitted request will compute past its cached prefix, so
        that ``block_in_flight`` holds back later requests sharing them until they are published
        (``cache_full_blocks``) or the request lets go of them (``free``)."""
        if not self.enable_caching:
            return
        for i in range(len(cached_prefix), request.num_tokens // self.block_size):
            # A block another request is already computing stays that request's.
            self._in_flight.setdefault(self._block_hash(request, i), request.request_id)

    def _publish(self, request_id: str, block_hash: bytes) -> None:
        if self._in_flight.get(block_hash) == request_id:
            del self._in_flight[block_hash]

    def record_prefix_lookup(self, request: Request, cached_prefix: list[KVBlock]) -> None:
        """Count one admission's lookup in the hit-rate statistics.

        Called once the request is admitted, not on every lookup: a request at the head of the
        queue is looked up again each step while the pool is too full to admit it, and counting
        those retries would weight the hit rate towards whichever requests waited longest.
        """
        if not self.enable_caching:
            return
        self.stats.queries += request.num_tokens
        self.stats.hits += len(cached_prefix) * self.block_size

    def allocate_slots(
        self, request: Request, num_new_tokens: int, cached_prefix: list[KVBlock] | None = None
    ) -> list[int] | None:
        """Make room for ``num_new_tokens`` more tokens after the request's computed ones.

        ``cached_prefix`` (first schedule only) are prefix hits to adopt before the new tokens.
        Returns the ids of blocks appended to the request's table, or None (and changes nothing)
        if the pool cannot supply them.
        """
        cached_prefix = cached_prefix or []
        owned = self._blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(cached_prefix) * self.block_size
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(owned) - len(cached_prefix)
        needed = max(needed, 0)
        if needed + self.pool.num_evictable_hits(cached_prefix) > self.pool.num_free_blocks:
            if not owned:
                del self._blocks[request.request_id]
            return None
        self.pool.acquire(cached_prefix)
        if cached_prefix:  # adopted blocks are in the cache's map already: publishing resumes after them
            self._num_published[request.request_id] = len(cached_prefix)
        new_blocks = self.pool.allocate(needed)
        owned.extend(cached_prefix)
        owned.extend(new_blocks)
        return [b.block_id for b in cached_prefix] + [b.block_id for b in new_blocks]

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's newly completed blocks (called after its computed count grows)."""
        if not self.enable_caching:
            return
        blocks = self._blocks.get(request.request_id)
        if not blocks:
            return
        published = self._num_published.get(request.request_id, 0)
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        for i in range(published, num_full):
            block_hash = self._block_hash(request, i)
            self.pool.register(blocks[i], block_hash)
            self._publish(request.request_id, block_hash)
        self._num_published[request.request_id] = max(published, num_full)

    def fork(self, parent: Request, child: Request) -> int:
        """Let ``child`` share the parent's computed prompt blocks (for ``n > 1``).

        Only blocks strictly before the prompt's last token are shared, so the child recomputes
        at least that token into a block of its own and never writes into a shared block.
        Returns the number of tokens the child starts with already computed.
        """
        num_shared = (min(parent.num_computed_tokens, child.num_prompt_tokens) - 1) // self.block_size
        shared = self._blocks.get(parent.request_id, [])[: max(num_shared, 0)]
        self.pool.acquire(shared)
        self._blocks[child.request_id] = list(shared)
        self._num_published[child.request_id] = min(
            self._num_published.get(parent.request_id, 0), len(shared)
        )
        return len(shared) * self.block_size

    def free(self, request: Request) -> None:
        """Return the request's blocks to the pool; tail blocks (least likely to be shared) are
        queued for eviction first."""
        blocks = self._blocks.pop(request.request_id, None)
        self._num_published.pop(request.request_id, None)
        if self._in_flight:  # the request's own entries are among its block hashes
            for block_hash in request.block_hashes:
                self._publish(request.request_id, block_hash)
        if blocks:
            self.pool.release(reversed(blocks))

    def num_live_requests(self) -> int:
        return len(self._blocks)

    @property
    def num_blocks_in_flight(self) -> int:
        """Blocks being computed by running requests and not yet published."""
        return len(self._in_flight)
