"""Request bodies of the OpenAI-compatible endpoints (pydantic), and their mapping to SamplingParams.

Field names are OpenAI's where OpenAI has the parameter, vLLM's for the extensions (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``priority``,
...), so clients written for either work unchanged. Unknown fields are ignored, as OpenAI does.
Range checks live in ``SamplingParams`` (one place, one wording); a bad value becomes a 400.
Here only what must hold before anything else runs: every integer fits 64 bits (tighter where the
meaning allows), so no value can pass validation and then fail to serialize for the engine after
the request was admitted; floats are finite; every string is encodable UTF-8 (JSON's ``\ud800``
escapes can smuggle in lone surrogates, which the tokenizer and the encoders reject).

Responses are built as plain dicts in ``completions.py`` / ``chat.py`` and encoded with msgspec:
per-token streaming chunks are too hot a path for pydantic models.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, StrictStr

from quire.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 128
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Token ids, token counts and top-k: no vocabulary or context comes near 2**31.
INT32_MAX = 2**31 - 1


def _encodable(text: str) -> str:
    """Reject lone surrogates (``"\\ud800"`` in JSON): not Unicode text, so no encoder takes them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text contains an unpaired UTF-16 surrogate ({text[exc.start]!r} at position {exc.start}); "
            "send valid Unicode"
        ) from None
    return text


def _encodable_json(value: Any) -> Any:
    """``_encodable`` for every string (keys included) of a free-form JSON value."""
    if isinstance(value, str):
        return _encodable(value)
    if isinstance(value, dict):
        for key, item in value.items():
            _encodable_json(key)
            _encodable_json(item)
    elif isinstance(value, list):
        for item in value:
            _encodable_json(item)
    return value


Text = Annotated[str, AfterValidator(_encodable)]
StrictText = Annotated[StrictStr, AfterValidator(_encodable)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_encodable_json)]
# Validated below 64 bits here; the meaningful range (and its message) is SamplingParams'.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
Count = Annotated[int, Field(ge=INT64_MIN, le=INT32_MAX)]
TokenId = Annotated[StrictInt, Field(ge=INT64_MIN, le=INT32_MAX)]


class _Body(BaseModel):
    # allow_inf_nan=False: JSON has no inf/NaN, yet 1e999 parses to inf; no parameter means it.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    """Parameters shared by completions and chat completions."""

    model: Text | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: StrictText | list[StrictText] | None = None
    seed: Int64 | None = None  # as vLLM: any 64-bit integer
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[Text, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None
    # vLLM extensions
    top_k: Count | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: Count = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: Int64 = 0

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; raises ``ValueError`` (a 400) for out-of-range values."""
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self.logit_bias,  # str keys: SamplingParams parses and bounds them
            seed=self.seed,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


Prompt = StrictText | list[StrictText] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, strings, token ids, or lists of token ids."""

    prompt: Prompt
    max_tokens: Count | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Count | None = None
    suffix: Text | None = None

    def prompts(self) -> list[str | dict[str, Any]]:
        """One engine prompt per entry: strings as text, token lists as ``prompt_token_ids``."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise ValueError("prompt must not be an empty list")
        if isinstance(prompt[0], int):
            return [{"prompt_token_ids": prompt}]
        if isinstance(prompt[0], str):
            return list(prompt)  # type: ignore[arg-type]
        return [{"prompt_token_ids": ids} for ids in prompt]  # type: ignore[misc]

    def check_supported(self) -> None:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported; use n")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError(
                "echo together with logprobs is not supported (prompt logprobs are not computed)"
            )


class TextPart(_Body):
    type: Literal["text"]
    text: StrictText


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictText | list[TextPart] | None = None
    name: Text | None = None

    def template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter.
        role = "system" if self.role == "developer" else self.role
        message: dict[str, Any] = {"role": role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``; the chat template is applied server-side."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Count | None = None
    max_completion_tokens: Count | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: JsonObject | None = None
    # vLLM's extension: a template name or source (source needs --trust-request-chat-template).
    chat_template: Text | None = None
    tools: list[JsonObject] | None = None

    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``; None = rest of the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None

    def check_supported(self) -> None:
        if self.tools:
            raise ValueError("tools are not supported by this server")


class TokenizeRequest(_Body):
    """``POST /tokenize``: ``prompt`` text, or chat ``messages`` rendered with the template."""

    model: Text | None = None
    prompt: StrictText | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: Text | None = None
    tokens: list[TokenId]
