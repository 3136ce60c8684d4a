"""Block pool, KV manager and scheduler, with no model: unit tests and hypothesis state machines."""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from quire.config import SchedulerConfig
from quire.core.block_pool import BlockPool
from quire.core.engine_core import EngineCore
from quire.core.kv_manager import KVCacheManager
from quire.core.outputs import RequestExecutionError, RunnerOutput, SchedulerOutput
from quire.core.request import EngineCoreRequest, Request, RequestStatus
from quire.core.scheduler import RequestRejected
from quire.sampling import SamplingParams

from core_fakes import CheckingExecutor

BLOCK = 4


def make_core(num_blocks=64, max_num_seqs=8, budget=32, max_len=128, chunked=True, caching=True, seed=0):
    kv = KVCacheManager(num_blocks, BLOCK, enable_caching=caching)
    executor = CheckingExecutor(num_blocks, BLOCK, seed=seed)
    config = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        max_model_len=max_len,
        enable_chunked_prefill=chunked,
    )
    return EngineCore(config, kv, executor), kv, executor


def core_request(rid, prompt, max_tokens=8, n=1, priority=0, **params):
    return EngineCoreRequest(
        request_id=rid,
        prompt_token_ids=list(prompt),
        params=SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True, **params),
        eos_token_ids=frozenset(),
        arrival_time=time.monotonic(),
        priority=priority,
    )


def run_to_completion(core, max_steps=10_000):
    outputs = []
    for _ in range(max_steps):
        if not core.has_unfinished():
            return outputs
        step_outputs, _ = core.step()
        outputs.extend(step_outputs)
    raise AssertionError("engine did not finish")


def assert_all_free(kv: KVCacheManager):
    kv.pool.check_invariants()
    assert kv.num_free_blocks == kv.pool.num_blocks
    assert kv.num_live_requests() == 0
    assert kv.num_blocks_in_flight == 0


# --------------------------------------------------------------------------- block pool


def test_block_pool_lru_and_cache_eviction():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.register(a, b"ha")
    pool.register(b, b"hb")
    pool.release([b, a])  # b first: b is evicted first
    assert pool.num_free_blocks == 4 and pool.lookup(b"ha") is a
    taken = pool.allocate(3)  # two never-used blocks, then b (the oldest freed cached block)
    assert b in taken and a not in taken
    assert pool.lookup(b"hb") is None and pool.lookup(b"ha") is a
    pool.acquire([a])  # a prefix hit on a free cached block takes it out of the free queue
    assert pool.num_free_blocks == 0
    pool.check_invariants()
    with pytest.raises(ValueError):
        pool.allocate(1)


def test_block_pool_double_free_is_caught():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.release([a])
    with pytest.raises(RuntimeError, match="double free"):
        pool.release([a])


# ---------------------------------------------------------------------- prefix caching


def test_prefix_hit_requires_identical_prefix_and_leaves_a_token():
    core, kv, _ = make_core()
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks of 4
    core.add_request(core_request("a", prompt, max_tokens=1))
    run_to_completion(core)
    assert kv.stats.hits == 0

    core.add_request(core_request("b", prompt, max_tokens=1))
    run_to_completion(core)
    assert kv.stats.hits == 12  # all three full blocks

    changed = prompt.copy()
    changed[5] = 99  # differs inside the second block: only the first block may be reused
    core.add_request(core_request("c", changed, max_tokens=1))
    run_to_completion(core)
    assert kv.stats.hits == 12 + 4

    exact = list(range(1, 13))  # 12 tokens = 3 full blocks; the last token must be recomputed
    core.add_request(core_request("d", exact, max_tokens=1))
    run_to_completion(core)
    assert kv.stats.hits == 12 + 4 + 8
    assert_all_free(kv)


