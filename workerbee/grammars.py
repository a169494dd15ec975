"""GBNF grammars that constrain what the model may write: JSON output, and tool calls.

llama.cpp samples only tokens the grammar allows, so the output is valid by construction (unless
max_tokens cuts it short). Schemas are turned into GBNF by llama-cpp-python's port of llama.cpp's
json-schema-to-grammar converter.
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


class GrammarError(ValueError):
    """A schema that cannot be turned into a grammar; the message says why."""


def json_object_grammar() -> str:
    """Any JSON object."""
    from llama_cpp import llama_grammar

    return str(llama_grammar.JSON_GBNF)


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """JSON that matches `schema`. Raises GrammarError for schemas the converter does not support."""
    from llama_cpp import llama_grammar

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
                    "arguments": parameters_schema(tool),
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
