"""Tool calling: tools offered to the model, the output they constrain, the calls parsed back.

The model writes calls the way Qwen3 and Hermes templates teach it, one block per call:
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. A chat template that takes
`tools` renders them itself; for one that does not, `DEFAULT_TOOL_PROMPT` goes in a system
message (the documented default) and tool results and past calls are written as text in that
same format. With `tool_choice` `required` or a named function the output is constrained, as
vLLM does: a named function's output is its arguments (a JSON object of its schema), a required
call's a JSON list of `{"name", "arguments"}` objects, one of the tools each.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from sluice.sampling_params import InvalidParameterError
from sluice.structured.spec import StructuredOutput

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"

DEFAULT_TOOL_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # JSON text, as OpenAI's `function.arguments`
    id: str


@dataclass(frozen=True)
class ToolChoice:
    """`mode`: none, auto, required or named (then `name` says which function)."""

    mode: str
    name: str | None = None


NO_TOOLS = ToolChoice("none")


def tool_choice(
    choice: str | dict[str, Any] | None, tools: list[dict[str, Any]] | None
) -> ToolChoice:
    """The request's tool_choice, checked against its tools (InvalidParameterError naming it)."""
    names = function_names(tools)
    if choice is None:
        return ToolChoice("auto" if names else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidParameterError(
                "tool_choice",
                f"tool_choice must be none, auto, required or a function, got {choice!r}",
            )
        if choice != "none" and not names:
            raise InvalidParameterError("tool_choice", f"tool_choice {choice!r} needs `tools`")
        return ToolChoice(choice)
    name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" else None
    if name not in names:
        raise InvalidParameterError(
            "tool_choice", f"tool_choice names function {name!r}, which is not among the tools"
        )
    return ToolChoice("named", name)


def function_names(tools: list[dict[str, Any]] | None) -> list[str]:
    names = []
    for index, tool in enumerate(tools or []):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, dict):
            raise InvalidParameterError(
                f"tools[{index}]", f"tools[{index}] must be {{'type': 'function', 'function': ...}}"
            )
        if not isinstance(function.get("name"), str):
            raise InvalidParameterError(f"tools[{index}].function.name", "a function needs a name")
        names.append(function["name"])
    return names


def constraint(choice: ToolChoice, tools: list[dict[str, Any]] | None) -> StructuredOutput | None:
    """The output constraint `required` and named functions impose; None for none and auto."""
    schemas = {t["function"]["name"]: _parameters(t["function"]) for t in tools or []}
    if choice.mode == "named":
        return StructuredOutput("json_schema", json.dumps(schemas[choice.name]), "tools")
    if choice.mode != "required":
        return None
    call = [
        {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": schema},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for name, schema in schemas.items()
    ]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": call}}
    return StructuredOutput("json_schema", json.dumps(schema), "tools")


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def template_takes_tools(template: str) -> bool:
    return "tools" in template


def messages_without_tool_support(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """`messages` for a template that knows no tools: the tools described in the first system
    message, past calls and results written out as text."""
    written = [_as_text(message) for message in messages]
    if not tools:
        return written
    prompt = DEFAULT_TOOL_PROMPT.format(tools="\n".join(json.dumps(t) for t in tools))
    if written and written[0]["role"] == "system":
        return [{**written[0], "content": f"{written[0]['content']}\n\n{prompt}"}, *written[1:]]
    return [{"role": "system", "content": prompt}, *written]


def _as_text(message: dict[str, Any]) -> dict[str, Any]:
    if message["role"] == "tool":
        return {
            "role": "user",
            "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>",
        }
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not calls:
        return message
    blocks = [
        f"{CALL_OPEN}\n"
        + json.dumps(
            {"name": c["function"]["name"], "arguments": _loaded(c["function"].get("arguments"))}
        )
        + f"\n{CALL_CLOSE}"
        for c in calls
    ]
    text = "\n".join([message.get("content") or "", *blocks]).lstrip("\n")
    return {"role": "assistant", "content": text}


def _loaded(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def parse_calls(text: str, choice: ToolChoice) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) of a finished output. Text that does not parse as a call stays content."""
    if choice.mode == "named":
        return None, [_call(choice.name, text)]
    if choice.mode == "required":
        try:
            return None, [_call(c["name"], json.dumps(c["arguments"])) for c in json.loads(text)]
        except (json.JSONDecodeError, TypeError, KeyError):  # cut short by max_tokens
            return text, []
    if choice.mode == "none" or CALL_OPEN not in text:
        return text, []
    content, calls = text[: text.index(CALL_OPEN)], []
    for block in text[len(content) :].split(CALL_OPEN)[1:]:
        body = block.split(CALL_CLOSE)[0].strip()
        try:
            call = json.loads(body)
            calls.append(_call(call["name"], json.dumps(call.get("arguments", {}))))
        except (json.JSONDecodeError, TypeError, KeyError):
            return text, []
    return content.strip() or None, calls


def _call(name: str, arguments: str) -> ParsedCall:
    return ParsedCall(name, arguments, f"call_{uuid.uuid4().hex[:24]}")


class CallStream:
    """One streamed choice's text turned into content deltas and whole tool calls: text after
    `<tool_call>` is held back until its call closes (or the output ends)."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self._held = ""
        self.num_calls = 0

    def feed(self, text: str, finished: bool) -> tuple[str, list[ParsedCall]]:
        """(content to send now, calls completed by this text)."""
        self._held += text
        if self.choice.mode in ("named", "required"):
            if not finished:
                return "", []
            content, calls = parse_calls(self._held, self.choice)
            content = content or ""
        elif self.choice.mode == "none":
            content, calls, self._held = self._held, [], ""
        else:
            content, calls = self._split(finished)
        self.num_calls += len(calls)
        return content, calls

    def _split(self, finished: bool) -> tuple[str, list[ParsedCall]]:
        start = self._held.find(CALL_OPEN)
        if start < 0:
            # A partial `<tool_call>` at the end may still become one: keep it back.
            keep = _partial_suffix(self._held, CALL_OPEN) if not finished else 0
            sent, self._held = (
                self._held[: len(self._held) - keep],
                self._held[len(self._held) - keep :],
            )
            return sent, []
        content = self._held[:start]
        end = self._held.find(CALL_CLOSE, start)
        if end < 0 and not finished:
            self._held = self._held[start:]
            return content, []
        block_end = len(self._held) if end < 0 else end + len(CALL_CLOSE)
        block, self._held = self._held[start:block_end], self._held[block_end:]
        rest, calls = parse_calls(block, self.choice)
        more_content, more_calls = self._split(finished)
        return content + (rest or "") + more_content, calls + more_calls


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that begins `marker`."""
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0