def test_prefix_lookups_count_once_per_admission_not_per_retry():
    # The pool (8 blocks of 4) holds "big" alone; "small" waits at the head of the queue for
    # several steps. Its repeated lookups must not inflate the hit-rate denominator.
    core, kv, _ = make_core(num_blocks=8, budget=28)
    core.add_request(core_request("big", range(100, 128), max_tokens=4))
    core.add_request(core_request("small", range(1, 14), max_tokens=1))
    steps_small_waited = 0
    for _ in range(100):
        if not core.has_unfinished():
            break
        core.step()
        steps_small_waited += core.scheduler.requests.get("small") is not None and (
            core.scheduler.requests["small"].num_computed_tokens == 0
        )
    assert steps_small_waited >= 2, "the test needs 'small' to be refused admission repeatedly"
    assert core.scheduler.num_preemptions_total == 0
    assert kv.stats.queries == 28 + 13
    assert_all_free(kv)


def test_prefix_cache_off_never_hits():
    core, kv, _ = make_core(caching=False)
    for rid in "ab":
        core.add_request(core_request(rid, range(1, 14), max_tokens=2))
        run_to_completion(core)
    assert kv.stats.hits == 0
    assert_all_free(kv)


def test_cache_salt_isolates_prefixes():
    core, kv, _ = make_core()
    for rid, salt in (("a", b"tenant-1"), ("b", b"tenant-2")):
        req = core_request(rid, range(1, 14), max_tokens=1)
        core.add_request(EngineCoreRequest(**{**req.__dict__, "cache_salt": salt}))
        run_to_completion(core)
    assert kv.stats.hits == 0


def scheduled_ids(core) -> set[str]:
    """Run one step; the ids of the requests it computed tokens for."""
    plans = []
    execute = core.executor.execute
    core.executor.execute = lambda plan: plans.append(plan) or execute(plan)
    try:
        core.step()
    finally:
        del core.executor.execute
    return {rid for plan in plans for rid in plan.num_scheduled_tokens}


def test_burst_sharing_a_prompt_computes_it_once():
    # Three requests with one 13-token prompt (3 full blocks) arrive together, then an unrelated
    # one: the first computes the prompt, the other two wait one step for its blocks instead of
    # computing them too, and the request queued behind them waits with them (first come, first
    # served: it must not take their seats).
    core, kv, _ = make_core(budget=64)
    prompt = list(range(1, 14))
    for rid in ("a", "b", "c"):
        core.add_request(core_request(rid, prompt, max_tokens=2))
    core.add_request(core_request("other", range(20, 33), max_tokens=2))
    assert scheduled_ids(core) == {"a"}
    assert scheduled_ids(core) == {"a", "b", "c", "other"}
    assert kv.stats.hits == 2 * 12  # b and c found all three full blocks
    run_to_completion(core)
    assert_all_free(kv)

    # Without prefix caching nothing is shared, so nobody waits.
    core, kv, _ = make_core(budget=64, caching=False)
    for rid in ("a", "b"):
        core.add_request(core_request(rid, prompt, max_tokens=2))
    assert scheduled_ids(core) == {"a", "b"}
    run_to_completion(core)
    assert_all_free(kv)


def test_burst_waits_for_the_last_chunk_of_a_shared_prompt():
    # Budget 16, a 24-token prompt: "a" computes tokens 0-15, then 16-23 with 8 tokens of budget
    # to spare. "b" (same prompt) could start in that second step with 4 cached blocks and compute
    # block 4 again; it waits one step instead and reuses all five full blocks before its last token.
    core, kv, _ = make_core(budget=16)
    prompt = list(range(1, 25))
    core.add_request(core_request("a", prompt, max_tokens=2))
    core.add_request(core_request("b", prompt, max_tokens=2))
    assert [scheduled_ids(core) for _ in range(3)] == [{"a"}, {"a"}, {"a", "b"}]
    assert kv.stats.hits == 20
    run_to_completion(core)
    assert_all_free(kv)


def test_request_waiting_on_a_shared_prompt_keeps_its_place_in_the_queue():
    # Two seats. "a" runs a long request; "w" (a's prompt) waits a step for a's blocks; "v",
    # queued after w, must not take the last seat meanwhile (it would hold it for 40 steps).
    core, kv, _ = make_core(max_num_seqs=2, budget=16)
    prompt = list(range(1, 25))
    core.add_request(core_request("a", prompt, max_tokens=40))
    core.add_request(core_request("w", prompt, max_tokens=2))
    core.add_request(core_request("v", range(30, 40), max_tokens=40))
    assert [scheduled_ids(core) for _ in range(3)] == [{"a"}, {"a"}, {"a", "w"}]
    assert kv.stats.hits == 20
    run_to_completion(core)
    assert_all_free(kv)


