"""The routing key of a request: chained hashes of its prompt's leading fixed-size blocks.

The ingress has no tokenizer, so blocks are characters of a canonical rendering of the prompt
(the completion prompt, or a chat request's tools, template kwargs and messages). Two requests
share the first ``k`` block hashes exactly when their renderings share the first
``k * block_chars`` characters, which is what decides whether a replica's KV prefix cache can
serve the second from the first.
Only full blocks count: a trailing partial block would differ between requests that share it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

DEFAULT_BLOCK_CHARS = 256
DEFAULT_MAX_BLOCKS = 64
# Separators that cannot appear in JSON-decoded text by accident often enough to matter; they
# keep "role=user, content=ab" and "role=usera, content=b" apart.
_ROLE_SEP = "\x1e"
_FIELD_SEP = "\x1f"
_SECTION_SEP = "\x1d"


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                parts.append(json.dumps(part, sort_keys=True, default=str))
        return "".join(parts)
    return "" if content is None else json.dumps(content, sort_keys=True, default=str)


def routing_text(body: Any) -> str:
    """The canonical text a request's prefix key is computed from ("" when it has none).

    Chat: ``tools`` and ``chat_template_kwargs`` first (chat templates render tools into the
    system turn, and the kwargs can change everything after it, so requests differing in either
    share no cached prefix), then each message as role and content; completions: the prompt (the
    first one of a list, token ids as their decimal list). Anything malformed yields "" and the
    replica reports the error itself.
    """
    if not isinstance(body, Mapping):
        return ""
    messages = body.get("messages")
    if isinstance(messages, list):
        rendered = [
            f"{_SECTION_SEP}{name}{_FIELD_SEP}{json.dumps(body[name], sort_keys=True, default=str)}"
            for name in ("tools", "chat_template_kwargs")
            if body.get(name) is not None
        ]
        for message in messages:
            if isinstance(message, Mapping):
                role = message.get("role")
                rendered.append(f"{_ROLE_SEP}{role}{_FIELD_SEP}{_content_text(message.get('content'))}")
        return "".join(rendered)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, (str, list)):
            prompt = first
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return ",".join(str(token) for token in prompt)
    return ""


def prefix_block_hashes(
    text: str,
    *,
    block_chars: int = DEFAULT_BLOCK_CHARS,
    max_blocks: int = DEFAULT_MAX_BLOCKS,
    namespace: str = "",
) -> tuple[str, ...]:
    """Hex digests of the chain ``h_i = H(h_{i-1} + block_i)`` over the first full blocks of ``text``.

    ``namespace`` (e.g. the model name and the tenant's cache salt) seeds the chain so different
    models, and tenants whose prefix caches quire keeps apart, never share keys.
    At most ``max_blocks`` are hashed: past a few thousand characters the key is specific enough.
    """
    if block_chars < 1:
        raise ValueError(f"block_chars must be >= 1, got {block_chars}")
    if max_blocks < 0:
        raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")
    digests: list[str] = []
    previous = hashlib.blake2b(namespace.encode(), digest_size=16).digest()
    for index in range(min(len(text) // block_chars, max_blocks)):
        block = text[index * block_chars : (index + 1) * block_chars]
        # surrogatepass: JSON may carry lone surrogates, which plain UTF-8 refuses to encode.
        previous = hashlib.blake2b(previous + block.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        digests.append(previous.hex())
    return tuple(digests)


def tenant_namespace(model: str, cache_salt: bytes | None) -> str:
    """The ``namespace`` of a request's prefix key: the model, and the tenant's prefix-cache salt
    (``Tenant.cache_salt``, already a digest: never a key). quire keeps each tenant's (or cache
    group's) cache entries apart, so a prefix only helps on a replica where the same tenant ran
    it. ``None``: a request whose key did not authenticate (the replica answers it 401)."""
    return f"{model}\0{cache_salt.hex() if cache_salt is not None else '-'}"
