"""``PrefixAwareRequestRouter``: Ray Serve's custom request-router API over ``PrefixRoutingPolicy``.

Serve calls ``choose_replicas`` once per routing attempt, with the request's arguments. The
ingress passes the request's prefix block hashes as the ``prefix_hashes`` keyword; the policy
picks the owner of the longest matching prefix unless it is much busier than the least-loaded
replica. The answer is two ranks: the chosen replica, then every other one, so a chosen replica
that is full (it rejects at ``max_ongoing_requests``) spills over to the rest rather than waiting.

Load is the number of ongoing requests per replica: Serve's queue-length cache (what replicas
report when they accept or reject a request, plus this router's sends since) or, where it has no
fresh entry, the requests this router has in flight on the replica; the larger of the two.

Ownership is decided at choice time: ``choose_replicas`` records the prefix for the replica it
ranks first, so a burst of requests sharing a new prefix follows the first one before any of
them has been accepted, and ownership is sticky (the policy's ``record`` never moves a block that
has an owner). ``on_request_routed`` records again for the replica that accepted the request,
which only refreshes the blocks' recency and claims blocks that lost their owner meanwhile; a
request that spilled over to another replica does not move its prefix there.

``_in_flight`` is emptied by ``on_request_completed``, a hook added by ray-project/ray#60845
(hence the ``ray>=2.60`` floor in pyproject.toml); a Ray without it never calls it, and the
local count would only grow.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from quire.serving.prefix_policy import PrefixPolicyConfig, PrefixRoutingPolicy

logger = logging.getLogger(__name__)

PREFIX_KWARG = "prefix_hashes"


def prefix_hashes_of(request: PendingRequest | None) -> tuple[str, ...]:
    """The ``prefix_hashes`` keyword the ingress attached to a request (empty if none)."""
    if request is None:
        return ()
    hashes = request.kwargs.get(PREFIX_KWARG, ())
    return tuple(hashes) if isinstance(hashes, (tuple, list)) else ()


class PrefixAwareRequestRouter(RequestRouter):
    """Routes requests sharing a prompt prefix to the replica that owns it: the first one chosen
    for it (sticky), unless that one is much busier than the least loaded."""

    _policy: PrefixRoutingPolicy | None = None

    def initialize_state(
        self,
        imbalance_ratio: float = 2.0,
        imbalance_slack: int = 2,
        max_entries: int = 100_000,
        seed: int | None = None,
        **unknown: Any,
    ) -> None:
        """Called by Serve with the deployment's ``request_router_kwargs``."""
        if unknown:
            raise ValueError(f"unknown request_router_kwargs: {', '.join(sorted(unknown))}")
        config = PrefixPolicyConfig(
            max_entries=max_entries, imbalance_ratio=imbalance_ratio, imbalance_slack=imbalance_slack
        )
        self._policy = PrefixRoutingPolicy(config, random.Random(seed))
        self._in_flight: dict[ReplicaID, set[str]] = {}

    @property
    def policy(self) -> PrefixRoutingPolicy:
        if self._policy is None:  # Serve skipped initialize_state (no kwargs): the defaults
            self.initialize_state()
        assert self._policy is not None
        return self._policy

    def _load(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        local = len(self._in_flight.get(replica.replica_id, ()))
        return max(local, cached or 0)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        policy = self.policy
        # Replicas known to be full are no candidates (unless all are: then Serve probes them).
        available = self.select_available_replicas(candidate_replicas) or candidate_replicas
        by_id = {r.replica_id.unique_id: r for r in available}
        hashes = prefix_hashes_of(pending_request)
        decision = policy.choose(hashes, {rid: self._load(r) for rid, r in by_id.items()})
        chosen = by_id[decision.replica]
        policy.record(hashes, decision.replica)
        rest = [r for r in candidate_replicas if r is not chosen]
        return [[chosen], rest] if rest else [[chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        self.policy.record(prefix_hashes_of(pending_request), replica_id.unique_id)
        self._in_flight.setdefault(replica_id, set()).add(pending_request.metadata.internal_request_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.policy  # noqa: B018 - makes sure the state exists
        requests = self._in_flight.get(replica_id)
        if requests is not None:
            requests.discard(internal_request_id)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._forget_departed()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget_departed()

    def _forget_departed(self) -> None:
        alive = set(self.curr_replicas)
        self.policy.forget({rid.unique_id for rid in alive})
        for rid in [rid for rid in self._in_flight if rid not in alive]:
            del self._in_flight[rid]
