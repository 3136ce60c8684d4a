"""Continuous batching: which requests run this step and how many tokens each computes.

Each step has a token budget (``max_num_batched_tokens``). Running requests are served first,
in priority order, and each is guaranteed at least one token of budget so that a long prompt
being prefilled in chunks never stalls the decodes behind it. Waiting requests are admitted
with what is left. When the pool runs out of blocks the lowest-priority, newest running request
is preempted: its blocks are freed and it is recomputed later (its prefix may still be cached).
A waiting request whose next prompt block another running request is computing right now (a
burst sharing a system prompt) waits for the end of the step, when that block is published, and
reuses it; the requests queued behind it wait with it.
"""

from __future__ import annotations

import bisect
import heapq
import time

from quire.config import SchedulerConfig
from quire.core.kv_manager import KVCacheManager
from quire.core.outputs import (
    CachedRequestData,
    EngineCoreOutput,
    NewRequestData,
    RunnerOutput,
    SchedulerOutput,
)
from quire.core.request import Request, RequestStatus, fit_error


class RequestRejected(ValueError):
    """A request that can never be served with this configuration."""


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.requests: dict[str, Request] = {}
        self.running: list[Request] = []  # sorted by Request.sort_key
        self._waiting: list[tuple[tuple[int, int], int, Request]] = []  # heap; stale entries skipped
        self._push_count = 0  # heap tie-break, so Request objects are never compared
        self._num_waiting = 0
        self._finished_ids: set[str] = set()  # runner must drop these at the next step
        self._known_to_runner: set[str] = set()
        # n > 1: siblings wait here until the first sequence has computed the prompt, then share it.
        self._pending_children: dict[str, list[Request]] = {}
        self.num_preemptions_total = 0
        self._step_preemptions = 0
        self._out_of_blocks = False  # this step: some allocation failed; admit nobody new

    # ----------------------------------------------------------------- requests in and out

    def check_fits(self, num_prompt_tokens: int, max_tokens: int | None) -> None:
        """Reject up front what could never run, with the numbers a user needs."""
        capacity = self.kv.pool.num_blocks * self.kv.block_size
        error = fit_error(num_prompt_tokens, max_tokens, self.config.max_model_len, capacity)
        if error is not None:
            raise RequestRejected(error)

    def add_request(self, request: Request, children: list[Request] | None = None) -> None:
        """Queue a request; ``children`` are its parallel samples, started by forking its
        prompt blocks once the prompt has been computed."""
        self.check_fits(request.num_prompt_tokens, request.params.max_tokens)
        for r in [request, *(children or [])]:
            if r.request_id in self.requests or r.request_id in self._pending_children:
                raise ValueError(f"request id {r.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._push_waiting(request)
        if children:
            self._pending_children[request.request_id] = list(children)

    def _start_children(self, parent: Request, share: bool) -> None:
        for child in self._pending_children.pop(parent.request_id, ()):
            if share:
                child.num_computed_tokens = self.kv.fork(parent, child)
            self.requests[child.request_id] = child
            self._push_waiting(child)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request (abort, or a stop string found by the client) and free its blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self._num_waiting -= 1  # its heap entry goes stale
        request.status = status
        if status != RequestStatus.FINISHED_ABORTED:
            self._start_children(request, share=True)
        else:
            self._pending_children.pop(request_id, None)
        self.kv.free(request)
        if request_id in self._known_to_runner:
            self._finished_ids.add(request_id)
            self._known_to_runner.discard(request_id)
        return request

    def take_pending_children(self, request_id: str) -> list[Request]:
        """Remove and return the not-yet-started siblings of ``request_id`` (they would have
        shared its prompt); the caller finishes them."""
        return self._pending_children.pop(request_id, [])

    def resend_finished(self, request_ids: frozenset[str]) -> None:
        """Tell the runner again, at the next step, to forget these ids: a step that failed may
        have failed before the runner read them. Ids the runner knows again are left out."""
        self._finished_ids.update(request_ids - self._known_to_runner)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending_children)

    def has_pending_children(self, request_id: str) -> bool:
        return request_id in self._pending_children

    # ------------------------------------------------------------------------- scheduling

    def schedule(self) -> SchedulerOutput:
        self._step_preemptions = 0
        self._out_of_blocks = False
        self._preempt_for_higher_priority()
        budget = self.config.max_num_batched_tokens
        num_tokens: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            behind = len(self.running) - index - 1  # each still needs a token of budget
            want = min(request.num_tokens - request.num_computed_tokens, max(budget - behind, 1))
            new_block_ids = self._allocate_or_preempt(request, want)
            if new_block_ids is None:
                break  # the request itself was the preemption victim, and it was last
            num_tokens[request.request_id] = want
            budget -= want
            self._emit(request, new_block_ids, new_reqs, cached_reqs)
            index += 1

        if not self._out_of_blocks:  # admitting now would only preempt again next step
            budget = self._admit_waiting(budget, num_tokens, new_reqs, cached_reqs)
            if not num_tokens and self._release_waiting_blocks():
                # Nothing could run: forked siblings waiting on shared prompt blocks were holding
                # the room the queue's head needs. Let them recompute (or hit the prefix cache).
                budget = self._admit_waiting(budget, num_tokens, new_reqs, cached_reqs)

        finished, self._finished_ids = frozenset(self._finished_ids), set()
        return SchedulerOutput(
            new_requests=new_reqs,
            cached_requests=cached_reqs,
            num_scheduled_tokens=num_tokens,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            finished_request_ids=finished,
        )

    def _allocate_or_preempt(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Blocks for ``request``'s next tokens, preempting the worst running requests for room.

        Returns None if ``request`` itself had to be preempted (it was the worst one running).
        """
        while True:
            new_block_ids = self.kv.allocate_slots(request, num_new_tokens)
            if new_block_ids is not None:
                return new_block_ids
            self._out_of_blocks = True
            victim = self.running[-1]  # lowest priority, newest
            if victim is request and len(self.running) == 1 and self._release_waiting_blocks():
                # Progress guarantee: the only running request must never preempt itself. Alone
                # it always fits the pool (``check_fits``), so what stands in its way is blocks
                # parked by waiting forked siblings. Preempting it instead would free its blocks,
                # readmit it for a chunk next step and preempt it again: a livelock.
                continue
            self._preempt(victim)
            if victim is request:
                return None

    def _admit_waiting(
        self,
        budget: int,
        num_tokens: dict[str, int],
        new_reqs: list[NewRequestData],
        cached_reqs: list[CachedRequestData],
    ) -> int:
        while self._waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._peek_waiting()
            if request is None:
                break
            fresh = request.num_computed_tokens == 0 and self.kv.num_blocks_of(request.request_id) == 0
            prefix = self.kv.find_cached_prefix(request) if fresh else []
            if fresh and self.kv.block_in_flight(request, prefix):
                # A running request is computing this prompt's next blocks (a burst of requests
                # sharing a system prompt): wait until they are published instead of computing
                # them twice. They are published at the end of this step: budget is left, so
                # every running or just-admitted request got all the tokens it asked for (a
                # chunk cut short by the budget leaves none). Freeing the owner also ends the
                # wait. The queue behind waits too, so that nobody takes the seat or the blocks
                # of a request that came first.
                break
            computed = request.num_computed_tokens + len(prefix) * self.kv.block_size
            want = request.num_tokens - computed
            if want > budget:
                if not self.config.enable_chunked_prefill:
                    break
                want = budget
            new_block_ids = self.kv.allocate_slots(request, want, prefix)
            if new_block_ids is None:
                break
            heapq.heappop(self._waiting)
            self._num_waiting -= 1
            if fresh:
                self.kv.record_prefix_lookup(request, prefix)
                self.kv.mark_in_flight(request, prefix)
            request.num_computed_tokens = computed
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = computed
                request.first_scheduled_time = time.monotonic()
            request.status = RequestStatus.RUNNING
            bisect.insort(self.running, request, key=lambda r: r.sort_key)
            num_tokens[request.request_id] = want
            budget -= want
            self._emit(request, new_block_ids, new_reqs, cached_reqs)
        return budget

    def _preempt_for_higher_priority(self) -> None:
        """A waiting request of strictly better priority displaces the worst running ones when
        there is no room for it; equal priorities never preempt each other (no thrashing)."""
        head = self._peek_waiting()
        while head is not None and self.running and self.running[-1].priority > head.priority:
            blocks_short = self.kv.blocks_needed(head.num_tokens) > self.kv.num_free_blocks
            if not blocks_short and len(self.running) < self.config.max_num_seqs:
                return
            self._preempt(self.running[-1])

    def _release_waiting_blocks(self) -> bool:
        """Free the blocks parked by waiting requests (forked siblings of ``n > 1``); they
        recompute their prompt when admitted, or find it in the prefix cache."""
        released = False
        for request in self.requests.values():
            if request.status == RequestStatus.WAITING and self.kv.num_blocks_of(request.request_id):
                self.kv.free(request)
                request.num_computed_tokens = 0
                released = True
        return released

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        if request.request_id in self._known_to_runner:
            self._known_to_runner.discard(request.request_id)
            self._finished_ids.add(request.request_id)
        self._push_waiting(request)
        self._step_preemptions += 1
        self.num_preemptions_total += 1

    def _emit(
        self,
        request: Request,
        new_block_ids: list[int],
        new_reqs: list[NewRequestData],
        cached_reqs: list[CachedRequestData],
    ) -> None:
        if request.request_id in self._known_to_runner:
            cached_reqs.append(
                CachedRequestData(request.request_id, new_block_ids, request.num_computed_tokens)
            )
            return
        self._known_to_runner.add(request.request_id)
        # A request preempted and resumed in the same step must not be dropped by the runner.
        self._finished_ids.discard(request.request_id)
        new_reqs.append(
            NewRequestData(
                request_id=request.request_id,
                token_ids=list(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens,
                params=request.params,
                eos_token_ids=request.eos_token_ids,
                block_ids=self.kv.block_ids(request.request_id),
                num_computed_tokens=request.num_computed_tokens,
            )
        )

    def _push_waiting(self, request: Request) -> None:
        self._push_count += 1
        heapq.heappush(self._waiting, (request.sort_key, self._push_count, request))
        self._num_waiting += 1

    def _peek_waiting(self) -> Request | None:
        while self._waiting:
            request = self._waiting[0][2]
            if request.status == RequestStatus.WAITING and self.requests.get(request.request_id) is request:
                return request
            heapq.heappop(self._waiting)  # stale: aborted or already admitted
        return None

    # ---------------------------------------------------------------------------- update

    def update(self, plan: SchedulerOutput, result: RunnerOutput) -> list[EngineCoreOutput]:
        """Advance computed counts, record sampled tokens, and finish what is done."""
        for request_id, count in plan.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished meanwhile (e.g. aborted between schedule and update)
            request.num_computed_tokens += count
            self.kv.cache_full_blocks(request)
            if (
                request.num_computed_tokens >= request.num_prompt_tokens
                and request_id in self._pending_children
            ):
                self._start_children(request, share=True)

        outputs: list[EngineCoreOutput] = []
        for request_id, token_id, logprobs in zip(
            result.request_ids, result.sampled_token_ids, result.logprobs, strict=True
        ):
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            status = request.append_token(token_id, self.config.max_model_len)
            output = EngineCoreOutput(
                request_id=request.external_id,
                index=request.index,
                new_token_ids=[token_id],
                new_logprobs=[logprobs] if logprobs is not None else [],
                num_cached_tokens=max(request.num_cached_tokens, 0),
                first_scheduled_time=request.first_scheduled_time if request.num_output_tokens == 1 else None,
            )
            if status.is_finished:
                self.finish(request_id, status)
                output.finish_reason = status.finish_reason
                output.stop_reason = request.stop_reason
            outputs.append(output)
        return outputs

    @property
    def step_preemptions(self) -> int:
        return self._step_preemptions
