"""Async engine clients: one interface, the engine core in a thread or in a process of its own.

Both clients keep tokenization (``InputProcessor``) and detokenization plus stop strings
(``OutputProcessor``) on the caller's side, in the event loop, so text work never stalls the step
loop. Each step's outputs arrive as one batch; every request gets a ``RequestStream`` whose
unread deltas are merged, so a slow consumer costs one pending object, never a growing queue.

    client = InProcessEngineClient(EngineArgs())     # tests, notebooks
    client = ProcessEngineClient(args, path, tok)    # the server: engine core over ZMQ
    await client.start()
    async for delta in client.generate("Hello", SamplingParams(max_tokens=8)):
        print(delta.outputs[0].text, end="")
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable

from quire.config import EngineArgs
from quire.core.outputs import StepStats
from quire.core.request import EngineCoreRequest
from quire.frontend import protocol
from quire.frontend.core_builder import EngineInfo, build_engine_core, resolve_model_path
from quire.frontend.core_process import IDLE_POLL_S, EngineCoreLoop
from quire.frontend.input_processor import InputProcessor, ProcessedPrompt, PromptType
from quire.frontend.output_processor import OutputKind, OutputProcessor
from quire.sampling import RequestOutput, SamplingParams
from quire.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

StatsListener = Callable[[StepStats], None]
DeathListener = Callable[[str], None]  # called with the reason when the engine dies unexpectedly


class EngineDeadError(RuntimeError):
    """The engine core is gone (crashed, failed to load, or shut down); nothing more will run."""


class RequestStream:
    """The outputs of one request, as ``RequestOutput`` deltas; iterate it with ``async for``.

    Deltas that arrive before the consumer reads them are merged into one, so the consumer sees
    every token exactly once however far behind it falls. Iteration ends after the finished output.
    """

    __slots__ = ("request_id", "num_seqs", "_pending", "_error", "_event", "_done")

    def __init__(self, request_id: str, num_seqs: int) -> None:
        self.request_id = request_id
        self.num_seqs = num_seqs
        self._pending: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()
        self._done = False  # the finished output (or an error) has been handed out

    @property
    def finished(self) -> bool:
        return self._done

    def put(self, output: RequestOutput) -> None:
        if self._pending is None:
            self._pending = output
        else:
            _merge_delta(self._pending, output)
        self._event.set()

    def fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        if self._pending is None and self._error is None:
            self._event.clear()
            await self._event.wait()
        output, self._pending = self._pending, None
        if output is not None:
            self._done = output.finished
            return output
        self._done = True
        assert self._error is not None
        raise self._error


def _merge_delta(into: RequestOutput, new: RequestOutput) -> None:
    """Fold delta ``new`` into the unread delta ``into`` (same request, same sequences)."""
    for seq, more in zip(into.outputs, new.outputs, strict=True):
        seq.text += more.text
        seq.token_ids.extend(more.token_ids)
        if more.logprobs is not None:
            seq.logprobs = (seq.logprobs or []) + more.logprobs
        seq.cumulative_logprob = more.cumulative_logprob
        if more.finish_reason is not None:
            seq.finish_reason, seq.stop_reason = more.finish_reason, more.stop_reason
    into.finished = new.finished
    into.num_cached_tokens = new.num_cached_tokens


class EngineClient(abc.ABC):
    """The async interface the server uses; subclasses only move messages to and from the core.

    After ``await start()``: ``tokenizer``, ``info`` and ``input_processor`` are set. Requests go
    in with ``add_request`` (already processed, so callers can reject bad input and apply policy
    before anything reaches the engine) or ``generate``; ``abort`` frees a request's KV blocks at
    once. ``last_stats`` is the latest ``StepStats``; stats listeners get every one.
    """

    def __init__(self) -> None:
        self.tokenizer: Tokenizer | None = None
        self.info: EngineInfo | None = None
        self.input_processor: InputProcessor | None = None
        self.output_processor: OutputProcessor | None = None
        self.last_stats: StepStats | None = None
        self._streams: dict[str, RequestStream] = {}
        self._num_seqs = 0
        self._dead: str | None = None
        self._ready = False
        self._stats_listeners: list[StatsListener] = []
        self._death_listeners: list[DeathListener] = []
        self._ids = itertools.count()

    # -- lifecycle ------------------------------------------------------------------------------

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model and start the engine core; raises ``EngineDeadError`` if it cannot."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine core; running requests end with ``EngineDeadError``."""

    async def restart(self) -> None:
        """Replace a dead engine core with a fresh one (the tokenizer stays); raises
        ``EngineDeadError`` if it cannot. Clients that cannot restart say so."""
        raise EngineDeadError(f"{type(self).__name__} cannot restart its engine")

    @property
    def is_ready(self) -> bool:
        return self._ready and self._dead is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead

    def add_stats_listener(self, listener: StatsListener) -> None:
        self._stats_listeners.append(listener)

    def add_death_listener(self, listener: DeathListener) -> None:
        """``listener(reason)`` runs in the event loop when the engine dies unexpectedly (not on
        ``shutdown``), after every running request has been failed."""
        self._death_listeners.append(listener)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._streams)

    @property
    def num_unfinished_seqs(self) -> int:
        """Sequences admitted and not yet finished (a request with ``n=4`` counts four)."""
        return self._num_seqs

    def _set_ready(self, tokenizer: Tokenizer, info: EngineInfo) -> None:
        self.tokenizer, self.info = tokenizer, info
        self.input_processor = InputProcessor(
            tokenizer, info.vocab_size, info.max_model_len, info.kv_capacity_tokens
        )
        # Fresh processors: after a restart, nothing of the dead engine's requests remains.
        self.output_processor = OutputProcessor(tokenizer)
        self._dead = None
        self._ready = True

    # -- requests -------------------------------------------------------------------------------

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def add_request(
        self, processed: ProcessedPrompt, request: EngineCoreRequest, kind: OutputKind = OutputKind.DELTA
    ) -> RequestStream:
        """Send an already-processed request to the engine; its deltas arrive on the stream
        (``OutputKind.FINAL_ONLY``: one output when it finishes, nothing built per step before)."""
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if not self._ready or self.output_processor is None:
            raise EngineDeadError("the engine is still loading")
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.params
        self.output_processor.add_request(
            request.request_id,
            processed.prompt,
            processed.token_ids,
            params,
            request.arrival_time,
            kind,
        )
        stream = RequestStream(request.request_id, params.n)
        self._streams[request.request_id] = stream
        self._num_seqs += params.n
        try:
            self._send(protocol.AddRequest(request))
        except BaseException:
            # Nothing reached the engine (e.g. a value the wire format cannot encode): undo the
            # admission, or the seats stay counted forever and every later request gets a 503.
            del self._streams[request.request_id]
            self._num_seqs -= params.n
            self.output_processor.abort(request.request_id)
            raise
        return stream

    async def generate(
        self, prompt: PromptType, params: SamplingParams, request_id: str | None = None, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Tokenize, validate and run one request, yielding its deltas; closing the iterator early
        aborts the request. Raises ``ValueError`` for bad input, ``EngineDeadError`` if the engine is gone."""
        if self.input_processor is None:
            raise EngineDeadError(self._dead or "the engine is still loading")
        request_id = request_id or self.new_request_id()
        processed, request = self.input_processor.make_request(request_id, prompt, params, priority)
        stream = self.add_request(processed, request)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort_now(request_id)

    async def abort(self, request_id: str) -> None:
        self.abort_now(request_id)

    def abort_now(self, request_id: str) -> None:
        """Abort without awaiting (safe in ``finally`` blocks of cancelled tasks). Idempotent."""
        stream = self._streams.pop(request_id, None)
        if stream is None:
            return
        self._num_seqs -= stream.num_seqs
        if self._dead is None:
            self._send(protocol.AbortRequests([request_id]))
        if self.output_processor is not None:
            final = self.output_processor.abort(request_id)
            if final is not None:
                stream.put(final)

    # -- engine side ----------------------------------------------------------------------------

    @abc.abstractmethod
    def _send(self, message: protocol.EngineInput) -> None: ...

    def _on_batch(self, batch: protocol.OutputBatch) -> None:
        """Fold one engine step into the requests' streams. Runs in the event loop."""
        processor = self.output_processor
        assert processor is not None
        for error in batch.errors:
            stream = self._streams.pop(error.request_id, None)
            processor.abort(error.request_id)
            if stream is not None:
                self._num_seqs -= stream.num_seqs
                stream.fail(ValueError(error.message))
        if batch.outputs:
            results, stopped = processor.process(batch.outputs)
            for request_id, index in stopped:
                self._send(protocol.FinishStopped(request_id, index))
            streams = self._streams
            for result in results:
                stream = streams.get(result.request_id)
                if stream is None:
                    continue
                stream.put(result)
                if result.finished:
                    del streams[result.request_id]
                    self._num_seqs -= stream.num_seqs
        if batch.stats is not None:
            self._publish_stats(batch.stats)

    def _publish_stats(self, stats: StepStats) -> None:
        self.last_stats = stats
        for listener in self._stats_listeners:
            listener(stats)

    def _mark_dead(self, reason: str, expected: bool = False) -> None:
        if self._dead is not None:
            return
        self._dead = reason
        logger.log(logging.INFO if expected else logging.ERROR, "engine core stopped: %s", reason)
        error = EngineDeadError(reason)
        for stream in self._streams.values():
            stream.fail(error)
        self._streams.clear()
        self._num_seqs = 0
        if not expected:
            # Nothing runs and no KV is held any more: say so to the metrics (gauges to zero; the
            # next engine's cumulative counters then start from zero, as after a counter reset).
            idle = StepStats(
                num_running=0,
                num_waiting=0,
                kv_cache_usage=0.0,
                num_scheduled_tokens=0,
                num_prompt_tokens=0,
                num_generation_tokens=0,
                num_preemptions=0,
                prefix_cache_queries=0,
                prefix_cache_hits=0,
            )
            self._publish_stats(idle)
            for listener in self._death_listeners:
                listener(reason)


class InProcessEngineClient(EngineClient):
    """The engine core stepping in a background thread of this process (tests, offline use)."""

    def __init__(self, args: EngineArgs) -> None:
        super().__init__()
        self.args = args
        self._inbox: queue.SimpleQueue[protocol.EngineInput] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        try:
            model_path = await asyncio.to_thread(resolve_model_path, self.args)
            tokenizer = await asyncio.to_thread(Tokenizer.from_path, model_path)
            core, info = await asyncio.to_thread(build_engine_core, self.args, model_path)
        except Exception as exc:
            self._mark_dead(f"{type(exc).__name__}: {exc}")
            raise EngineDeadError(self._dead) from exc
        self._thread = threading.Thread(
            target=self._run, args=(EngineCoreLoop(core),), name="engine-core", daemon=True
        )
        self._thread.start()
        self._set_ready(tokenizer, info)

    def _run(self, core_loop: EngineCoreLoop) -> None:
        loop = self._loop
        assert loop is not None
        try:
            core_loop.run(self._receive, lambda batch: loop.call_soon_threadsafe(self._on_batch, batch))
        except Exception as exc:  # report, don't hang: every stream ends with EngineDeadError
            logger.exception("engine core thread crashed")
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._mark_dead, f"{type(exc).__name__}: {exc}")

    def _receive(self, block: bool) -> list[protocol.EngineInput]:
        messages: list[protocol.EngineInput] = []
        if block:
            try:
                messages.append(self._inbox.get(timeout=IDLE_POLL_S))
            except queue.Empty:
                return messages
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def _send(self, message: protocol.EngineInput) -> None:
        self._inbox.put(message)

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._inbox.put(protocol.Shutdown())
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None
        self._mark_dead("the engine was shut down", expected=True)
