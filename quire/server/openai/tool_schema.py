"""JSON schemas around function tools: checking a tool's ``parameters``, the constraints that
enforce ``tool_choice`` "required" and a named function, and the shape of a past call that chat
templates read.

Enforced choices (``tool_choice.py`` decides when):

- a named function: the output *is* the arguments, so the constraint is the function's own
  ``parameters`` schema;
- "required": the output is a JSON array of ``{"name": <const>, "arguments": <that function's
  schema>}`` items, one alternative per tool, at least one item (exactly one when
  ``parallel_tool_calls`` is false).

Objects that list their properties are closed where nothing else describes the same value's
keys (``closed_objects``: not inside ``allOf``, next to a ``$ref``, ...; closing there would
refuse keys another branch requires and make a valid schema unsatisfiable). Schemas with
``$ref``s are moved whole under the array schema's ``$defs`` with their references rewritten, so
that each function's references still resolve once it is nested.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from typing import Any, Protocol

import jsonschema
import jsonschema.validators

# How deeply a function's parameters may nest (JSON objects and arrays, the outermost one
# counted). Real tool schemas stay below 20; the limit keeps every recursive walk over a schema
# (jsonschema's check, closed_objects, the grammar compiler) far from Python's recursion limit.
MAX_PARAMETERS_DEPTH = 64


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
    if _nesting_depth(schema) > MAX_PARAMETERS_DEPTH:
        raise ValueError(
            f"parameters nests JSON objects and arrays more than {MAX_PARAMETERS_DEPTH} levels deep; "
            "flatten the schema"
        )
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.path)
        raise ValueError(
            f"parameters is not a valid JSON schema{f' (at {where})' if where else ''}: {exc.message}"
        ) from None
    except RecursionError:
        # Not expected within the depth limit (the check recurses ~12 frames per level); should
        # the stack be deeper than usual here, still a 400, not a 500.
        raise ValueError("parameters nests too deeply to be checked; flatten the schema") from None


def _nesting_depth(value: Any) -> int:
    """How many JSON objects and arrays deep ``value`` goes, counted up to one past the limit
    (iteratively: the value may be deeper than Python can recurse)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_PARAMETERS_DEPTH:  # past it the answer is known: stop going deeper
            stack.extend((child, depth + 1) for child in children)
    return deepest


def parameters_of(function: _Function) -> dict[str, Any]:
    """``function``'s parameters schema; a fresh one with no parameters when it has none (OpenAI:
    "Omitting parameters defines a function with an empty parameter list")."""
    if function.parameters is not None:
        return function.parameters
    return {"type": "object", "properties": {}, "additionalProperties": False}


def named_call_schema(function: _Function) -> dict[str, Any]:
    """The constraint for ``tool_choice`` naming ``function``: its arguments object."""
    return closed_objects(parameters_of(function))


# Which keywords apply their subschemas to the same instance as the schema they sit in (in
# place), and which describe an object's keys or the items of an array (children).
_IN_PLACE_ONE = ("not", "if", "then", "else")
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAPS = ("dependentSchemas", "dependencies")  # draft 7's "dependencies" may hold schemas
_REFS = frozenset({"$ref", "$dynamicRef", "$recursiveRef"})
_IN_PLACE = frozenset(_IN_PLACE_ONE + _IN_PLACE_LISTS + _IN_PLACE_MAPS) | _REFS
_ITEMS_ONE = ("items", "additionalItems")
_ITEMS_LISTS = ("items", "prefixItems")
# Besides "properties" and "required": what a subschema next to an object may say that lets or
# makes the object hold keys outside the object's own "properties", or that describes the same
# children as the object's own keywords.
_SHAPING = frozenset(
    {
        "patternProperties",
        "additionalProperties",
        "unevaluatedProperties",
        "minProperties",
        "dependentRequired",
        "const",
        "enum",
        "items",
        "prefixItems",
        "additionalItems",
        "contains",
        "unevaluatedItems",
    }
)
_MAX_PASSES = 8
# Identifiers that let a reference reach a subschema other than by its JSON pointer.
_ANCHORS = frozenset({"$anchor", "$dynamicAnchor", "$recursiveAnchor", "$dynamicRef", "$recursiveRef"})


