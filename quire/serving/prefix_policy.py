"""Prefix-aware replica choice, in pure Python (no Ray): the policy behind ``ray_router``.

The policy remembers, for each prefix block hash (see ``prefix_key``), the replica that owns it
(the first to serve it while alive; see ``record``), in a bounded LRU map. For a new request:

1. the candidate that served the longest matching prefix is the *owner*;
2. the owner wins unless it is much busier than the least-loaded candidate: its load (ongoing
   requests) may be at most ``max(least + imbalance_slack, least * imbalance_ratio)``;
3. otherwise the least-loaded candidate wins (ties broken at random, from a seedable generator);
4. a prefix no candidate owns yet goes, among the candidates not much busier than the least
   loaded, to the one owning the fewest prefixes (then the least loaded): new prefixes spread
   evenly, so each replica's KV cache holds its share of them. A request with no full block
   (no prefix key) simply goes to the least loaded.

Loads are whatever the caller measures (Ray: ongoing requests per replica). Replicas that left
are forgotten with ``forget``, so their prefixes go to whoever serves them next.
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True)
class PrefixPolicyConfig:
    """Knobs of ``PrefixRoutingPolicy``.

    ``max_entries``: block hashes remembered (LRU beyond). ``imbalance_ratio`` /
    ``imbalance_slack``: how much busier than the least-loaded candidate the prefix owner may be
    and still win (see the module docstring); the slack keeps small loads (0 vs 2) from
    overriding affinity, the ratio scales it for large ones.
    """

    max_entries: int = 100_000
    imbalance_ratio: float = 2.0
    imbalance_slack: int = 2

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {self.max_entries}")
        if not self.imbalance_ratio >= 1.0:
            raise ValueError(
                f"imbalance_ratio must be >= 1 (1: the owner may be no busier than the least-loaded "
                f"replica plus the slack), got {self.imbalance_ratio}"
            )
        if self.imbalance_slack < 0:
            raise ValueError(f"imbalance_slack must be >= 0, got {self.imbalance_slack}")

    def owner_allowed(self, owner_load: int, least_load: int) -> bool:
        """Whether the prefix owner is not "much busier" than the least-loaded candidate."""
        return owner_load <= max(least_load + self.imbalance_slack, least_load * self.imbalance_ratio)


class Reason(StrEnum):
    """Why a replica was chosen (for logs and tests)."""

    PREFIX = "prefix"  # the owner of the longest matching prefix
    NO_MATCH = "no_match"  # no candidate had served any of the prefix: least loaded
    IMBALANCED = "imbalanced"  # the owner was much busier: least loaded instead


@dataclass(frozen=True)
class Decision:
    """The chosen replica, how many leading blocks its owner matched, and why."""

    replica: str
    matched_blocks: int
    reason: Reason


class PrefixRoutingPolicy:
    """Longest-prefix affinity with a load-imbalance escape hatch (see the module docstring)."""

    def __init__(self, config: PrefixPolicyConfig | None = None, rng: random.Random | None = None) -> None:
        self.config = config or PrefixPolicyConfig()
        self._rng = rng or random.Random()
        # block hash -> replica id, least recently used first.
        self._owners: OrderedDict[str, str] = OrderedDict()
        # First blocks of prefixes (roots) and how many each replica owns: its cache footprint.
        self._roots: set[str] = set()
        self._root_counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._owners)

    def owner_of(self, hashes: Sequence[str], candidates: Collection[str]) -> tuple[str | None, int]:
        """The candidate that served the longest prefix of ``hashes``, and that prefix's length."""
        # Longest first: the chain makes a hit at block i imply the request shares blocks 0..i.
        for depth in range(len(hashes), 0, -1):
            owner = self._owners.get(hashes[depth - 1])
            if owner is not None and owner in candidates:
                return owner, depth
        return None, 0

    def choose(self, hashes: Sequence[str], loads: Mapping[str, int]) -> Decision:
        """Pick one of ``loads``' replicas (id -> ongoing requests) for a request with ``hashes``."""
        if not loads:
            raise ValueError("no candidate replicas to choose from")
        least = min(loads.values())
        owner, depth = self.owner_of(hashes, loads)
        if owner is not None and self.config.owner_allowed(loads[owner], least):
            return Decision(owner, depth, Reason.PREFIX)
        if owner is None and hashes:
            return Decision(self._place_new_prefix(loads, least), 0, Reason.NO_MATCH)
        idle = sorted(replica for replica, load in loads.items() if load == least)
        reason = Reason.NO_MATCH if owner is None else Reason.IMBALANCED
        return Decision(self._rng.choice(idle), depth, reason)

    def _place_new_prefix(self, loads: Mapping[str, int], least: int) -> str:
        # Among replicas not much busier than the least loaded, the one owning the fewest
        # prefixes, then the least loaded: distinct prefixes spread evenly, so each replica's KV
        # cache holds its share instead of one replica holding (and evicting) most of them.
        eligible = [r for r, load in loads.items() if self.config.owner_allowed(load, least)]
        fewest = min(self._root_counts[r] for r in eligible)
        emptiest = [r for r in eligible if self._root_counts[r] == fewest]
        lightest = min(loads[r] for r in emptiest)
        return self._rng.choice(sorted(r for r in emptiest if loads[r] == lightest))

    def record(self, hashes: Sequence[str], replica: str) -> None:
        """Note that ``replica`` served ``hashes``: blocks without an owner become its own, and
        every block counts as just used (LRU).

        Ownership is sticky: a request that spilled over to a less-loaded replica does not move
        the prefix there. Moving it ("last served wins") made a prefix flip between replicas at
        each spill-over under load, so both kept recomputing and caching it; measured on
        benchmarks/prefix_routing.py, sticky owners keep each prefix's later requests on one
        replica's cache.
        """
        owners = self._owners
        if hashes and hashes[0] not in owners:
            self._roots.add(hashes[0])
            self._root_counts[replica] += 1
        for digest in hashes:
            owners.setdefault(digest, replica)
            owners.move_to_end(digest)
        while len(owners) > self.config.max_entries:
            self._drop(*owners.popitem(last=False))

    def _drop(self, digest: str, owner: str) -> None:
        if digest in self._roots:
            self._roots.discard(digest)
            self._root_counts[owner] -= 1

    def forget(self, alive: Collection[str]) -> int:
        """Drop every entry owned by a replica not in ``alive``; returns how many went."""
        gone = [(digest, owner) for digest, owner in self._owners.items() if owner not in alive]
        for digest, owner in gone:
            del self._owners[digest]
            self._drop(digest, owner)
        for replica in [r for r in self._root_counts if r not in alive]:
            del self._root_counts[replica]
        return len(gone)
