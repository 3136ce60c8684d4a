"""The step loop: schedule -> execute on the model -> update. Torch-free; the runner is injected."""

from __future__ import annotations

import logging
from typing import Protocol

from quire.config import SchedulerConfig
from quire.core.kv_manager import KVCacheManager
from quire.core.outputs import (
    EngineCoreOutput,
    RequestExecutionError,
    RunnerOutput,
    SchedulerOutput,
    StepStats,
)
from quire.core.request import EngineCoreRequest, Request, RequestStatus
from quire.core.scheduler import Scheduler

logger = logging.getLogger(__name__)

# What a step that was given up looks like to Scheduler.update: nothing ran, nothing advances.
_NOTHING_SCHEDULED = SchedulerOutput([], [], {}, 0, frozenset())


class ModelExecutor(Protocol):
    """Anything that can run one scheduled step (the torch model runner, or a fake in tests)."""

    def execute(self, plan: SchedulerOutput) -> RunnerOutput:
        """Run one step. May raise ``RequestExecutionError`` naming the requests it refuses, after
        applying the plan to its own state and before recording the step's results (before the
        model runs, or after it but before any request advances: rerunning the step then only
        rewrites the same KV slots)."""
        ...


class EngineCore:
    """Owns the scheduler and KV manager and drives the executor one step at a time."""

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        kv_manager: KVCacheManager,
        executor: ModelExecutor,
        max_consecutive_failures: int = 3,
    ) -> None:
        if max_consecutive_failures < 1:
            raise ValueError(f"max_consecutive_failures must be >= 1, got {max_consecutive_failures}")
        self.scheduler_config = scheduler_config
        # Steps failing in a row for no request's fault mean the model or device is broken:
        # after this many the engine gives up (raises) instead of failing every request forever.
        self.max_consecutive_failures = max_consecutive_failures
        self._consecutive_failures = 0
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
        if ids is not None and 0 <= index < len(ids):
            self.scheduler.finish(ids[index], RequestStatus.FINISHED_STOPPED)
            self._forget_if_done(request_id)

    def release_idle_memory(self) -> None:
        """Called when the engine has just run out of work: an executor that keeps memory for
        reuse between steps (``release_idle_memory``, optional) may give it back until the next
        request. A no-op for executors without the hook."""
        release = getattr(self.executor, "release_idle_memory", None)
        if release is not None:
            release()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._sequences)

    def step(self) -> tuple[list[EngineCoreOutput], StepStats]:
        """Schedule, execute and update once. A runner failure never escapes for a request's sake:
        the requests it concerns finish with ``finish_reason="error"`` and everyone else goes on.
        Only ``max_consecutive_failures`` failing steps in a row that no request could be blamed
        for (the model or device itself is broken) raise, so that a supervisor restarts us."""
        failed: list[EngineCoreOutput] = []
        plan, result, num_prompt_tokens = self._schedule_and_execute(failed)
        outputs = failed + self.scheduler.update(plan, result)
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

    def _schedule_and_execute(
        self, failed: list[EngineCoreOutput]
    ) -> tuple[SchedulerOutput, RunnerOutput, int]:
        """The step's plan, the runner's result and the prompt tokens computed. When the runner
        names the requests it refused, they are failed and the step runs again without them, so
        the others lose nothing (not even the step); otherwise the step is given up."""
        for attempt in range(2):
            plan = self.scheduler.schedule()
            num_prompt_tokens = self._count_prompt_tokens(plan)
            try:
                result = self._execute(plan)
            except Exception as exc:  # whatever the runner raises, one request must not kill us
                named = self._fail_step(plan, exc, failed)
                if named and attempt == 0:
                    continue
                return _NOTHING_SCHEDULED, RunnerOutput([], [], []), 0
            if not plan.is_empty:
                self._consecutive_failures = 0
            return plan, result, num_prompt_tokens
        raise AssertionError("unreachable")

    def _execute(self, plan: SchedulerOutput) -> RunnerOutput:
        if not plan.is_empty:
            return self.executor.execute(plan)
        if plan.finished_request_ids:
            self.executor.execute(plan)  # let the runner drop state it no longer needs
        return RunnerOutput([], [], [])

    def _fail_step(self, plan: SchedulerOutput, exc: Exception, failed: list[EngineCoreOutput]) -> bool:
        """Finish the requests a failed step concerns with an error; True if the runner named
        them. Unnamed failures fail every request of the step (the runner's state for them is
        unknown) and count towards ``max_consecutive_failures``."""
        scheduled = set(plan.num_scheduled_tokens)
        blamed = exc.request_ids & scheduled if isinstance(exc, RequestExecutionError) else set()
        named = bool(blamed)
        culprits = blamed if named else scheduled
        # The runner may have failed before reading the ids it had to forget.
        self.scheduler.resend_finished(plan.finished_request_ids)
        if named:
            # The runner's message names ids and counts, never prompt text.
            logger.warning("engine step: %s; failing request(s) %s", exc, ", ".join(sorted(culprits)))
        else:
            self._consecutive_failures += 1
            logger.error(
                "engine step failed (%d in a row); failing the %d request(s) it scheduled",
                self._consecutive_failures,
                len(culprits),
                exc_info=exc,
            )
            if self._consecutive_failures >= self.max_consecutive_failures:
                raise RuntimeError(
                    f"{self._consecutive_failures} engine steps in a row failed; last: {type(exc).__name__}: {exc}"
                ) from exc
        for sequence_id in sorted(culprits):
            failed.extend(self._finish_with_error(sequence_id))
        return named

    def _finish_with_error(self, sequence_id: str) -> list[EngineCoreOutput]:
        """Finish one sequence, and its siblings still waiting to share its prompt, as errors;
        their blocks go back to the pool and the runner forgets them at the next step."""
        request = self.scheduler.requests.get(sequence_id)
        if request is None:
            return []
        children = self.scheduler.take_pending_children(sequence_id)
        self.scheduler.finish(sequence_id, RequestStatus.FINISHED_ERROR)
        return [
            EngineCoreOutput(
                request_id=r.external_id,
                index=r.index,
                new_token_ids=[],
                finish_reason=RequestStatus.FINISHED_ERROR.finish_reason,
                num_cached_tokens=max(r.num_cached_tokens, 0),
            )
            for r in [request, *children]
        ]

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
