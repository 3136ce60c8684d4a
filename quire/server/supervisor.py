"""Engine supervision: a dead engine process is replaced, a bounded number of times.

When the engine core dies (a crash, the OOM killer, SIGKILL) the client fails every running
request with ``EngineDeadError`` (a 503, or an SSE error event) and tells the supervisor, which
logs the death (never prompt text), counts the restart in ``quire:engine_restarts_total`` and
starts a fresh engine process. While it loads, readiness is 503 and liveness 200. More than
``max_restarts`` deaths within ``window_s`` seconds mean something is wrong that a restart will
not fix (a bad GPU, a model that always crashes): the supervisor then calls ``on_fatal`` and the
server exits non-zero, so systemd or Kubernetes can take over.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from collections.abc import Callable

from quire.frontend.async_client import EngineClient

logger = logging.getLogger(__name__)

# Between failed attempts to load a replacement engine (each one counts against the budget).
RETRY_DELAY_S = 1.0


class RestartBudget:
    """At most ``max_restarts`` restarts in any ``window_s``-second sliding window."""

    def __init__(self, max_restarts: int, window_s: float) -> None:
        if max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {max_restarts}")
        if not (window_s > 0 and math.isfinite(window_s)):
            raise ValueError(f"window_s must be a positive number of seconds, got {window_s}")
        self.max_restarts = max_restarts
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque()

    def take(self, now: float) -> bool:
        """Use one restart at time ``now``; False if the window's budget is spent."""
        while self._times and now - self._times[0] >= self.window_s:
            self._times.popleft()
        if len(self._times) >= self.max_restarts:
            return False
        self._times.append(now)
        return True

    @property
    def used(self) -> int:
        return len(self._times)


class EngineSupervisor:
    """Restarts ``client``'s engine when it dies; ``on_fatal(message)`` once the budget is spent.

    ``stopping()`` says the server is shutting down (no restart then); ``on_restart()`` runs before
    each restart attempt (the server counts it in a metric)."""

    def __init__(
        self,
        client: EngineClient,
        budget: RestartBudget,
        on_fatal: Callable[[str], None],
        on_restart: Callable[[], None],
        stopping: Callable[[], bool],
    ) -> None:
        self.client = client
        self.budget = budget
        self._on_fatal = on_fatal
        self._on_restart = on_restart
        self._stopping = stopping
        self._task: asyncio.Task[None] | None = None
        self.fatal_error: str | None = None

    def watch(self) -> None:
        """Start supervising (after the engine's first successful start)."""
        self.client.add_death_listener(self._on_death)

    @property
    def restarting(self) -> bool:
        return self._task is not None and not self._task.done()

    def _on_death(self, reason: str) -> None:
        # A death while a restart is under way is that restart's failure; the loop handles it.
        if not self.restarting and self.fatal_error is None:
            self._task = asyncio.ensure_future(self._restart_loop(reason))

    async def _restart_loop(self, reason: str) -> None:
        while True:
            if self._stopping():
                logger.warning("engine core died while the server is shutting down; not restarting it")
                return
            if not self.budget.take(time.monotonic()):
                self._give_up(reason)
                return
            self._on_restart()
            logger.warning(
                "engine core died (%s); restarting it (restart %d of at most %d per %.0f s)",
                reason,
                self.budget.used,
                self.budget.max_restarts,
                self.budget.window_s,
            )
            started = time.monotonic()
            try:
                await self.client.restart()
            except Exception as exc:  # a failed load counts as another death
                reason = f"the replacement failed to start: {exc}"
                logger.error("engine core restart failed: %s", exc)
                await asyncio.sleep(RETRY_DELAY_S)
                continue
            logger.warning("engine core restarted in %.1f s; serving again", time.monotonic() - started)
            return

    def _give_up(self, reason: str) -> None:
        self.fatal_error = (
            f"the engine core died ({reason}) after {self.budget.used} restart(s) within "
            f"{self.budget.window_s:.0f} s (--max-engine-restarts {self.budget.max_restarts}); exiting"
        )
        logger.error("%s", self.fatal_error)
        self._on_fatal(self.fatal_error)

    async def stop(self) -> None:
        """Cancel a restart under way (before the client shuts down)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