def test_request_waiting_on_a_shared_prompt_runs_when_its_owner_is_aborted():
    # "x" takes 10 of the 16 tokens of budget, "a" starts its 24-token prompt with the other 6,
    # and "b" (same prompt) waits for a's blocks. Aborting "a" must release the wait: b starts at
    # the next step from the one block a had published.
    core, kv, _ = make_core(budget=16)
    prompt = list(range(1, 25))
    core.add_request(core_request("x", range(30, 40), max_tokens=4))
    core.add_request(core_request("a", prompt, max_tokens=2))
    core.add_request(core_request("b", prompt, max_tokens=2))
    assert scheduled_ids(core) == {"x", "a"}
    core.abort("a")
    assert scheduled_ids(core) == {"x", "b"}
    assert kv.stats.hits == 4
    run_to_completion(core)
    assert_all_free(kv)


def test_different_cache_salts_never_wait_for_each_other():
    core, kv, _ = make_core(budget=64)
    for rid, salt in (("a", b"tenant-1"), ("b", b"tenant-2")):
        req = core_request(rid, range(1, 14), max_tokens=1)
        core.add_request(EngineCoreRequest(**{**req.__dict__, "cache_salt": salt}))
    assert scheduled_ids(core) == {"a", "b"}
    run_to_completion(core)
    assert kv.stats.hits == 0
    assert_all_free(kv)


# ------------------------------------------------------------------------- scheduling


def test_chunked_prefill_keeps_decodes_running():
    core, kv, executor = make_core(budget=8, max_len=256, num_blocks=128)
    core.add_request(core_request("short", [1, 2, 3], max_tokens=40))
    core.step()  # short prefilled, now decoding
    core.add_request(core_request("long", range(10, 110), max_tokens=1))  # 100 tokens, budget 8
    decoded_while_long_prefills = 0
    for _ in range(12):
        plan_outputs, stats = core.step()
        assert stats.num_scheduled_tokens <= 8
        decoded_while_long_prefills += sum(1 for o in plan_outputs if o.request_id == "short")
    assert decoded_while_long_prefills == 12  # one token per step, never stalled
    run_to_completion(core)
    assert_all_free(kv)


def test_without_chunked_prefill_prompt_runs_whole():
    core, kv, _ = make_core(budget=64, max_len=64, chunked=False)
    core.add_request(core_request("a", range(1, 41), max_tokens=2))
    _, stats = core.step()
    assert stats.num_scheduled_tokens == 40
    run_to_completion(core)
    assert_all_free(kv)


def test_preemption_instead_of_oom_and_everyone_finishes():
    # 12 blocks of 4 = 48 slots; four requests that each grow to 20 tokens cannot all fit.
    core, kv, _ = make_core(num_blocks=12, budget=64, max_len=64)
    for i in range(4):
        core.add_request(core_request(f"r{i}", [i + 1] * 8, max_tokens=12))
    outputs = run_to_completion(core)
    assert core.scheduler.num_preemptions_total > 0
    per_request = {}
    for out in outputs:
        per_request.setdefault(out.request_id, []).extend(out.new_token_ids)
    assert {k: len(v) for k, v in per_request.items()} == {f"r{i}": 12 for i in range(4)}
    assert_all_free(kv)


def test_preemption_victim_is_lowest_priority_then_newest():
    core, kv, _ = make_core(num_blocks=10, budget=64, max_len=64)
    core.add_request(core_request("important", [1] * 8, max_tokens=20, priority=-1))
    core.add_request(core_request("old", [2] * 8, max_tokens=20, priority=0))
    core.add_request(core_request("new", [3] * 8, max_tokens=20, priority=0))
    preempted = []
    while core.has_unfinished():
        before = {r.request_id for r in core.scheduler.running}
        core.step()
        after = {r.request_id for r in core.scheduler.running}
        preempted.extend(sorted(before - after - {o for o in before if o not in core.scheduler.requests}))
    assert preempted and preempted[0] == "new"
    assert "important" not in preempted
    assert_all_free(kv)


