"""Streaming detokenization: token ids in, text deltas out, one instance per output sequence.

A token is not a unit of text. Byte-level BPE splits a character's UTF-8 bytes across tokens,
SentencePiece byte fallback does the same with ``<0xNN>`` pieces, and Metaspace/SentencePiece
decoders drop the leading space of whatever token comes first in the list being decoded. So the
text of a new token is found by decoding a short window that ends with it and subtracting the
decode of the same window without it (the "prefix offset / read offset" technique):

    window:  [ ...already emitted...  | ...pending... ]
              ^ start                 ^ read_offset

``decode(window)[len(decode(window[:read_offset])):]`` is the pending text. It is held while it
ends in U+FFFD (a character whose bytes have not all arrived) and released as soon as it does not.
On release the window shrinks to the tokens just released, so each step decodes a handful of
tokens: O(1) per token while the output is valid text (a run of tokens that keeps ending in U+FFFD
grows the window until it stops).

Exactness: for byte-level BPE the streamed text always equals a one-shot decode, invalid bytes
included (a lossy UTF-8 decode never revises a character once the next one has started). For
SentencePiece byte fallback it does for valid UTF-8; but ``ByteFallback`` turns a whole run of
``<0xNN>`` pieces into U+FFFDs when any byte in it is invalid, retroactively, so a run that goes bad
after a complete character was streamed cannot match. Holding entire byte runs would fix only that
garbage case while stalling streams of rare CJK characters or emoji, which are long byte runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from quire.tokenizer.hf_tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded ahead of the output, so the first output token gets its leading space
# and merging right. A few are enough (the effects reach back a token or two); more only when
# those few end inside a character.
_PROMPT_CONTEXT_SIZES = (5, 16, 64)


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text deltas.

    ``add_tokens(ids)`` returns the text the new ids complete, possibly ``""`` while a character is
    still incomplete; ``finish()`` returns whatever is still held (the ``U+FFFD`` of bytes that never
    formed a character). With no prompt, the deltas plus ``finish()`` concatenate to exactly
    ``tokenizer.decode(output_ids, skip_special_tokens)``. With a prompt, they are the text the output
    adds after the prompt: identical to that for byte-level BPE, and for SentencePiece-style
    tokenizers including the space that a leading "▁" of the first output token stands for (which a
    standalone decode would strip), so that ``prompt + output`` reads right.
    """

    def __init__(
        self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        # decode(skip_special_tokens=True) filters these out before decoding, so leaving them out of
        # the window gives the same text and keeps runs of special tokens from growing the window.
        self._skipped = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
        self._window: list[int] = self._prompt_context(prompt_token_ids)
        self._read_offset = len(self._window)
        self._prefix_len = len(self._decode(self._window))

    def add_tokens(self, new_token_ids: Iterable[int]) -> str:
        """Append generated ids; return the text they complete."""
        pieces = []
        for token_id in new_token_ids:
            if token_id in self._skipped:
                continue
            self._window.append(token_id)
            text = self._decode(self._window)
            if text.endswith(_REPLACEMENT_CHAR):
                continue  # a multi-byte character is incomplete (or invalid: finish() settles that)
            pieces.append(self._release(text))
        return "".join(pieces)

    def finish(self) -> str:
        """Release text still held at the end of the sequence, e.g. bytes that never completed a
        character, exactly as a one-shot decode renders them. Call once, after the last token."""
        if self._read_offset == len(self._window):
            return ""
        return self._release(self._decode(self._window))

    def _release(self, text: str) -> str:
        delta = text[self._prefix_len :]
        # The released tokens become the prefix of the next window; older tokens no longer matter.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._prefix_len = len(self._decode(self._window))
        return delta

    def _prompt_context(self, prompt_token_ids: Sequence[int]) -> list[int]:
        # The last few prompt tokens, unless they decode to a broken character: then the window
        # may begin inside a multi-byte character or a byte-fallback run (which decodes to U+FFFDs
        # as a whole), so look further back. A prompt that really ends mid-character (possible only
        # with raw prompt ids) would let the output complete it; the output is then decoded alone.
        for size in _PROMPT_CONTEXT_SIZES:
            context = self._last_tokens(prompt_token_ids, size)
            if not context or not self._decode(context).endswith(_REPLACEMENT_CHAR):
                return context
            if len(context) < size:
                break  # already the whole prompt
        return []

    def _last_tokens(self, prompt_token_ids: Sequence[int], count: int) -> list[int]:
        tokens: list[int] = []
        for token_id in reversed(prompt_token_ids):
            if len(tokens) == count:
                break
            if token_id not in self._skipped:
                tokens.append(token_id)
        tokens.reverse()
        return tokens

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)
