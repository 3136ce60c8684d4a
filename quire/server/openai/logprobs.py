"""Token logprobs in OpenAI's two response shapes.

Completions (legacy) use parallel lists: ``tokens``, ``token_logprobs``, ``top_logprobs`` (one dict
per position, token text -> logprob, the sampled token included) and ``text_offset``. Chat uses one
object per token: ``{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}``.

The engine's per-token entry is ``{token_id: Logprob}`` holding the sampled token (with its rank)
and the top alternatives (ranks 1..k).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from quire.sampling import Logprob

Entry = dict[int, Logprob]


def completion_logprobs(
    token_ids: Sequence[int], entries: Sequence[Entry], offset: int
) -> tuple[dict[str, Any], int]:
    """The legacy ``logprobs`` object for these tokens; ``offset`` is where their text starts.
    Returns it and the offset after them."""
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        sampled = entry[token_id]
        text = sampled.decoded_token or ""
        tokens.append(text)
        token_logprobs.append(sampled.logprob)
        top_logprobs.append({(lp.decoded_token or ""): lp.logprob for lp in entry.values()})
        text_offset.append(offset)
        offset += len(text)
    result = {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }
    return result, offset


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[Entry], top_n: int) -> list[dict[str, Any]]:
    """The ``logprobs.content`` list for these tokens, each with its ``top_n`` alternatives."""
    content = []
    for token_id, entry in zip(token_ids, entries, strict=True):
        sampled = entry[token_id]
        top = sorted((lp for lp in entry.values() if lp.rank <= top_n), key=lambda lp: lp.rank)[:top_n]
        content.append({**_token(sampled), "top_logprobs": [_token(lp) for lp in top]})
    return content


def _token(lp: Logprob) -> dict[str, Any]:
    text = lp.decoded_token or ""
    return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode("utf-8"))}
