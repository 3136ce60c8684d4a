"""Request bodies of the OpenAI-compatible endpoints (pydantic), and their mapping to SamplingParams.

Field names are OpenAI's where OpenAI has the parameter, vLLM's for the extensions (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``priority``,
...), so clients written for either work unchanged. Unknown fields are refused with a 400 naming
them (``field_policy.py`` says which fields are accepted as no-ops and why), never ignored: a
client must not believe something was done that was not. Structured output arrives in three
spellings (``structured_fields.py``) and leaves as one ``StructuredOutputsParams``.
Range checks live in ``SamplingParams`` (one place, one wording); a bad value becomes a 400.
Here only what must hold before anything else runs: every integer fits 64 bits (tighter where the
meaning allows), so no value can pass validation and then fail to serialize for the engine after
the request was admitted; floats are finite; every string is encodable UTF-8 (JSON's ``\ud800``
escapes can smuggle in lone surrogates, which the tokenizer and the encoders reject).

Responses are built as plain dicts in ``completions.py`` / ``chat.py`` and encoded with msgspec:
per-token streaming chunks are too hot a path for pydantic models.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from quire.sampling import MAX_LOGPROBS, SamplingParams
from quire.server.generation_defaults import SamplingDefaults
from quire.server.openai.field_policy import MESSAGE_ECHO_FIELDS, unknown_field_message
from quire.server.openai.structured_fields import structured_outputs_of
from quire.server.openai.tool_schema import check_parameters_schema, template_tool_call
from quire.structured.params import StructuredOutputsParams

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


class _Strict(_Body):
    # Request bodies: a field quire does not declare is a 400 (see field_policy.py).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _only(field: str, accepted: tuple[Any, ...], why: str) -> Any:
    """A validator accepting ``None`` or one of ``accepted`` for a field quire treats as a no-op."""

    def check(value: Any) -> Any:
        if value is not None and value not in accepted:
            shown = " or ".join(json.dumps(a) for a in accepted)
            raise ValueError(
                f"{field}: {json.dumps(value)} is not supported ({why}); send {shown} or leave it out"
            )
        return value

    return field_validator(field)(check)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None

    _obfuscation = _only("include_obfuscation", (False,), "quire adds no obfuscation padding to streams")


class JsonSchemaSpec(_Strict):
    """OpenAI's ``response_format.json_schema``; see ``structured_fields.py``."""

    name: Text = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: Text | None = None
    # Aliased: "schema" (and "json" below) would shadow pydantic's own attributes.
    schema_: JsonObject | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_only_with_its_type(self) -> ResponseFormat:
        # Dropping the schema would answer unconstrained text where the client asked for its shape.
        if self.type == "text" and self.json_schema is not None:
            raise ValueError(
                'response_format of type text takes no json_schema; send "type": "json_schema" to '
                "constrain the output to the schema"
            )
        return self


class StructuredOutputsRequest(_Strict):
    """vLLM's ``structured_outputs`` request object."""

    json_: JsonObject | StrictText | None = Field(None, alias="json")
    regex: StrictText | None = None
    choice: list[StrictText] | None = None
    grammar: StrictText | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False  # a no-op: quire's grammar engine has no fallback


class _ChatNoOpFields(_Strict):
    """OpenAI chat fields accepted although quire does nothing with them (see field_policy.py)."""

    metadata: dict[Text, Text] | None = None
    store: bool | None = None
    service_tier: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Text | None = None
    modalities: list[Text] | None = None

    _store = _only("store", (False,), "quire keeps no completions to store")
    _tier = _only("service_tier", ("auto", "default"), "quire has one service tier")
    _retention = _only("prompt_cache_retention", ("in_memory",), "quire's prefix cache is in memory")
    _modalities = _only("modalities", (["text"],), "quire generates text only")


class _SamplingFields(_Strict):
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
    # Structured output, in OpenAI's and vLLM's spellings (see structured_fields.py).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: JsonObject | StrictText | None = None
    guided_regex: StrictText | None = None
    guided_choice: list[StrictText] | None = None
    guided_grammar: StrictText | None = None
    guided_decoding_backend: Text | None = None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The output constraint the request asks for, or None; a 400 ``APIError`` naming the
        field for a malformed or doubled ask."""
        return structured_outputs_of(self)

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, defaults: SamplingDefaults | None = None
    ) -> SamplingParams:
        """The engine's parameters; raises ``ValueError`` (a 400) for out-of-range values.

        ``defaults`` (``--generation-config``) fill what the request leaves unset; without them
        quire's neutral values apply. ``max_tokens`` None stays None: admission turns it into the
        default ``max_tokens`` capped by the room the prompt leaves (``admission.py``)."""
        d = defaults or SamplingDefaults()
        return SamplingParams(
            n=self.n,
            temperature=_first(self.temperature, d.temperature, 1.0),
            top_p=_first(self.top_p, d.top_p, 1.0),
            top_k=_first(self.top_k, d.top_k, 0),
            min_p=_first(self.min_p, d.min_p, 0.0),
            repetition_penalty=_first(self.repetition_penalty, d.repetition_penalty, 1.0),
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
            structured_outputs=self.structured_outputs_params(),
        )


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


Prompt = StrictText | list[StrictText] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``. ``prompt``: a string, strings, token ids, or lists of token ids."""

    prompt: Prompt
    max_tokens: Count | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: Count | None = None
    suffix: Text | None = None

    def max_new_tokens(self, defaults: SamplingDefaults | None) -> int | None:
        """OpenAI's default of 16 applies when the request leaves ``max_tokens`` out, unless the
        server's defaults (``--generation-config``) give one: then None, which admission caps by
        the room the prompt leaves in the context."""
        if "max_tokens" not in self.model_fields_set and defaults is not None and defaults.max_tokens:
            return None
        return self.max_tokens

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


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictText


