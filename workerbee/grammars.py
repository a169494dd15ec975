"""GBNF grammars that constrain what the model may write: JSON output, and tool calls.

llama.cpp samples only tokens the grammar allows, so the output is valid by construction (unless
max_tokens cuts it short). Schemas are turned into GBNF by llama-cpp-python's port of llama.cpp's
json-schema-to-grammar converter.

The converter resolves `$ref`s poorly (pydantic's `#/$defs/...` fails, and a function's parameters
wrapped into a tool-call schema lose their root), so local references are inlined here first, at any
depth. A recursive model (a `Person` with an optional `boss: Person`) is unrolled RECURSION_DEPTH
levels; past that only the alternatives of an anyOf/oneOf that do not recurse remain (null, for an
optional field), and a recursion with no way out is a GrammarError.
"""

from __future__ import annotations

import json
import re
from typing import Any

from protocol.openai import ResponseFormat, Tool

# The converter's string characters admit raw control characters, which strict JSON parsers (Python's
# json.loads among them) refuse inside strings: allow only what JSON allows unescaped.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'

_ROOT_RULE = re.compile(r"^root ::= ", re.MULTILINE)

TOOL_CALL_RULE = "tool-call"

# A plain-text answer, told apart from a tool call by its first character: neither "{" nor blank.
_TEXT_OR_CALL = f"root ::= {TOOL_CALL_RULE} | text\ntext ::= [^{{ \\t\\r\\n] .*\n"


RECURSION_DEPTH = 3
"""How many times a recursive `$ref` is unrolled on one path."""


class GrammarError(ValueError):
    """A schema that cannot be turned into a grammar; the message says why."""


class _Cut(Exception):
    """A recursive reference unrolled as far as it goes."""


def inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with every local `$ref` (#/$defs/..., #/definitions/..., #) replaced by what it names."""
    root = schema

    def resolve(ref: str) -> Any:
        if not ref.startswith("#"):
            raise GrammarError(f"unsupported JSON schema: only local $ref is supported, not {ref!r}")
        target: Any = root
        for part in [p for p in ref[1:].split("/") if p]:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise GrammarError(f"unsupported JSON schema: $ref {ref!r} names nothing in the schema")
        return target

    def walk(node: Any, seen: tuple[str, ...]) -> Any:
        if isinstance(node, list):
            return [walk(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("$ref"), str):
            ref = node["$ref"]
            if seen.count(ref) >= RECURSION_DEPTH:
                raise _Cut
            target = resolve(ref)
            siblings = {
                key: value for key, value in node.items() if key not in {"$ref", "$defs", "definitions"}
            }
            merged = {**target, **siblings} if isinstance(target, dict) else target
            return walk(merged, (*seen, ref))
        result: dict[str, Any] = {}
        for key, value in node.items():
            if key in {"$defs", "definitions"}:
                continue  # inlined where used
            if key in {"anyOf", "oneOf"} and isinstance(value, list):
                kept = []
                for option in value:
                    try:
                        kept.append(walk(option, seen))
                    except _Cut:
                        continue
                if not kept:
                    raise _Cut
                result[key] = kept
            elif key in {"properties", "patternProperties", "dependentSchemas"} and isinstance(value, dict):
                result[key] = {name: walk(sub, seen) for name, sub in value.items()}
            else:
                result[key] = walk(value, seen)
        return result

    try:
        inlined: dict[str, Any] = walk(schema, ())
    except _Cut:
        raise GrammarError(
            f"unsupported JSON schema: a recursive $ref never ends (unrolled {RECURSION_DEPTH} times)"
        ) from None
    return inlined


def json_object_grammar() -> str:
    """Any JSON object."""
    from llama_cpp import llama_grammar

    return str(llama_grammar.JSON_GBNF)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """JSON that matches `schema`. Raises GrammarError for schemas the converter does not support."""
    from llama_cpp import llama_grammar

    schema = inline_refs(schema)
    try:
        grammar = str(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises bare Exception, AssertionError, KeyError...
        raise GrammarError(f"unsupported JSON schema: {exc or exc.__class__.__name__}") from None
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar a response_format asks for, or None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_object_grammar()
    schema = response_format.json_schema.schema_
    return json_schema_grammar(schema) if schema else json_object_grammar()


def parameters_schema(tool: Tool) -> dict[str, Any]:
    """The JSON schema of a function's arguments (any object if the function declares none)."""
    return tool.function.parameters or {"type": "object"}


def tool_call_schema(tools: list[Tool]) -> dict[str, Any]:
    """A JSON schema for one call of one of `tools`: {"name": ..., "arguments": {...}}."""
    return {
        "oneOf": [
            {
                "type": "object",
                "properties": {
                    "name": {"const": tool.function.name},
                    # Each function's references resolved inside it: the wrapper is a new root.
                    "arguments": inline_refs(parameters_schema(tool)),
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for tool in tools
        ]
    }


def tool_grammar(tools: list[Tool], mode: str) -> str | None:
    """The grammar for a tool_choice mode: none, auto (text or a call), required, or a function's name."""
    if mode == "none":
        return None
    allowed = tools if mode in {"auto", "required"} else [t for t in tools if t.function.name == mode]
    call = json_schema_grammar(tool_call_schema(allowed))
    if mode != "auto":
        return call
    return _ROOT_RULE.sub(f"{TOOL_CALL_RULE} ::= ", call, count=1) + "\n" + _TEXT_OR_CALL
