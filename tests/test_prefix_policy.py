"""The prefix-aware routing policy and routing keys, without Ray (quire.serving.prefix_*)."""

from __future__ import annotations

import random

import pytest

from quire.server.auth import Tenant
from quire.serving.prefix_key import prefix_block_hashes, routing_text, tenant_namespace
from quire.serving.prefix_policy import PrefixPolicyConfig, PrefixRoutingPolicy, Reason


def _policy(**config: float) -> PrefixRoutingPolicy:
    return PrefixRoutingPolicy(PrefixPolicyConfig(**config), random.Random(0))  # type: ignore[arg-type]


def test_routing_text_renders_chat_and_completion_prompts() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "u"}]},
        ]
    }
    assert routing_text(chat) == "\x1esystem\x1fS\x1euser\x1fu"
    assert routing_text({"prompt": "abc"}) == "abc"
    assert routing_text({"prompt": ["first", "second"]}) == "first"
    assert routing_text({"prompt": [1, 2, 3]}) == "1,2,3"
    assert routing_text({"prompt": [[7, 8], [9]]}) == "7,8"
    # Roles are part of the key: the same text under another role is another prompt.
    assert routing_text({"messages": [{"role": "user", "content": "S"}]}) != routing_text(
        {"messages": [{"role": "system", "content": "S"}]}
    )
    for malformed in (None, [], "x", {"prompt": 5}, {"messages": "no"}, {}):
        assert routing_text(malformed) == ""


def test_block_hashes_chain_full_blocks_only() -> None:
    a = prefix_block_hashes("x" * 10 + "y" * 10 + "z" * 5, block_chars=10)
    b = prefix_block_hashes("x" * 10 + "y" * 10 + "w" * 10, block_chars=10)
    c = prefix_block_hashes("q" * 10 + "y" * 10, block_chars=10)
    assert len(a) == 2 and len(b) == 3  # the trailing partial block is left out
    assert a == b[:2]  # shared leading blocks -> shared leading hashes
    assert a[1] != c[1]  # same second block after a different first one: chained, so different
    assert prefix_block_hashes("short", block_chars=10) == ()
    assert len(prefix_block_hashes("x" * 1000, block_chars=10, max_blocks=4)) == 4
    assert prefix_block_hashes("x" * 20, block_chars=10, namespace="m1") != prefix_block_hashes(
        "x" * 20, block_chars=10, namespace="m2"
    )
    assert prefix_block_hashes("\ud800" * 20, block_chars=10)  # lone surrogates from JSON are fine
    with pytest.raises(ValueError, match="block_chars"):
        prefix_block_hashes("abc", block_chars=0)


def test_no_match_goes_to_least_loaded() -> None:
    policy = _policy()
    decision = policy.choose(("h1", "h2"), {"a": 3, "b": 1, "c": 2})
    assert (decision.replica, decision.reason, decision.matched_blocks) == ("b", Reason.NO_MATCH, 0)


def test_new_prefixes_spread_over_replicas() -> None:
    policy = _policy()
    placed = []
    for prefix in ("p", "q", "r", "s"):
        # Equal loads: each new prefix goes where the fewest prefixes live.
        decision = policy.choose((prefix,), {"a": 1, "b": 1})
        policy.record((prefix,), decision.replica)
        placed.append(decision.replica)
    assert sorted(placed) == ["a", "a", "b", "b"]
    # Load still matters: a replica much busier than the least loaded gets no new prefix...
    assert policy.choose(("t",), {"a": 0, "b": 5}).replica == "a"
    policy.record(("t",), "a")
    # ...and among the others the one with fewer prefixes wins, even if slightly busier.
    assert policy.choose(("u",), {"a": 0, "b": 1}).replica == "b"
    # Forgetting a replica drops its count with its prefixes.
    policy.forget({"b"})
    assert policy.choose(("v",), {"b": 1, "c": 1}).replica == "c"


def test_ties_are_broken_among_the_least_loaded_only() -> None:
    policy = _policy()
    chosen = {policy.choose((), {"a": 0, "b": 0, "c": 5}).replica for _ in range(50)}
    assert chosen == {"a", "b"}


def test_longest_matching_prefix_wins() -> None:
    policy = _policy()
    policy.record(("p1",), "a")
    policy.record(("p1", "p2", "p3"), "b")  # b served a longer request with the same start
    decision = policy.choose(("p1", "p2", "p3", "p4"), {"a": 0, "b": 1})
    assert (decision.replica, decision.reason, decision.matched_blocks) == ("b", Reason.PREFIX, 3)
    assert policy.choose(("p1", "zz"), {"a": 1, "b": 0}).replica == "a"