def test_priority_orders_admission_and_fifo_within_priority():
    core, kv, _ = make_core(max_num_seqs=1, budget=32)
    core.add_request(core_request("low", [1, 2], max_tokens=1, priority=5))
    core.add_request(core_request("high-1", [3, 4], max_tokens=1, priority=-5))
    core.add_request(core_request("high-2", [5, 6], max_tokens=1, priority=-5))
    order = [o.request_id for o in run_to_completion(core)]
    assert order == ["high-1", "high-2", "low"]
    assert_all_free(kv)


def test_higher_priority_arrival_preempts_lower_when_full():
    core, kv, _ = make_core(max_num_seqs=1, budget=32)
    core.add_request(core_request("background", [1, 2], max_tokens=30, priority=10))
    core.step()
    core.add_request(core_request("urgent", [3, 4], max_tokens=2, priority=0))
    outputs, _ = core.step()
    assert [o.request_id for o in outputs] == ["urgent"]
    rest = run_to_completion(core)
    assert sum(len(o.new_token_ids) for o in outputs + rest if o.request_id == "background") == 29
    assert_all_free(kv)


def test_requests_that_can_never_fit_are_rejected_up_front():
    core, kv, _ = make_core(num_blocks=8, max_len=64)
    with pytest.raises(RequestRejected, match="context length"):
        core.add_request(core_request("a", range(1, 61), max_tokens=10))
    with pytest.raises(RequestRejected, match="64"):
        core.add_request(core_request("b", range(1, 65), max_tokens=1))
    with pytest.raises(RequestRejected, match="pool"):
        core.add_request(core_request("c", range(1, 30), max_tokens=10))  # 39 tokens > 32 slots
    assert not core.has_unfinished()


def test_abort_frees_blocks_immediately():
    core, kv, _ = make_core()
    core.add_request(core_request("a", range(1, 20), max_tokens=50))
    core.step()
    assert kv.num_free_blocks < kv.pool.num_blocks
    core.abort("a")
    assert_all_free(kv)
    assert not core.has_unfinished()


def test_parallel_samples_share_prompt_blocks():
    core, kv, executor = make_core(num_blocks=64)
    prompt = list(range(1, 18))  # 17 tokens: 4 full blocks shared, the last token recomputed
    core.add_request(core_request("a", prompt, max_tokens=3, n=4))
    core.step()  # prompt computed by the first sequence; siblings forked
    shared = kv.block_ids("a")[:4]
    for child in ("a#1", "a#2", "a#3"):
        assert core.scheduler.requests[child].num_computed_tokens == 16
    core.step()
    for child in ("a#1", "a#2", "a#3"):
        assert kv.block_ids(child)[:4] == shared
    outputs = run_to_completion(core)
    assert {o.index for o in outputs} == {0, 1, 2, 3}
    assert_all_free(kv)


def test_stop_string_finish_and_token_limits():
    core, kv, _ = make_core()
    core.add_request(core_request("a", [1, 2, 3], max_tokens=10))
    core.step()
    core.finish_stopped("a", 0)
    assert not core.has_unfinished()
    assert_all_free(kv)


def test_eos_and_stop_token_ids_and_min_tokens():
    kv = KVCacheManager(32, BLOCK)
    params = SamplingParams(max_tokens=10, min_tokens=2, stop_token_ids=[7])
    req = Request(
        EngineCoreRequest("x", [1, 2], params, frozenset({9}), arrival_time=0.0),
        index=0,
        arrival_seq=1,
        max_model_len=64,
    )
    assert not req.append_token(9, 64).is_finished  # eos inside min_tokens is ignored
    assert req.append_token(7, 64).finish_reason == "stop" and req.stop_reason == 7
    del kv


# ----------------------------------------------------------------- property-based tests