def closed_objects(schema: Any) -> Any:
    """``schema`` with each object schema that alone decides its instance's keys, lists
    ``properties`` and says nothing about other keys closed (``additionalProperties: false``).

    A call's arguments are the listed parameters: an open object lets the grammar accept any
    extra key, and a small model then writes one until ``max_tokens``. OpenAI's strict mode
    requires closed objects, and vLLM's default grammar engine (xgrammar in its default strict
    mode) compiles open ones as closed too.

    Closing only narrows what the schema accepts, and is skipped wherever it could refuse what
    the schema requires: an object stays open where another subschema applies to the same value
    and may name other keys (``allOf`` branches, a ``$ref`` with sibling keywords, ``then``, a
    several-branch ``oneOf``, ...), where it requires keys it does not list, and everywhere below
    such a place. ``anyOf`` alternatives each describe the whole value, so each is closed. A
    ``$defs`` entry is closed only when every reference to it is such a sole description.
    Schemas with anchors, dynamic references or nested ``$id``s are left as they are."""
    if not isinstance(schema, dict):
        return schema
    # A nested "$id" changes what the local references under it point to.
    if _has_key({k: v for k, v in schema.items() if k != "$id"}, _ANCHORS | {"$id"}):
        return schema
    closer = _Closer(schema)
    # Until no further reference target turns out shared: a pass can only add to them, and a
    # target found shared late reaches the references inside it only in the next pass. Real
    # schemas settle in two or three; a schema built to need more stays as it is (open is safe).
    for _ in range(_MAX_PASSES):
        shared = len(closer.shared)
        out = closer.walk(schema, (), True)
        if len(closer.shared) == shared:
            return out
    return schema


