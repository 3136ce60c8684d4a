"""The offline batch API: ``LLM(path).generate(prompts, params)``, shaped like vLLM's."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quire.config import EngineArgs
from quire.frontend.llm_engine import LLMEngine, PromptType
from quire.sampling import RequestOutput, SamplingParams

ChatMessages = list[dict[str, Any]]


class LLM:
    """Generate completions for many prompts at once with continuous batching.

    ``LLM()`` with no model runs the built-in random-weight demo checkpoint (its text is random).
    ``model`` is a Hugging Face directory or a ``.gguf`` file. Keyword arguments are those of
    :class:`quire.config.EngineArgs`, e.g. ``dtype="float32"``, ``kv_cache_memory="2GiB"``,
    ``max_num_seqs=64``, ``enable_prefix_caching=False``, ``quantization="int8"``.
    """

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.engine = LLMEngine(EngineArgs(model=model, **engine_kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priority: Sequence[int] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Complete each prompt (a string, or ``{"prompt_token_ids": [...]}``); results keep the
        input order. One ``SamplingParams`` applies to all prompts, or pass one per prompt."""
        prompt_list = [prompts] if isinstance(prompts, str | dict) else list(prompts)
        params_list = _broadcast(sampling_params or SamplingParams(), len(prompt_list), "sampling_params")
        priorities = list(priority) if priority is not None else [0] * len(prompt_list)
        if len(priorities) != len(prompt_list):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompt_list)} prompts")
        return self._run(list(zip(prompt_list, params_list, priorities, strict=True)), use_tqdm)

    def chat(
        self,
        messages: ChatMessages | Sequence[ChatMessages],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        add_generation_prompt: bool = True,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation and complete it."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            {
                "prompt_token_ids": self._chat_prompt_ids(conversation, add_generation_prompt),
                "prompt": None,
            }
            for conversation in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _chat_prompt_ids(self, conversation: ChatMessages, add_generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
        # The template already carries any BOS token; do not add another.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _run(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, params, prio in requests:
                ids.append(engine.add_request(prompt, params, priority=prio))
        except ValueError:
            for request_id in ids:  # all or nothing: never leave half a batch running
                engine.abort_request(request_id)
            raise
        progress = _progress(len(ids)) if use_tqdm else None
        finished: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for result in engine.step():
                if result.finished:
                    finished[result.request_id] = result
                    if progress is not None:
                        progress.update(1)
        if progress is not None:
            progress.close()
        return [finished[i] for i in ids]


def _broadcast(value, count: int, name: str) -> list:
    if isinstance(value, SamplingParams):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"got {len(values)} {name} for {count} prompts; pass one, or one per prompt")
    return values


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generating", unit="req")