operation = st.one_of(
    st.tuples(
        st.just("add"),
        st.lists(st.integers(1, 6), min_size=1, max_size=40),  # small alphabet: many shared prefixes
        st.integers(1, 20),
        st.integers(-2, 2),
        st.integers(1, 3),
    ),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
    st.tuples(st.just("stop"), st.integers(0, 50)),
)


# derandomize: CI must be reproducible, so it replays the same examples on every run; run it with
# derandomize off and more examples when touching the scheduler. Failures found that way are pinned
# below as @example (and get a named regression test).
@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(operation, min_size=1, max_size=60),
    num_blocks=st.integers(6, 40),
    budget=st.integers(8, 40),
    chunked=st.booleans(),
    caching=st.booleans(),
)
@example(  # livelock: see test_lone_running_request_reclaims_blocks_parked_by_waiting_siblings
    ops=[("add", [1] * 7, 7, 0, 3), ("add", [1] * 9, 1, 0, 2)],
    num_blocks=6,
    budget=8,
    chunked=True,
    caching=False,
)
def test_random_operations_never_leak_or_corrupt(ops, num_blocks, budget, chunked, caching):
    max_len = 64 if chunked else min(64, budget)
    core, kv, executor = make_core(
        num_blocks=num_blocks,
        max_num_seqs=6,
        budget=budget,
        max_len=max_len,
        chunked=chunked,
        caching=caching,
    )
    added: list[str] = []
    for op in ops:
        if op[0] == "add":
            _, prompt, max_tokens, priority, n = op
            rid = f"r{len(added)}"
            try:
                core.add_request(core_request(rid, prompt, max_tokens=max_tokens, n=n, priority=priority))
                added.append(rid)
            except RequestRejected:
                assert len(prompt) + max_tokens > min(max_len, num_blocks * BLOCK)
        elif op[0] == "step":
            for _ in range(op[1]):
                core.step()
                kv.pool.check_invariants()
                assert kv.num_free_blocks >= 0
                assert len(core.scheduler.running) <= 6
        elif added:
            rid = added[op[1] % len(added)]
            if op[0] == "abort":
                core.abort(rid)
            else:
                core.finish_stopped(rid, 0)
    outputs = run_to_completion(core)
    for out in outputs:
        assert out.request_id in added
    assert_all_free(kv)
    core.step()  # an idle step still tells the runner which requests to forget
    assert not executor.seqs


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 10_000), num_requests=st.integers(1, 30))
def test_thousands_of_steps_all_requests_complete_exactly(seed, num_requests):
    import random

    rng = random.Random(seed)
    core, kv, _ = make_core(num_blocks=rng.randint(10, 60), budget=rng.randint(8, 64), seed=seed)
    expected = {}
    for i in range(num_requests):
        prompt = [rng.randint(1, 4) for _ in range(rng.randint(1, 30))]
        max_tokens = rng.randint(1, 10)
        core.add_request(core_request(f"r{i}", prompt, max_tokens=max_tokens, n=rng.choice([1, 1, 2])))
        expected[f"r{i}"] = max_tokens
    got: dict[tuple[str, int], int] = {}
    for out in run_to_completion(core):
        got[(out.request_id, out.index)] = got.get((out.request_id, out.index), 0) + len(out.new_token_ids)
    for (rid, _index), count in got.items():
        assert count == expected[rid]
    assert_all_free(kv)


def test_forked_siblings_holding_blocks_never_deadlock_the_queue():
    # Found by the property test above (seed 174): a forked sibling waiting with shared prompt
    # blocks while its parent was preempted left too few free blocks for the queue's head, and
    # with nothing running no step could ever make room.
    import random

    rng = random.Random(174)
    core, kv, _ = make_core(num_blocks=rng.randint(10, 60), budget=rng.randint(8, 64), seed=174)
    for i in range(20):
        prompt = [rng.randint(1, 4) for _ in range(rng.randint(1, 30))]
        core.add_request(
            core_request(f"r{i}", prompt, max_tokens=rng.randint(1, 10), n=rng.choice([1, 1, 2]))
        )
    run_to_completion(core)
    assert_all_free(kv)


