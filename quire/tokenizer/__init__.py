"""Text in and out of the model: tokenizer loading, chat templates, streaming detokenization, stop strings.

- ``Tokenizer``: a local Hugging Face tokenizer directory (``tokenizer.json`` + configs), or the
  tokenizer stored in a GGUF file's metadata (``gguf_tokenizer``), behind a small API, with chat
  templates rendered exactly as ``transformers`` renders them. ``Tokenizer.from_path`` takes either.
- ``IncrementalDetokenizer``: token ids -> text deltas for one output sequence, never splitting
  a character.
- ``StopStringMatcher``: finds stop strings in a stream of text deltas, holding back text that
  may still turn out to be the start of one.

Per output sequence the two streaming pieces chain::

    detok = IncrementalDetokenizer(tokenizer, prompt_token_ids, params.skip_special_tokens)
    stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
    text, stop = stops.feed(detok.add_tokens(new_ids))  # each step; stop ends the sequence
    # on EOS / length: flush both, the detokenizer first (its tail can still complete a stop)
    text, stop = stops.feed(detok.finish())
    text += stops.flush() if stop is None else ""
"""

from __future__ import annotations

from quire.tokenizer.detokenizer import IncrementalDetokenizer
from quire.tokenizer.hf_tokenizer import Tokenizer
from quire.tokenizer.stop import StopStringMatcher

__all__ = ["IncrementalDetokenizer", "StopStringMatcher", "Tokenizer"]
