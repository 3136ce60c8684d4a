"""Engine-core outputs (token ids) -> user-facing RequestOutputs (text, logprobs, timings).

Detokenization and stop strings live here, on the client side of the engine, so that text
work never slows the step loop. When a stop string ends a sequence, the caller is told so it
can stop that sequence in the engine core.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from quire.core.outputs import EngineCoreOutput
from quire.sampling import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SamplingParams
from quire.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every RequestOutput carries everything so far
    DELTA = "delta"  # each carries only what is new since the last one (streaming)
    FINAL_ONLY = "final_only"  # only the finished RequestOutput is produced


@dataclass
class _Sequence:
    index: int
    detokenizer: IncrementalDetokenizer
    stop: StopStringMatcher | None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_text: int = 0  # DELTA: how much has been handed out already
    sent_tokens: int = 0


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    kind: OutputKind
    metrics: RequestMetrics
    sequences: list[_Sequence]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.sequences)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._requests: dict[str, _Request] = {}

    @property
    def num_unfinished(self) -> int:
        return len(self._requests)

    def add_request(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        kind: OutputKind = OutputKind.FINAL_ONLY,
    ) -> None:
        sequences = [
            _Sequence(
                index=i,
                detokenizer=IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens
                ),
                stop=StopStringMatcher(params.stop, params.include_stop_str_in_output)
                if params.stop
                else None,
                logprobs=[] if params.logprobs is not None else None,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
            )
            for i in range(params.n)
        ]
        self._requests[request_id] = _Request(
            request_id, prompt, list(prompt_token_ids), params, kind, RequestMetrics(arrival_time), sequences
        )

    def process(
        self, outputs: list[EngineCoreOutput], now: float | None = None
    ) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Fold one step's outputs in. Returns the RequestOutputs to hand out, and the
        (request_id, index) sequences that a stop string ended (to stop in the engine core)."""
        now = time.monotonic() if now is None else now
        touched: dict[str, _Request] = {}
        stopped: list[tuple[str, int]] = []
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is None:
                continue  # aborted meanwhile
            sequence = request.sequences[out.index]
            if sequence.finish_reason is not None:
                continue
            self._update_metrics(request.metrics, now)
            if out.first_scheduled_time is not None and request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = out.first_scheduled_time
            request.num_cached_tokens = max(request.num_cached_tokens, out.num_cached_tokens)
            if self._append(request, sequence, out):
                stopped.append((out.request_id, out.index))
            touched[out.request_id] = request
        results = []
        for request in touched.values():
            result = self._make_output(request)
            if result is not None:
                results.append(result)
        return results, stopped

    def abort(self, request_id: str, now: float | None = None) -> RequestOutput | None:
        """Finish a request as aborted; returns its last output (None if unknown)."""
        request = self._requests.get(request_id)
        if request is None:
            return None
        for sequence in request.sequences:
            if sequence.finish_reason is None:
                sequence.finish_reason = "abort"
        request.metrics.finished_time = time.monotonic() if now is None else now
        return self._make_output(request, force=True)

    @staticmethod
    def _update_metrics(metrics: RequestMetrics, now: float) -> None:
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now

    def _append(self, request: _Request, sequence: _Sequence, out: EngineCoreOutput) -> bool:
        """Add new tokens to one sequence; True if a stop string ended it here."""
        sequence.token_ids.extend(out.new_token_ids)
        if sequence.logprobs is not None:
            for entry in out.new_logprobs:
                sequence.logprobs.append(self._logprob_dict(entry))
                sequence.cumulative_logprob = (sequence.cumulative_logprob or 0.0) + entry.logprob
        finished = out.finish_reason is not None
        text_ids = out.new_token_ids
        if (
            finished
            and out.finish_reason == "stop"
            and text_ids
            and not request.params.include_stop_str_in_output
        ):
            # The engine stops only on an EOS or stop token, always the last one: like a stop
            # string, it ends the text without being part of it (with skip_special_tokens=False
            # its text, e.g. "</s>", would otherwise be appended). token_ids keep it.
            text_ids = text_ids[:-1]
        delta = sequence.detokenizer.add_tokens(text_ids)
        if finished:
            delta += sequence.detokenizer.finish()
        if sequence.stop is not None:
            emitted, matched = sequence.stop.feed(delta)
            if matched is not None:
                sequence.text += emitted
                sequence.finish_reason, sequence.stop_reason = "stop", matched
                return True
            delta = emitted + (sequence.stop.flush() if finished else "")
        sequence.text += delta
        if finished:
            sequence.finish_reason, sequence.stop_reason = out.finish_reason, out.stop_reason
        return False

    def _logprob_dict(self, entry) -> dict[int, Logprob]:
        decode = self.tokenizer.decode
        result = {
            entry.token_id: Logprob(
                entry.logprob, entry.rank, decode([entry.token_id], skip_special_tokens=False)
            )
        }
        for rank, (token_id, logprob) in enumerate(
            zip(entry.top_token_ids, entry.top_logprobs, strict=True), 1
        ):
            if token_id not in result:
                result[token_id] = Logprob(logprob, rank, decode([token_id], skip_special_tokens=False))
        return result

    def _make_output(self, request: _Request, force: bool = False) -> RequestOutput | None:
        finished = request.finished
        if finished:
            request.metrics.finished_time = request.metrics.finished_time or time.monotonic()
            del self._requests[request.request_id]
        if request.kind is OutputKind.FINAL_ONLY and not finished and not force:
            return None
        delta = request.kind is OutputKind.DELTA
        completions = []
        for sequence in request.sequences:
            text, token_ids = sequence.text, sequence.token_ids
            logprobs = sequence.logprobs
            if delta:
                text, token_ids = text[sequence.sent_text :], token_ids[sequence.sent_tokens :]
                if logprobs is not None:
                    logprobs = logprobs[sequence.sent_tokens :]
                sequence.sent_text, sequence.sent_tokens = len(sequence.text), len(sequence.token_ids)
            completions.append(
                CompletionOutput(
                    index=sequence.index,
                    text=text,
                    token_ids=list(token_ids),
                    cumulative_logprob=sequence.cumulative_logprob,
                    logprobs=list(logprobs) if logprobs is not None else None,
                    finish_reason=sequence.finish_reason,
                    stop_reason=sequence.stop_reason,
                )
            )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=request.num_cached_tokens,
            metrics=request.metrics,
        )