def test_lone_running_request_reclaims_blocks_parked_by_waiting_siblings():
    # Found by the property test: forked siblings (n=3, n=2) waiting with their prompt blocks left
    # the one running sequence too few blocks to grow. It preempted itself, was readmitted for a
    # chunk the next step, and preempted itself again, forever. Alone, a request always fits the
    # pool, so it must take the parked blocks instead.
    core, kv, _ = make_core(num_blocks=6, max_num_seqs=6, budget=8, max_len=64, caching=False)
    core.add_request(core_request("a", [1] * 7, max_tokens=7, n=3))
    core.add_request(core_request("b", [1] * 9, max_tokens=1, n=2))
    outputs = run_to_completion(core, max_steps=200)
    counts: dict[tuple[str, int], int] = {}
    for out in outputs:
        key = (out.request_id, out.index)
        counts[key] = counts.get(key, 0) + len(out.new_token_ids)
    assert counts == {("a", 0): 7, ("a", 1): 7, ("a", 2): 7, ("b", 0): 1, ("b", 1): 1}
    assert_all_free(kv)


# ------------------------------------------------------------ runner failures (issue 11)


class FailingExecutor(CheckingExecutor):
    """A CheckingExecutor that fails steps on demand, the two ways a runner can fail.

    ``refuse`` holds sequence ids the runner refuses like the model runner's token-id range
    check: the plan is applied first, then ``RequestExecutionError`` names them. ``crashes``
    counts upcoming non-empty steps that die with an unattributed error before anything is
    applied (a kernel or device failure)."""

    def __init__(self, num_blocks: int, block_size: int, seed: int = 0) -> None:
        super().__init__(num_blocks, block_size, seed=seed)
        self.refuse: set[str] = set()
        self.crashes = 0

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        if self.crashes and not plan.is_empty:
            self.crashes -= 1
            raise RuntimeError("injected device failure")
        self.apply_plan(plan)
        refused = self.refuse & set(plan.num_scheduled_tokens)
        if refused:
            raise RequestExecutionError("injected: token ids outside the vocabulary", refused)
        return self.compute(plan)


def make_failing_core(num_blocks=64, budget=32, max_len=128, max_failures=3, seed=0, caching=True):
    kv = KVCacheManager(num_blocks, BLOCK, enable_caching=caching)
    executor = FailingExecutor(num_blocks, BLOCK, seed=seed)
    config = SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=max_len, enable_chunked_prefill=True
    )
    core = EngineCore(config, kv, executor, max_consecutive_failures=max_failures)
    return core, kv, executor


def finish_reasons(outputs) -> dict[tuple[str, int], str]:
    return {(o.request_id, o.index): o.finish_reason for o in outputs if o.finish_reason is not None}


def test_refused_request_fails_alone_and_the_rest_of_its_step_runs():
    core, kv, executor = make_failing_core()
    core.add_request(core_request("good", [1, 2, 3], max_tokens=4))
    core.step()  # "good" is decoding when the bad one arrives
    core.add_request(core_request("bad", [4, 5, 6, 7], max_tokens=4))
    core.add_request(core_request("also-good", [1, 2], max_tokens=4))
    executor.refuse = {"bad"}
    outputs, _ = core.step()
    # The step ran again without the culprit: the others got their token in this very step.
    assert finish_reasons(outputs) == {("bad", 0): "error"}
    assert {o.request_id for o in outputs if o.new_token_ids} == {"good", "also-good"}
    rest = run_to_completion(core)
    assert finish_reasons(rest) == {("good", 0): "length", ("also-good", 0): "length"}
    assert_all_free(kv)
    core.step()  # the runner was told to forget the failed request too
    assert not executor.seqs


def test_unattributed_failure_fails_its_step_and_the_engine_keeps_serving():
    core, kv, executor = make_failing_core()
    core.add_request(core_request("a", [1, 2, 3], max_tokens=4))
    core.add_request(core_request("b", [1, 2, 3, 4, 5], max_tokens=4, n=2))  # sibling not started yet
    executor.crashes = 1
    outputs, stats = core.step()
    assert finish_reasons(outputs) == {("a", 0): "error", ("b", 0): "error", ("b", 1): "error"}
    assert stats.num_generation_tokens == 0
    assert not core.has_unfinished()
    assert_all_free(kv)
    core.add_request(core_request("c", [1, 2], max_tokens=3))
    assert finish_reasons(run_to_completion(core)) == {("c", 0): "length"}
    core.step()
    assert not executor.seqs


