"""Which request fields quire accepts, and what it says about the ones it refuses.

The rule: a field quire does not act on is refused with a 400 that names it, never silently
ignored, because a client that asked for something and got a response believes it was done.
Request models therefore forbid unknown fields (``extra="forbid"``), and the validation handler
turns such an error into a message from here: a specific one for the OpenAI and vLLM fields quire
knows but does not do, a generic one for anything else.

A few fields are accepted although quire does nothing with them, because doing nothing is exactly
what they ask of a self-hosted server (the request models declare them, and check their values):

- ``user``, ``safety_identifier``: end-user ids for OpenAI's abuse monitoring; nothing to monitor.
- ``metadata``: tags for completions stored by OpenAI; quire stores nothing.
- ``store``: only ``false`` (the default); quire keeps no completions to store.
- ``service_tier``: ``"auto"`` and ``"default"``; quire has one tier.
- ``prompt_cache_key``: a cache-routing hint; quire's prefix cache finds shared prefixes itself.
- ``prompt_cache_retention``: ``"in_memory"``, which is what quire's prefix cache is.
- ``modalities``: ``["text"]``, the only output quire produces.
- ``stream_options.include_obfuscation``: ``false``; quire adds no obfuscation padding.
- ``structured_outputs.disable_fallback``: quire's grammar engine has no fallback to disable.

Messages follow the same rule. A client that appends an earlier answer to ``messages`` (the
``openai`` SDK's ``messages.append(completion.choices[0].message)``, its ``.parse()`` and
``.stream()`` helpers, LangChain's ``AIMessage``, answers from vLLM or OpenAI) sends back fields of
the response message; those are accepted with the values an answer of quire's (or a text-only
model's) has, which say nothing (``MESSAGE_ECHO_FIELDS``): ``refusal``, ``audio``,
``function_call``, ``reasoning_content`` and ``reasoning`` null, ``annotations`` null or empty,
``prefix`` false or null. ``parsed`` (the SDK's parse of the content) and a tool call's ``index``
and ``function.parsed_arguments`` (its stream position and parse of the arguments) are accepted
with any value: each repeats what the message already says. Any other value is refused with the
reason below; an unknown message field with the generic message.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

# Known fields (OpenAI's chat and completion APIs, vLLM's extensions) that quire does not do, and
# what to say instead of the generic message. Read-only: a lookup table, not state.
UNSUPPORTED_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "audio": "audio output is not supported: quire generates text only",
        "prediction": "predicted outputs are not supported",
        "web_search_options": "web search is not supported",
        "functions": "the deprecated 'functions' parameter is not supported; use 'tools'",
        "function_call": "the deprecated 'function_call' parameter is not supported; use 'tool_choice'",
        "reasoning_effort": (
            "reasoning_effort is not supported; a model whose chat template has a reasoning switch "
            'takes it through chat_template_kwargs (e.g. {"enable_thinking": false})'
        ),
        "verbosity": "verbosity is not supported",
        "moderation": "moderation is not supported",
        "prompt_cache_options": (
            "prompt_cache_options is not supported; quire's prefix cache works without hints"
        ),
        "use_beam_search": "beam search is not supported",
        "length_penalty": "length_penalty is a beam-search parameter; beam search is not supported",
        "prompt_logprobs": "prompt logprobs are not supported",
        "truncate_prompt_tokens": "prompt truncation is not supported; send a shorter prompt",
        "allowed_token_ids": "allowed_token_ids is not supported; use structured_outputs or logit_bias",
        "bad_words": "bad_words is not supported; use logit_bias",
        "logits_processors": "request logits processors are not supported",
        "guided_whitespace_pattern": (
            "guided_whitespace_pattern is not supported; structured_outputs.disable_any_whitespace "
            "makes JSON output compact"
        ),
        "whitespace_pattern": (
            "whitespace_pattern is not supported; disable_any_whitespace makes JSON output compact"
        ),
        "structural_tag": "structural tags are not supported; use json, regex, choice or grammar",
        "disable_additional_properties": (
            'disable_additional_properties is not supported; set "additionalProperties": false in the schema'
        ),
        "continue_final_message": "continue_final_message is not supported",
        "documents": "documents (RAG template variable) are not supported",
        "mm_processor_kwargs": "multimodal inputs are not supported",
        "return_tokens_as_token_ids": "return_tokens_as_token_ids is not supported",
        "kv_transfer_params": "disaggregated serving (kv_transfer_params) is not supported",
        # In messages and their content parts.
        "prompt_cache_breakpoint": (
            "prompt cache breakpoints are not supported; quire's prefix cache finds shared prefixes itself"
        ),
        "cache_control": (
            "cache_control is not supported; quire's prefix cache finds shared prefixes itself"
        ),
    }
)


# Fields of an assistant answer that clients send back with the conversation: why quire refuses
# a value other than the no-op one (see the module docstring).
MESSAGE_ECHO_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "refusal": "a refusal in the history is not supported; put its text in content",
        "annotations": "annotations (URL citations) are not supported; send the text alone",
        "audio": "audio is not supported: quire generates and reads text only",
        "function_call": (
            "the deprecated function_call is not supported in messages; send the call in tool_calls"
        ),
        "reasoning_content": (
            "reasoning in the history is not supported (quire answers carry none); leave it out or "
            "put it in content"
        ),
        "reasoning": (
            "reasoning in the history is not supported (quire answers carry none); leave it out or "
            "put it in content"
        ),
        "prefix": (
            "continuing an assistant message (prefix) is not supported; end the conversation with "
            "a user or tool message"
        ),
    }
)


def unknown_field_message(field: str) -> str:
    """The 400's message for a request field the model does not declare (``field`` may be dotted,
    e.g. ``"stream_options.foo"``)."""
    name = field.rsplit(".", 1)[-1]
    reason = UNSUPPORTED_FIELDS.get(name)
    if reason is not None:
        return f"Unsupported parameter '{field}': {reason}."
    return (
        f"Unrecognized request parameter '{field}': quire does not support it, and refuses it "
        "rather than ignore it. Remove it from the request."
    )
