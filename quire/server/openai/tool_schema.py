"""JSON schemas around function tools: checking a tool's ``parameters``, the constraints that
enforce ``tool_choice`` "required" and a named function, and the shape of a past call that chat
templates read.

Enforced choices (``tool_choice.py`` decides when):

- a named function: the output *is* the arguments, so the constraint is the function's own
  ``parameters`` schema;
- "required": the output is a JSON array of ``{"name": <const>, "arguments": <that function's
  schema>}`` items, one alternative per tool, at least one item (exactly one when
  ``parallel_tool_calls`` is false).

Objects that list their properties are closed (``closed_objects``). Schemas with ``$ref``s are
moved whole under the array schema's ``$defs`` with their references rewritten, so that each
function's references still resolve once it is nested.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

import jsonschema
import jsonschema.validators

# OpenAI: "Omitting parameters defines a function with an empty parameter list."
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


class _Function(Protocol):
    name: str
    parameters: dict[str, Any] | None


class _CallFunction(Protocol):
    name: str
    arguments: str


class _Call(Protocol):
    id: str
    type: str
    function: _CallFunction


def check_parameters_schema(schema: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``schema`` is a valid JSON schema for an arguments object."""
    if "type" in schema and schema["type"] != "object":
        raise ValueError(
            f'a function\'s parameters must be a JSON schema of "type": "object", got "type": {json.dumps(schema["type"])}'
        )
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise ValueError(
            f"parameters is not a valid JSON schema{f' (at {where})' if where else ''}: {exc.message}"
        ) from None


def parameters_of(function: _Function) -> dict[str, Any]:
    return function.parameters if function.parameters is not None else EMPTY_PARAMETERS


def named_call_schema(function: _Function) -> dict[str, Any]:
    """The constraint for ``tool_choice`` naming ``function``: its arguments object."""
    return closed_objects(parameters_of(function))


# Keywords whose value is a map of name -> subschema, one subschema, or a list of subschemas.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("items", "additionalProperties", "contains", "not", "if", "then", "else", "propertyNames")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")


def closed_objects(schema: Any) -> Any:
    """``schema`` with every object that lists ``properties`` but says nothing about others
    closed (``additionalProperties: false``).

    A call's arguments are the listed parameters: an open object lets the grammar accept any
    extra key, and a small model then writes one until ``max_tokens``. OpenAI's strict mode
    requires closed objects, and vLLM's default grammar engine (xgrammar in its default strict
    mode) compiles open ones as closed too."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(sub) for sub in out[key]]
    if (
        "properties" in out
        and not {"additionalProperties", "patternProperties", "unevaluatedProperties"} & out.keys()
    ):
        out["additionalProperties"] = False
    return out


def required_calls_schema(functions: Sequence[_Function], parallel: bool) -> dict[str, Any]:
    """The constraint for ``tool_choice: "required"``: a non-empty array of calls of ``functions``."""
    defs: dict[str, Any] = {}
    alternatives = []
    for index, function in enumerate(functions):
        arguments = _relocated(closed_objects(parameters_of(function)), f"fn{index}", defs)
        alternatives.append(
            {
                "type": "object",
                # "name" first: the stream can then announce the call before its arguments arrive.
                "properties": {"name": {"const": function.name}, "arguments": arguments},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    items = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def _relocated(schema: dict[str, Any], key: str, defs: dict[str, Any]) -> dict[str, Any]:
    """``schema`` as it can sit inside another document: unchanged without local ``$ref``s; else
    its definitions hoisted into ``defs`` as ``<key>__<name>``, itself stored as ``defs[key]``,
    every local reference rewritten, and a reference to it returned."""
    if not _has_local_ref(schema):
        return schema
    body = dict(schema)
    for container in ("$defs", "definitions"):
        for name, sub in (body.pop(container, None) or {}).items():
            defs[f"{key}__{name}"] = _rewrite_refs(sub, key)
    defs[key] = _rewrite_refs(body, key)
    return {"$ref": f"#/$defs/{key}"}


def _has_local_ref(value: Any) -> bool:
    if isinstance(value, dict):
        ref = value.get("$ref")
        return (isinstance(ref, str) and ref.startswith("#")) or any(
            _has_local_ref(v) for v in value.values()
        )
    if isinstance(value, list):
        return any(_has_local_ref(v) for v in value)
    return False


def _rewrite_refs(value: Any, key: str) -> Any:
    if isinstance(value, list):
        return [_rewrite_refs(v, key) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _rewrite_refs(v, key) for k, v in value.items()}
    ref = value.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = _rewrite_ref(ref, key)
    return out


def _rewrite_ref(ref: str, key: str) -> str:
    pointer = ref[1:]
    for container in ("/$defs/", "/definitions/"):
        if pointer.startswith(container):
            name, _, rest = pointer[len(container) :].partition("/")
            return f"#/$defs/{key}__{name}" + (f"/{rest}" if rest else "")
    return f"#/$defs/{key}{pointer}"


def template_tool_call(call: _Call) -> dict[str, Any]:
    """A past call as chat templates read it: OpenAI's shape, with ``arguments`` decoded to a dict.

    The API carries arguments as JSON text, while Hugging Face templates (Qwen, Llama, Mistral,
    Hermes) expect a mapping and write it with ``tojson``; transformers' documentation passes a
    dict, and vLLM decodes the text the same way. Arguments that are not a JSON object (a
    malformed call the model once made) stay text, which templates that check ``is string``
    write verbatim."""
    arguments: Any = call.function.arguments
    try:
        decoded = json.loads(arguments)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        arguments = decoded
    return {
        "id": call.id,
        "type": call.type,
        "function": {"name": call.function.name, "arguments": arguments},
    }