def test_consecutive_unattributed_failures_give_up():
    core, _, executor = make_failing_core(max_failures=2)
    core.add_request(core_request("a", [1, 2, 3], max_tokens=4))
    executor.crashes = 1
    core.step()
    core.add_request(core_request("b", [1, 2, 3], max_tokens=4))  # a success in between resets
    core.step()
    executor.crashes = 2
    core.add_request(core_request("c", [1, 2, 3], max_tokens=4))
    core.step()
    core.add_request(core_request("d", [1, 2, 3], max_tokens=4))
    with pytest.raises(RuntimeError, match="2 engine steps in a row failed"):
        core.step()


def test_error_finish_reaches_the_request_status():
    assert RequestStatus.FINISHED_ERROR.is_finished
    assert RequestStatus.FINISHED_ERROR.finish_reason == "error"


failure_operation = st.one_of(
    operation,
    st.tuples(st.just("refuse"), st.integers(0, 50)),
    st.tuples(st.just("crash"), st.integers(1, 2)),
)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(failure_operation, min_size=1, max_size=50),
    num_blocks=st.integers(6, 40),
    budget=st.integers(8, 40),
    caching=st.booleans(),
)
def test_random_failures_never_leak_blocks_or_lose_requests(ops, num_blocks, budget, caching):
    core, kv, executor = make_failing_core(
        num_blocks=num_blocks, budget=budget, max_len=64, max_failures=1000, caching=caching
    )
    added: dict[str, int] = {}  # request id -> n
    ended_by_client: set[tuple[str, int | None]] = set()  # aborted (index None) or stopped
    outputs = []
    for op in ops:
        if op[0] == "add":
            _, prompt, max_tokens, priority, n = op
            rid = f"r{len(added)}"
            try:
                core.add_request(core_request(rid, prompt, max_tokens=max_tokens, n=n, priority=priority))
                added[rid] = n
            except RequestRejected:
                pass
        elif op[0] == "step":
            for _ in range(op[1]):
                outputs += core.step()[0]
                kv.pool.check_invariants()
        elif op[0] == "crash":
            executor.crashes = op[1]
        elif added:
            rid = list(added)[op[1] % len(added)]
            if op[0] == "refuse":
                executor.refuse.add(rid)
            elif op[0] == "abort":
                core.abort(rid)
                ended_by_client.add((rid, None))
            else:
                core.finish_stopped(rid, 0)
                ended_by_client.add((rid, 0))
    outputs += run_to_completion(core)
    assert_all_free(kv)
    core.step()
    assert not executor.seqs
    # Every sequence the client did not end itself ended exactly once: none is lost or doubled.
    ends = [(o.request_id, o.index) for o in outputs if o.finish_reason is not None]
    assert len(ends) == len(set(ends))
    for rid, n in added.items():
        for index in range(n):
            if (rid, None) not in ended_by_client and (rid, index) not in ended_by_client:
                assert (rid, index) in ends


def test_engine_loop_releases_idle_memory_each_time_work_runs_out():
    from quire.frontend import protocol
    from quire.frontend.core_process import EngineCoreLoop

    core, kv, executor = make_core()
    releases = []
    executor.release_idle_memory = lambda: releases.append(core.has_unfinished())
    # Two bursts of work separated by idle polls, then stop.
    script = [
        [protocol.AddRequest(core_request("a", range(1, 9), max_tokens=3))],
        *[[] for _ in range(3)],  # polls while busy and after "a" finished
        [protocol.AddRequest(core_request("b", range(1, 9), max_tokens=2))],
        *[[] for _ in range(3)],
        None,
    ]
    calls = iter(script)
    EngineCoreLoop(core).run(lambda block: next(calls), lambda batch: None)
    # Once per busy -> idle transition, and only when nothing was left to run.
    assert releases == [False, False]
    assert_all_free(kv)