class _Closer:
    """One ``closed_objects`` run: ``shared`` holds the JSON pointers (as tuples) of referenced
    subschemas that some reference combines with other keywords, which therefore stay open."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self.shared: set[tuple[str, ...]] = set()

    def walk(self, node: Any, path: tuple[str, ...], sole: bool) -> Any:
        """``node`` (at ``path``) rewritten; ``sole``: nothing else describes its instance."""
        if not isinstance(node, dict):
            return node
        sole = sole and path not in self.shared
        props = node.get("properties") if isinstance(node.get("properties"), dict) else {}
        neutral, touched = _neutral_in_place(node, set(props))
        keys_sole = sole and neutral and "patternProperties" not in node
        items_sole = sole and neutral and not {"contains", "unevaluatedItems"} & node.keys()
        self._note_ref(node, path, sole)
        out = dict(node)
        if props:
            out["properties"] = {
                name: self.walk(sub, (*path, "properties", name), keys_sole and name not in touched)
                for name, sub in props.items()
            }
        self._walk_one(out, "additionalProperties", path, keys_sole)
        for key in _ITEMS_ONE:
            self._walk_one(out, key, path, items_sole)
        for key in _ITEMS_LISTS:
            self._walk_list(out, key, path, items_sole)
        for key in ("contains", "unevaluatedItems", "unevaluatedProperties", "propertyNames"):
            self._walk_one(out, key, path, False)
        for key in ("patternProperties", *_IN_PLACE_MAPS):
            self._walk_map(out, key, path, False)
        for key in ("$defs", "definitions"):
            self._walk_map(out, key, path, True)  # how they are referenced decides
        alternative = _alternatives(node, self.root)
        for key in _IN_PLACE_ONE:
            self._walk_one(out, key, path, False)
        for key in _IN_PLACE_LISTS:
            self._walk_list(out, key, path, sole and key == alternative)
        if "properties" in node and keys_sole and _lists_its_keys(node, set(props)):
            out["additionalProperties"] = False
        return out

    def _walk_one(self, out: dict[str, Any], key: str, path: tuple[str, ...], sole: bool) -> None:
        if isinstance(out.get(key), dict):
            out[key] = self.walk(out[key], (*path, key), sole)

    def _walk_list(self, out: dict[str, Any], key: str, path: tuple[str, ...], sole: bool) -> None:
        if isinstance(out.get(key), list):
            out[key] = [self.walk(sub, (*path, key, str(i)), sole) for i, sub in enumerate(out[key])]

    def _walk_map(self, out: dict[str, Any], key: str, path: tuple[str, ...], sole: bool) -> None:
        if isinstance(out.get(key), dict):
            out[key] = {name: self.walk(sub, (*path, key, name), sole) for name, sub in out[key].items()}

    def _note_ref(self, node: dict[str, Any], path: tuple[str, ...], sole: bool) -> None:
        # A reference next to keywords that shape the same instance shares its target with them.
        ref = node.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#"):
            return
        alone = not (node.keys() - {"$ref"}) & (_IN_PLACE | _SHAPING | {"properties", "required"})
        if not (sole and alone):
            self.shared.add(_pointer(ref))


def _alternatives(node: dict[str, Any], root: dict[str, Any]) -> str | None:
    """The keyword whose subschemas each describe ``node``'s whole value alone, when nothing else
    in ``node`` shapes that value: ``anyOf``, a one-branch ``allOf``, or a ``oneOf`` whose
    branches a required constant tells apart (pydantic's discriminated unions). Not any other
    ``oneOf``: closing its branches could leave a value matching only one of them, which the
    schema refused for matching several."""
    shaping = node.keys() & (_IN_PLACE | _SHAPING | {"properties", "required"})
    if len(shaping) != 1:
        return None
    [key] = shaping
    branches = node[key]
    if not isinstance(branches, list):
        return None
    if key == "anyOf" or (key == "allOf" and len(branches) == 1):
        return key
    if key == "oneOf" and (len(branches) == 1 or _told_apart(branches, root)):
        return key
    return None


def _told_apart(branches: list[Any], root: dict[str, Any]) -> bool:
    """Whether one required property has a different constant in each branch (so that no value
    matches two branches, closed or not)."""
    constants: list[dict[str, str]] = []
    for branch in branches:
        if isinstance(branch, dict) and isinstance(branch.get("$ref"), str):
            branch = _resolve(root, branch["$ref"])
        if not isinstance(branch, dict):
            return False
        props, required = branch.get("properties"), branch.get("required")
        if not isinstance(props, dict) or not isinstance(required, list):
            return False
        constants.append(
            {
                name: const
                for name in required
                if isinstance(name, str) and (const := _constant(props.get(name))) is not None
            }
        )
    common = set.intersection(*(set(c) for c in constants)) if constants else set()
    return any(len({c[name] for c in constants}) == len(constants) for name in common)


def _constant(schema: Any) -> str | None:
    """The one value ``schema`` allows (``const``, a one-item ``enum``) as JSON text, or None."""
    if not isinstance(schema, dict):
        return None
    if "const" in schema:
        return json.dumps(schema["const"], sort_keys=True)
    enum = schema.get("enum")
    if isinstance(enum, list) and len(enum) == 1:
        return json.dumps(enum[0], sort_keys=True)
    return None


def _resolve(root: dict[str, Any], ref: str) -> Any:
    """The subschema a local reference points to, or None."""
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in _pointer(ref):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _neutral_in_place(node: dict[str, Any], names: set[str]) -> tuple[bool, set[str]]:
    """Whether every subschema applied in place of ``node`` is content with an object that holds
    only keys out of ``names``, and which of those keys' values they describe too."""
    touched: set[str] = set()
    if _REFS & node.keys():
        return False, touched
    subs: list[Any] = [node[key] for key in _IN_PLACE_ONE if key in node]
    subs += [sub for key in _IN_PLACE_LISTS for sub in _as_list(node.get(key))]
    for key in _IN_PLACE_MAPS:
        value = node.get(key)
        if isinstance(value, dict):
            for name, sub in value.items():
                if name not in names:
                    return False, touched
                if isinstance(sub, list):  # draft 7: "dependencies": {"a": ["b"]}
                    if not all(isinstance(n, str) and n in names for n in sub):
                        return False, touched
                else:
                    subs.append(sub)
    for sub in subs:
        if isinstance(sub, bool):
            continue
        if not isinstance(sub, dict) or sub.keys() & _SHAPING:
            return False, touched
        props = sub.get("properties", {})
        if not isinstance(props, dict) or not props.keys() <= names or not _required_within(sub, names):
            return False, touched
        touched |= props.keys()
        inner_neutral, inner = _neutral_in_place(sub, names)
        if not inner_neutral:
            return False, touched
        touched |= inner
    return True, touched


def _lists_its_keys(node: dict[str, Any], names: set[str]) -> bool:
    """Whether ``node`` can be closed without refusing what it demands: no keyword of its own
    already decides other keys, and every key it requires is among its ``properties``."""
    if node.keys() & {"additionalProperties", "patternProperties", "unevaluatedProperties", "const", "enum"}:
        return False
    min_properties = node.get("minProperties")
    if isinstance(min_properties, (int, float)) and min_properties > len(names):
        return False
    if not _required_within(node, names):
        return False
    dependent = node.get("dependentRequired")
    if isinstance(dependent, dict):
        for name, required in dependent.items():
            if name not in names or not all(isinstance(n, str) and n in names for n in _as_list(required)):
                return False
    return True


def _required_within(node: dict[str, Any], names: set[str]) -> bool:
    required = node.get("required", [])
    return isinstance(required, list) and all(isinstance(n, str) and n in names for n in required)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _pointer(ref: str) -> tuple[str, ...]:
    """``"#/$defs/a~1b"`` -> ``("$defs", "a/b")``: a local reference as the path ``walk`` tracks."""
    fragment = urllib.parse.unquote(ref[1:])
    if not fragment:
        return ()
    return tuple(part.replace("~1", "/").replace("~0", "~") for part in fragment.lstrip("/").split("/"))


def _has_key(value: Any, keys: frozenset[str]) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if item.keys() & keys:
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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
