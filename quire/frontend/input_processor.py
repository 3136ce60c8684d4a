"""Prompts -> validated engine-core requests. Runs on the client side of the engine."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from quire.core.request import EngineCoreRequest, fit_error
from quire.sampling import SamplingParams
from quire.structured.backend import LRUCache, validate_structured_outputs
from quire.tokenizer import Tokenizer

PromptType = str | dict[str, Any]


@dataclass(frozen=True)
class ProcessedPrompt:
    prompt: str | None
    token_ids: list[int]


def check_vocab_fits(tokenizer: Tokenizer, vocab_size: int) -> None:
    """Refuse a tokenizer that can produce ids the model has no embedding for: found at start-up
    with both numbers, not on the first prompt that happens to produce such an id."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} token ids (added tokens included) but the model's "
            f"vocabulary has {vocab_size} (vocab_size in config.json): ids {vocab_size} and above "
            "would reach past the embedding table; use the tokenizer that belongs to this model"
        )
    outside = sorted(t for t in tokenizer.eos_token_ids if not 0 <= t < vocab_size)
    if outside:
        raise ValueError(
            f"end-of-sequence token ids {outside} are outside the model's vocabulary of {vocab_size}; "
            "check eos_token_id in config.json and generation_config.json"
        )


class InputProcessor:
    """Tokenizes prompts and rejects what the engine could never serve, with the numbers."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int, kv_capacity_tokens: int
    ) -> None:
        check_vocab_fits(tokenizer, vocab_size)
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.kv_capacity_tokens = kv_capacity_tokens
        # Verdicts on structured-output constraints: clients resend the same schema every request.
        self._grammar_verdicts = LRUCache(512)

    def process_prompt(self, prompt: PromptType) -> ProcessedPrompt:
        """A string is tokenized; ``{"prompt_token_ids": [...]}`` is taken as is (validated)."""
        if isinstance(prompt, str):
            token_ids = self.tokenizer.encode(prompt)
            # The tokenizer was checked against the model at start-up; this guards the engine
            # all the same, at the cost of one pass over ints the tokenizer just produced.
            if token_ids and not 0 <= min(token_ids) <= max(token_ids) < self.vocab_size:
                raise ValueError(
                    f"the tokenizer produced token ids outside the model's vocabulary of {self.vocab_size} "
                    "for this prompt; the tokenizer does not match the model"
                )
            return ProcessedPrompt(prompt, token_ids)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            token_ids = list(prompt["prompt_token_ids"])
            bad = [
                t
                for t in token_ids
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size
            ]
            if bad:
                raise ValueError(
                    f"prompt token ids must be integers in [0, {self.vocab_size}); found {bad[:5]!r}"
                )
            return ProcessedPrompt(prompt.get("prompt"), token_ids)
        raise ValueError(
            f"a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}"
        )

    def check_params(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        if num_prompt_tokens == 0:
            raise ValueError("the prompt is empty: it must contain at least one token")
        error = fit_error(num_prompt_tokens, params.max_tokens, self.max_model_len, self.kv_capacity_tokens)
        if error is not None:
            raise ValueError(error)
        for token_id in params.logit_bias or {}:
            if token_id >= self.vocab_size:
                raise ValueError(
                    f"logit_bias names token {token_id}, outside the vocabulary of {self.vocab_size}"
                )
        for token_id in params.stop_token_ids or []:
            if token_id >= self.vocab_size:
                raise ValueError(
                    f"stop_token_ids names token {token_id}, outside the vocabulary of {self.vocab_size}"
                )
        if params.structured_outputs is not None:
            self._check_structured(params)

    def _check_structured(self, params: SamplingParams) -> None:
        """The constraint compiles (the grammar engine's own message otherwise), and no stop token
        can cut it short: end-of-sequence ids are fine, the grammar allows them only where the
        output is complete."""
        assert params.structured_outputs is not None
        cutting = sorted(set(params.stop_token_ids or ()) - self.tokenizer.eos_token_ids)
        if cutting:
            raise ValueError(
                f"stop_token_ids {cutting[:5]} cannot be combined with structured_outputs: the grammar "
                "may allow those tokens mid-output, and stopping there would leave output that does not "
                "parse; only end-of-sequence ids (which the grammar allows where the output is complete) "
                "may be given"
            )
        validate_structured_outputs(params.structured_outputs, cache=self._grammar_verdicts)

    def make_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int = 0,
        cache_salt: bytes = b"",
    ) -> tuple[ProcessedPrompt, EngineCoreRequest]:
        """``cache_salt`` keeps the request's prefix-cache entries apart from requests with another
        salt (the server passes one per tenant)."""
        processed = self.process_prompt(prompt)
        self.check_params(len(processed.token_ids), params)
        request = EngineCoreRequest(
            request_id=request_id,
            prompt_token_ids=processed.token_ids,
            params=params,
            eos_token_ids=self.tokenizer.eos_token_ids,
            arrival_time=time.monotonic(),
            priority=priority,
            cache_salt=cache_salt,
        )
        return processed, request
