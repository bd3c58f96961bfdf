"""Tool calling through the official client, on a tiny random Qwen3 with Qwen3's tool template
and a byte-level tokenizer (so that constrained JSON can be spelled), built on the fly."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import transformers
from live_server import ServerProcess, start_server
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from sluice.bench.tiny_checkpoint import VOCAB_SIZE, make_tiny_checkpoint

pytestmark = pytest.mark.slow

TEMPLATE = (Path(__file__).parent.parent / "data" / "qwen3_tools.jinja").read_text()
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (2: the model's EOS)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                "unit": {"type": "string", "enum": ["C", "F"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "arguments": '{"city": "Paris", "unit": "C", "days": 1}',
                },
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    {"role": "user", "content": "And tomorrow?"},
]


def write_byte_level_tokenizer(folder: Path) -> None:
    """Every byte a token of its own (ids 3..258), after three special tokens."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({char: len(SPECIALS) + i for i, char in enumerate(sorted(alphabet))})
    assert len(vocab) <= VOCAB_SIZE
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen3-tools")
    # Byte-level tokens make the tool prompt ~960 tokens long: room for it and the answer.
    make_tiny_checkpoint("qwen3", folder, max_position_embeddings=2048)
    write_byte_level_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def tool_server(folder: Path) -> Iterator[ServerProcess]:
    process = start_server(folder / "serve.log", "--model", str(folder), "--max-model-len", "2048")
    yield process
    assert process.stop() == 0, process.log_tail()


def chat(server: ServerProcess, **kwargs):
    oai = server.openai()
    kwargs = {"max_tokens": 120, "temperature": 0, **kwargs}
    return oai.chat.completions.create(model=oai.models.list().data[0].id, **kwargs)


def test_a_conversation_with_tool_results_renders_as_transformers_does(tool_server, folder):
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    expected = reference.apply_chat_template(
        CONVERSATION, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    with tool_server.http() as http:
        got = http.post("/tokenize", json={"messages": CONVERSATION, "tools": TOOLS}).json()
    assert got["tokens"] == list(expected)
    assert chat(
        tool_server, messages=CONVERSATION, tools=TOOLS, max_tokens=1
    ).usage.prompt_tokens == len(expected)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_named_function_yields_calls_whose_arguments_validate(tool_server, temperature):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    completion = chat(
        tool_server,
        messages=CONVERSATION,
        tools=TOOLS,
        tool_choice=choice,
        temperature=temperature,
        seed=1,
        n=3,
    )
    for c in completion.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        [call] = c.message.tool_calls
        assert call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_required_yields_calls_of_the_tools(tool_server):
    completion = chat(tool_server, messages=CONVERSATION, tools=TOOLS, tool_choice="required")
    calls = completion.choices[0].message.tool_calls
    assert calls and completion.choices[0].finish_reason == "tool_calls"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_streamed_calls_equal_whole_ones(tool_server):
    choice = {"type": "function", "function": {"name": "get_time"}}
    whole = chat(tool_server, messages=CONVERSATION, tools=TOOLS, tool_choice=choice)
    stream = chat(tool_server, messages=CONVERSATION, tools=TOOLS, tool_choice=choice, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
        (0, "get_time", whole.choices[0].message.tool_calls[0].function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_bad_tool_choices_are_400s(tool_server):
    with pytest.raises(openai.BadRequestError) as bad:
        chat(
            tool_server,
            messages=CONVERSATION,
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert bad.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as bad:
        chat(tool_server, messages=CONVERSATION, tool_choice="required")
    assert bad.value.body["param"] == "tool_choice"
