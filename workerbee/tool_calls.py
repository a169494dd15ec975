"""Tool calling on top of a GGUF chat template: tools into the prompt, calls out of the answer.

Templates written for tool use (they mention `tools`) get the tools and the conversation's earlier calls
as they expect them. For the others, the tools are described in the system message, earlier calls are
written into the assistant's text, and tool results become user messages (the role every template
knows). Either way the model answers a call as one JSON object, {"name": ..., "arguments": {...}},
which a grammar enforces (see grammars.py) and `ToolCallParser` turns into OpenAI's `tool_calls`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from protocol.openai import ChatMessage, Tool
from workerbee.grammars import parameters_schema


def new_call_id() -> str:
    """An id for a tool call, in OpenAI's style."""
    return f"call_{uuid.uuid4().hex[:24]}"


def template_knows_tools(template: str) -> bool:
    """Whether a chat template renders `tools` itself (Llama 3.1, Qwen 2.5, Hermes, Mistral...)."""
    return "tools" in template


def _arguments_value(arguments: str) -> Any:
    # Templates expect arguments as an object (the Hugging Face convention); OpenAI sends a string.
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def tools_instruction(tools: list[Tool], mode: str) -> str:
    """The system-prompt text that tells a model without tool support about the tools."""
    described = [
        {
            "name": tool.function.name,
            **({"description": tool.function.description} if tool.function.description else {}),
            "parameters": parameters_schema(tool),
        }
        for tool in tools
    ]
    if mode == "auto":
        rule = "Call a function only if it helps to answer; otherwise answer in plain text."
    elif mode == "required":
        rule = "You must call one of these functions."
    else:
        rule = f"You must call the function {mode}."
    return (
        "You can call these functions:\n"
        + json.dumps(described, ensure_ascii=False)
        + '\nTo call a function, answer with only a JSON object: {"name": <function name>, '
        '"arguments": <an object of arguments that matches its parameters>}. ' + rule
    )


def llama_messages(
    messages: list[ChatMessage], *, tools: list[Tool] | None, mode: str, native_tools: bool
) -> list[dict[str, Any]]:
    """The conversation as the chat template receives it, with the tools worked in as described above."""
    names: dict[str, str] = {}
    converted: list[dict[str, Any]] = []
    for message in messages:
        # Chat templates know system but rarely developer, OpenAI's newer name for the same role.
        role = "system" if message.role == "developer" else message.role
        item: dict[str, Any] = {"role": role, "content": message.text()}
        if message.name is not None:
            item["name"] = message.name
        for call in message.tool_calls or ():
            names[call.id] = call.function.name
        if native_tools:
            if message.tool_calls:
                item["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.function.name,
                            "arguments": _arguments_value(call.function.arguments),
                        },
                    }
                    for call in message.tool_calls
                ]
            if message.tool_call_id is not None:
                item["tool_call_id"] = message.tool_call_id
                item.setdefault("name", names.get(message.tool_call_id, ""))
        elif message.tool_calls:
            calls = "\n".join(
                json.dumps(
                    {"name": call.function.name, "arguments": _arguments_value(call.function.arguments)},
                    ensure_ascii=False,
                )
                for call in message.tool_calls
            )
            item["content"] = f"{item['content']}\n{calls}" if item["content"] else calls
        elif message.role == "tool":
            name = names.get(message.tool_call_id or "", "the function")
            item = {
                "role": "user",
                "content": f"Result of {name} (call {message.tool_call_id}):\n{item['content']}",
            }
        converted.append(item)
    if tools and mode != "none" and not native_tools:
        instruction = tools_instruction(tools, mode)
        if converted and converted[0]["role"] == "system":
            converted[0] = {**converted[0], "content": f"{converted[0]['content']}\n\n{instruction}"}
        else:
            converted.insert(0, {"role": "system", "content": instruction})
    return converted


# What precedes the arguments in a call the grammar allows: {"name": "...", "arguments": <arguments>}.
_CALL_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = " \t\r\n}"


@dataclass
class ToolCallParser:
    """Reads a tool call as it is generated, giving OpenAI's `tool_calls` deltas as soon as they are known.

    The arguments are passed on as the model writes them, but for a trailing run of blanks and braces,
    held back because the last brace closes the call object rather than the arguments.
    """

    call_id: str = field(default_factory=new_call_id)
    text: str = field(default="", init=False)
    name: str | None = field(default=None, init=False)
    _arguments_at: int = field(default=0, init=False)
    _sent: int = field(default=0, init=False)

    def feed(self, text: str) -> list[dict[str, Any]]:
        """Take more of the model's text; returns the deltas (items of delta.tool_calls) it completes."""
        self.text += text
        delta: dict[str, Any] = {"index": 0}
        if self.name is None:
            header = _CALL_HEADER.match(self.text)
            if header is None:
                return []
            self.name = json.loads(f'"{header.group(1)}"')
            self._arguments_at = header.end()
            delta.update(id=self.call_id, type="function", function={"name": self.name, "arguments": ""})
        arguments = self.text[self._arguments_at :]
        ready = len(arguments.rstrip(_TAIL))
        if ready > self._sent:
            delta.setdefault("function", {})["arguments"] = arguments[self._sent : ready]
            self._sent = ready
        return [delta] if "function" in delta else []

    def arguments(self) -> str | None:
        """The arguments as a JSON text, once the whole call has been read; None if it is not a valid call."""
        try:
            call = json.loads(self.text)
        except json.JSONDecodeError:
            return None
        if self.name is None or not isinstance(call, dict) or not isinstance(call.get("arguments"), dict):
            return None
        end = self.text.rstrip()
        # The call object's closing brace, and the blanks before it, are not part of the arguments.
        arguments = end[self._arguments_at : -1].rstrip()
        return arguments if json.loads(arguments) == call["arguments"] else None

    def finish(self) -> list[dict[str, Any]]:
        """The deltas that complete a valid call (the held-back end of its arguments)."""
        arguments = self.arguments()
        if arguments is None or len(arguments) <= self._sent:
            return []
        delta = {"index": 0, "function": {"arguments": arguments[self._sent :]}}
        self._sent = len(arguments)
        return [delta]

    def tool_call(self) -> dict[str, Any] | None:
        """The whole call in OpenAI's message shape, or None if the text is not a valid call."""
        arguments = self.arguments()
        if arguments is None or self.name is None:
            return None
        return {
            "id": self.call_id,
            "type": "function",
            "function": {"name": self.name, "arguments": arguments},
        }
