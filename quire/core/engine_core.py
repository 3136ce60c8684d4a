"""The step loop: schedule -> execute on the model -> update. Torch-free; the runner is injected."""

from __future__ import annotations

from typing import Protocol

from quire.config import SchedulerConfig
from quire.core.kv_manager import KVCacheManager
from quire.core.outputs import EngineCoreOutput, RunnerOutput, SchedulerOutput, StepStats
from quire.core.request import EngineCoreRequest, Request, RequestStatus
from quire.core.scheduler import Scheduler


class ModelExecutor(Protocol):
    """Anything that can run one scheduled step (the torch model runner, or a fake in tests)."""

    def execute(self, plan: SchedulerOutput) -> RunnerOutput: ...


class EngineCore:
    """Owns the scheduler and KV manager and drives the executor one step at a time."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        kv_manager: KVCacheManager,
        executor: ModelExecutor,
    ) -> None:
        self.scheduler_config = scheduler_config
        self.kv = kv_manager
        self.scheduler = Scheduler(scheduler_config, kv_manager)
        self.executor = executor
        self._arrivals = 0
        self._sequences: dict[str, list[str]] = {}  # client request id -> its sequences' ids

    def add_request(self, core_request: EngineCoreRequest) -> None:
        """Queue a request (``n`` sequences). Raises ``RequestRejected`` if it can never fit."""
        if core_request.request_id in self._sequences:
            raise ValueError(f"request id {core_request.request_id!r} is already in use")
        max_len = self.scheduler_config.max_model_len
        sequences = []
        for index in range(core_request.params.n):
            self._arrivals += 1
            sequences.append(Request(core_request, index, self._arrivals, max_len))
        self.scheduler.add_request(sequences[0], children=sequences[1:])
        self._sequences[core_request.request_id] = [s.request_id for s in sequences]

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (all its sequences, or just one) and free its blocks at once."""
        ids = self._sequences.get(request_id)
        if ids is None:
            return
        targets = ids if index is None else ids[index : index + 1]
        # Children first: aborting the parent drops children that have not started yet.
        for sequence_id in reversed(targets):
            self.scheduler.finish(sequence_id, RequestStatus.FINISHED_ABORTED)
        self._forget_if_done(request_id)

    def finish_stopped(self, request_id: str, index: int) -> None:
        """A client-side stop condition (a stop string) ended one sequence."""
        ids = self._sequences.get(request_id)
        if ids is not None:
            self.scheduler.finish(ids[index], RequestStatus.FINISHED_STOPPED)
            self._forget_if_done(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._sequences)

    def step(self) -> tuple[list[EngineCoreOutput], StepStats]:
        plan = self.scheduler.schedule()
        num_prompt_tokens = self._count_prompt_tokens(plan)
        if plan.is_empty:
            result = RunnerOutput([], [], [])
            if plan.finished_request_ids:
                self.executor.execute(plan)  # let the runner drop state it no longer needs
        else:
            result = self.executor.execute(plan)
        outputs = self.scheduler.update(plan, result)
        for output in outputs:
            if output.finish_reason is not None:
                self._forget_if_done(output.request_id)
        stats = StepStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=self.kv.usage,
            num_scheduled_tokens=plan.total_num_scheduled_tokens,
            num_prompt_tokens=num_prompt_tokens,
            num_generation_tokens=len(result.sampled_token_ids),
            num_preemptions=self.scheduler.step_preemptions,
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
        )
        return outputs, stats

    def _count_prompt_tokens(self, plan: SchedulerOutput) -> int:
        total = 0
        requests = self.scheduler.requests
        for request_id, count in plan.num_scheduled_tokens.items():
            request = requests[request_id]
            total += max(0, min(count, request.num_prompt_tokens - request.num_computed_tokens))
        return total

    def _forget_if_done(self, request_id: str) -> None:
        ids = self._sequences.get(request_id, [])
        if all(sid not in self.scheduler.requests for sid in ids) and not self.scheduler.has_pending_children(
            ids[0] if ids else ""
        ):
            self._sequences.pop(request_id, None)
