"""An in-process engine: input processing, the engine core, and output processing in one object.

Used by the offline ``LLM`` class, ``quire generate`` and tests. The server runs the same
pieces with the engine core in a process of its own.
"""

from __future__ import annotations

import itertools
import logging

from quire.config import EngineArgs
from quire.core.outputs import StepStats
from quire.frontend.core_builder import build_engine_core, resolve_model_path
from quire.frontend.input_processor import InputProcessor, PromptType
from quire.frontend.output_processor import OutputKind, OutputProcessor
from quire.sampling import RequestOutput, SamplingParams
from quire.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class LLMEngine:
    """Owns one model, its KV cache and scheduler; drive it with ``add_request`` and ``step``."""

    def __init__(self, args: EngineArgs) -> None:
        model_path = resolve_model_path(args)
        self.tokenizer = Tokenizer.from_path(model_path)
        self.core, self.info = build_engine_core(args, model_path)
        self.input_processor = InputProcessor(
            self.tokenizer, self.info.vocab_size, self.info.max_model_len, self.info.kv_capacity_tokens
        )
        self.output_processor = OutputProcessor(self.tokenizer)
        self.last_stats: StepStats | None = None
        self._ids = itertools.count()
        logger.info("engine ready: %s", self.info)

    def add_request(
        self,
        prompt: PromptType,
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
        kind: OutputKind = OutputKind.FINAL_ONLY,
    ) -> str:
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        processed, request = self.input_processor.make_request(request_id, prompt, params, priority)
        self.core.add_request(request)
        self.output_processor.add_request(
            request_id, processed.prompt, processed.token_ids, params, request.arrival_time, kind
        )
        return request_id

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.core.abort(request_id)
        return self.output_processor.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.num_unfinished > 0 or self.core.has_unfinished()

    def step(self) -> list[RequestOutput]:
        outputs, stats = self.core.step()
        self.last_stats = stats
        results, stopped = self.output_processor.process(outputs)
        for request_id, index in stopped:
            self.core.finish_stopped(request_id, index)
        return results