# Content part types of OpenAI's API that carry media: refused by name, not as a type mismatch.
_MEDIA_PARTS = MappingProxyType(
    {
        "image_url": "images are",
        "input_image": "images are",
        "image": "images are",
        "input_audio": "audio is",
        "audio": "audio is",
        "file": "files are",
        "input_file": "files are",
        "video_url": "videos are",
    }
)


def _text_parts_only(content: Any) -> Any:
    # Before the union is tried, so the client reads why, not that no alternative type matched
    # (nor an unknown field reported under the union's type name instead of its own).
    for index, part in enumerate(content if isinstance(content, list) else ()):
        if isinstance(part, dict) and part.get("type") == "text":
            extra = next((key for key in part if key not in TextPart.model_fields), None)
            if extra is not None:
                # Escaped: a lone surrogate in the key would make the error unencodable. Without a
                # context the message is not formatted, so braces in the key stay as sent.
                name = extra.encode("utf-8", "backslashreplace").decode("utf-8")
                raise PydanticCustomError("value_error", unknown_field_message(f"content.{index}.{name}"))
        if isinstance(part, dict) and isinstance(kind := part.get("type"), str) and kind != "text":
            media = _MEDIA_PARTS.get(kind)
            if media is not None:
                raise PydanticCustomError(
                    "value_error", f"{media} not supported by this server; send text content parts only"
                )
            raise PydanticCustomError(
                "value_error",
                f"content part type {kind!r} is not supported; send {{'type': 'text', 'text': ...}}",
            )
    return content


MessageContent = Annotated[StrictText | list[TextPart] | None, BeforeValidator(_text_parts_only)]
# OpenAI's function names; '.' too, as tool names namespaced by MCP servers use it.
FunctionName = Annotated[Text, Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")]


class FunctionDefinition(_Strict):
    """A function tool: ``parameters`` is the JSON schema of its arguments (none: no arguments)."""

    name: FunctionName
    description: Text | None = None
    parameters: JsonObject | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _valid_schema(cls, schema: dict[str, Any] | None) -> dict[str, Any] | None:
        if schema is not None:
            check_parameters_schema(schema)
        return schema


class FunctionTool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: FunctionName


class NamedToolChoice(_Strict):
    """``{"type": "function", "function": {"name": ...}}``: call exactly this function."""

    type: Literal["function"]
    function: NamedFunction


class ToolCallFunction(_Strict):
    name: Text
    arguments: StrictText  # JSON text, as the model (or the client) wrote it
    parsed_arguments: Any = None  # the openai SDK's parse of arguments, echoed back: not read


class ToolCallRef(_Strict):
    """A call an earlier assistant message made (sent back as conversation history)."""

    id: Text
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: Int64 | None = None  # its place in a stream, echoed back by the openai SDK: not read


def _echo(field: str, *accepted: Any) -> Any:
    """A validator for a field of an earlier answer that clients send back: None or one of
    ``accepted`` (the values that say nothing), or a 400 with field_policy's reason."""

    def check(value: Any) -> Any:
        if value is not None and value not in accepted:
            raise ValueError(MESSAGE_ECHO_FIELDS[field])
        return value

    return field_validator(field)(check)


class ChatMessage(_Strict):
    """One conversation message. Fields of an earlier answer that clients send back with it are
    accepted with the values that say nothing, and not read (see field_policy.py)."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent = None
    name: Text | None = None
    tool_calls: list[ToolCallRef] | None = None
    tool_call_id: Text | None = None
    refusal: Any = None
    annotations: Any = None
    audio: Any = None
    function_call: Any = None
    reasoning_content: Any = None
    reasoning: Any = None
    prefix: Any = None
    parsed: Any = None  # the openai SDK's parse of content (its .parse() helper): not read

    _refusal = _echo("refusal")
    _annotations = _echo("annotations", [])
    _audio = _echo("audio")
    _function_call = _echo("function_call")
    _reasoning_content = _echo("reasoning_content")
    _reasoning = _echo("reasoning")
    _prefix = _echo("prefix", False)

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"only assistant messages carry tool_calls, not {self.role!r} ones")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    @property
    def text(self) -> str:
        """The message's text: content parts joined."""
        content = self.content
        if isinstance(content, list):
            return "".join(part.text for part in content)
        return content or ""

    def template_dict(self) -> dict[str, Any]:
        # "developer" is OpenAI's newer name for "system"; chat templates only know the latter.
        role = "system" if self.role == "developer" else self.role
        # Content is always a string: "" for an assistant turn that only called tools (OpenAI
        # sends null), as vLLM passes it. Templates written for tools test it for truth, so they
        # render it as transformers renders the documented content-less turn, and templates that
        # read message['content'] unconditionally do not fail on it.
        message: dict[str, Any] = {"role": role, "content": self.text}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [template_tool_call(call) for call in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_SamplingFields, _ChatNoOpFields):
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
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def max_new_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``; None = the server's
        default capped by the rest of the context, or the rest of the context."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Strict):
    """``POST /tokenize``: ``prompt`` text, or chat ``messages`` rendered with the template."""

    model: Text | None = None
    prompt: StrictText | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Strict):
    model: Text | None = None
    tokens: list[TokenId]