def test_owner_wins_unless_much_busier() -> None:
    policy = _policy(imbalance_ratio=2.0, imbalance_slack=2)
    policy.record(("p",), "a")
    # Within max(least + 2, 2 * least): affinity holds.
    assert policy.choose(("p",), {"a": 2, "b": 0}).reason == Reason.PREFIX
    assert policy.choose(("p",), {"a": 20, "b": 10}).reason == Reason.PREFIX
    # Beyond it the least-loaded replica takes the request.
    busy = policy.choose(("p",), {"a": 3, "b": 0})
    assert (busy.replica, busy.reason) == ("b", Reason.IMBALANCED)
    assert policy.choose(("p",), {"a": 21, "b": 10}).replica == "b"


def test_spill_over_does_not_move_ownership() -> None:
    policy = _policy()
    policy.record(("p",), "a")
    spilled = policy.choose(("p", "q"), {"a": 9, "b": 0})
    assert spilled.reason == Reason.IMBALANCED
    policy.record(("p", "q"), spilled.replica)
    # The shared block stays with its owner; only the new block is the spill replica's.
    assert policy.owner_of(("p",), {"a", "b"}) == ("a", 1)
    assert policy.owner_of(("p", "q"), {"a", "b"}) == ("b", 2)
    assert policy.choose(("p", "other"), {"a": 1, "b": 0}).replica == "a"


def test_owner_outside_the_candidates_is_skipped() -> None:
    policy = _policy()
    policy.record(("p1",), "a")
    policy.record(("p1", "p2"), "c")  # c owns the longer prefix, but is full (no candidate)
    decision = policy.choose(("p1", "p2"), {"a": 1, "b": 0})
    assert (decision.replica, decision.matched_blocks) == ("a", 1)


def test_forget_drops_departed_replicas() -> None:
    policy = _policy()
    policy.record(("x1", "x2"), "a")
    policy.record(("y1",), "b")
    assert policy.forget({"b"}) == 2
    assert len(policy) == 1
    assert policy.choose(("x1", "x2"), {"b": 0, "c": 0}).reason == Reason.NO_MATCH


def test_lru_bound() -> None:
    policy = _policy(max_entries=3)
    policy.record(("1", "2", "3"), "a")
    policy.record(("1",), "a")  # touched: now the most recent
    policy.record(("4",), "b")
    assert len(policy) == 3
    assert policy.owner_of(("2",), {"a", "b"}) == (None, 0)  # the least recently used went
    assert policy.owner_of(("1",), {"a", "b"}) == ("a", 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_entries": 0}, "max_entries"),
        ({"imbalance_ratio": 0.5}, "imbalance_ratio"),
        ({"imbalance_ratio": float("nan")}, "imbalance_ratio"),
        ({"imbalance_slack": -1}, "imbalance_slack"),
    ],
)
def test_config_validation(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PrefixPolicyConfig(**kwargs)  # type: ignore[arg-type]


def test_choose_needs_candidates() -> None:
    with pytest.raises(ValueError, match="no candidate"):
        _policy().choose(("p",), {})


def test_routing_key_includes_tools_and_chat_template_kwargs() -> None:
    messages = [{"role": "system", "content": "S" * 600}, {"role": "user", "content": "u"}]
    plain = {"messages": messages}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    with_tools = {"messages": messages, "tools": tools}
    other_tools = {"messages": messages, "tools": [{**tools[0], "function": {"name": "g", "parameters": {}}}]}
    kwargs = {"messages": messages, "chat_template_kwargs": {"enable_thinking": False}}
    keys = [
        prefix_block_hashes(routing_text(body), block_chars=64)
        for body in (plain, with_tools, other_tools, kwargs)
    ]
    # Tools and template kwargs render before the messages: a difference changes the first block.
    assert len({k[0] for k in keys}) == 4
    # Key order inside the tools does not matter (canonical JSON).
    reordered = {
        "tools": [{"function": {"parameters": {}, "name": "f"}, "type": "function"}],
        "messages": messages,
    }
    assert routing_text(reordered) == routing_text(with_tools)


def test_routing_key_is_per_tenant_cache_salt() -> None:
    text = "shared system prompt " * 40
    alice, bob = Tenant("alice"), Tenant("bob")
    grouped_a, grouped_b = Tenant("a", cache_group="team"), Tenant("b", cache_group="team")

    def key(salt: bytes | None) -> tuple[str, ...]:
        return prefix_block_hashes(text, block_chars=64, namespace=tenant_namespace("m", salt))

    # Tenants whose prefix caches quire keeps apart never share a routing key ...
    assert key(alice.cache_salt)[0] != key(bob.cache_salt)[0]
    assert key(alice.cache_salt)[0] != key(None)[0]
    # ... tenants of one cache group (whose cache entries are shared) do, and so does the same one.
    assert key(grouped_a.cache_salt) == key(grouped_b.cache_salt)
    assert key(alice.cache_salt) == key(Tenant("alice").cache_salt)
    # The namespace holds the salt's digest, never a tenant name or key.
    assert "alice" not in tenant_namespace("m", alice.cache_salt)
