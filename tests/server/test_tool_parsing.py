"""Tool calls parsed from model output, whole and streamed; tools for templates without them."""

from __future__ import annotations

import json

import pytest

from sluice.loaders.chat_template import DEFAULT_CHAT_TEMPLATE
from sluice.sampling_params import InvalidParameterError
from sluice.server.tools import (
    CallStream,
    ToolChoice,
    constraint,
    messages_without_tool_support,
    parse_calls,
    template_takes_tools,
    tool_choice,
)

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
OUTPUT = (
    'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>\n'
    '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
)


def test_qwen3_style_calls_parse_with_the_text_before_them():
    content, calls = parse_calls(OUTPUT, ToolChoice("auto"))
    assert content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"x": 1}), ("g", {})]
    assert len({c.id for c in calls}) == 2


def test_text_that_is_not_a_call_stays_content():
    assert parse_calls("<tool_call>\nnot json\n</tool_call>", ToolChoice("auto"))[1] == []
    assert parse_calls(OUTPUT, ToolChoice("none")) == (OUTPUT, [])


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_pieces_give_the_same_content_and_calls(piece: int):
    stream, content, calls = CallStream(ToolChoice("auto")), "", []
    pieces = [OUTPUT[i : i + piece] for i in range(0, len(OUTPUT), piece)]
    for i, text in enumerate(pieces):
        new_content, new_calls = stream.feed(text, finished=i == len(pieces) - 1)
        content += new_content
        calls += new_calls
    assert "<tool_call>" not in content and content.strip() == "Let me look."
    assert [c.name for c in calls] == ["f", "g"] and stream.num_calls == 2


def test_required_and_named_constrain_to_the_schemas():
    named = constraint(tool_choice({"type": "function", "function": {"name": "f"}}, [TOOL]), [TOOL])
    assert json.loads(named.value) == {"type": "object"}
    required = json.loads(constraint(tool_choice("required", [TOOL]), [TOOL]).value)
    assert required["items"]["anyOf"][0]["properties"]["name"] == {"const": "f"}
    assert (
        parse_calls('[{"name": "f", "arguments": {"a": 2}}]', ToolChoice("required"))[1][
            0
        ].arguments
        == '{"a": 2}'
    )
    with pytest.raises(InvalidParameterError):
        tool_choice("required", None)


def test_templates_without_tools_get_the_default_prompt():
    assert not template_takes_tools(DEFAULT_CHAT_TEMPLATE)
    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "content": "42"},
    ]
    system, _, assistant, tool = messages_without_tool_support(history, [TOOL])
    assert system["role"] == "system" and json.dumps(TOOL) in system["content"]
    assert assistant["content"] == '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    assert tool == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    # What the model answers in that format parses back.
    assert parse_calls(assistant["content"], ToolChoice("auto"))[1][0].name == "f"
