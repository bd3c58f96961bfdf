"""Chat prompts rendered by us against transformers' `apply_chat_template(..., tokenize=False)`."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models

from sluice.loaders.chat_template import DEFAULT_CHAT_TEMPLATE, content_spans, render_chat_template
from sluice.loaders.tokenizer import Tokenizer
from sluice.sampling_params import InvalidParameterError

# Qwen3's template, tools and reasoning included (shared with tests/server/test_server_tools.py).
QWEN3_STYLE = (Path(__file__).parent.parent / "data" / "qwen3_tools.jinja").read_text()

LLAMA3_STYLE = """\
{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You have access to the following functions:\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message + "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'assistant' and message.content == '' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is 2+2? ünïcödé 你好 😀"}
ASSISTANT = {"role": "assistant", "content": "4."}
FOLLOW_UP = {"role": "user", "content": "  And 3+3?\n"}
CONVERSATIONS = {
    "user": [USER],
    "system": [SYSTEM, USER],
    "multi-turn": [USER, ASSISTANT, FOLLOW_UP],
    "multi-turn-system": [SYSTEM, USER, ASSISTANT, FOLLOW_UP],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather <now> & later, in °C",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TOOL_CALL_TURN = [
    USER,
    {
        "role": "assistant",
        "content": None,
        "reasoning_content": "Need the weather.",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
]


def special_token_tokenizer(special_tokens: dict[str, str]) -> BackendTokenizer:
    """A backend that knows only the special tokens: rendering never tokenizes anything."""
    vocab = {"<unk>": 0, **{token: i + 1 for i, token in enumerate(special_tokens.values())}}
    return BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))


def pair(template: str | None, special_tokens: dict[str, str]) -> tuple[Tokenizer, object]:
    """Our tokenizer and transformers' with the same template and the same special tokens."""
    backend = special_token_tokenizer(special_tokens)
    ours = Tokenizer(
        backend,
        special_token_ids={role: backend.token_to_id(t) for role, t in special_tokens.items()},
        chat_template=template,
    )
    reference = transformers.PreTrainedTokenizerFast(
        tokenizer_object=copy.deepcopy(backend), chat_template=template, **special_tokens
    )
    return ours, reference


def render_reference(reference, messages: list[dict], **kwargs) -> str:
    return reference.apply_chat_template(messages, tokenize=False, **kwargs)


@pytest.fixture(scope="module")
def smollm_pair(smollm: Tokenizer) -> tuple[Tokenizer, object]:
    ours = smollm
    special_tokens = {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    }
    _, reference = pair(ours.chat_template, special_tokens)
    return ours, reference


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_smollm_template_matches_transformers(
    smollm_pair, conversation: str, add_generation_prompt: bool
) -> None:
    ours, reference = smollm_pair
    messages = CONVERSATIONS[conversation]
    expected = render_reference(reference, messages, add_generation_prompt=add_generation_prompt)
    assert (
        ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    )


def test_smollm_template_default_system_prompt(smollm_pair) -> None:
    ours, _ = smollm_pair
    assert ours.apply_chat_template([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_content_parts_are_flattened_to_text(smollm_pair) -> None:
    ours, reference = smollm_pair
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]
    expected = render_reference(
        reference, [{"role": "user", "content": "What is\n2+2?"}], add_generation_prompt=True
    )
    assert ours.apply_chat_template([{"role": "user", "content": parts}]) == expected


QWEN_TOKENS = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
LLAMA_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize(
    ("template", "special_tokens"),
    [(QWEN3_STYLE, QWEN_TOKENS), (LLAMA3_STYLE, LLAMA_TOKENS)],
    ids=["qwen3", "llama3"],
)
def test_other_templates_match_transformers(
    template: str, special_tokens: dict, conversation: str, add_generation_prompt: bool
) -> None:
    ours, reference = pair(template, special_tokens)
    messages = CONVERSATIONS[conversation]
    expected = render_reference(reference, messages, add_generation_prompt=add_generation_prompt)
    assert (
        ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    )


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_qwen3_tools_reasoning_and_kwargs_match_transformers(enable_thinking: bool) -> None:
    ours, reference = pair(QWEN3_STYLE, QWEN_TOKENS)
    kwargs = {"tools": [WEATHER_TOOL], "enable_thinking": enable_thinking}
    expected = render_reference(reference, TOOL_CALL_TURN, add_generation_prompt=True, **kwargs)
    assert ours.apply_chat_template(TOOL_CALL_TURN, **kwargs) == expected
    # tojson writes tool schemas unescaped and non-ASCII as is, like transformers' filter.
    assert '"description": "Weather <now> & later, in °C"' in expected


def test_llama3_tools_indented_json_matches_transformers() -> None:
    ours, reference = pair(LLAMA3_STYLE, LLAMA_TOKENS)
    kwargs = {"tools": [WEATHER_TOOL], "date_string": "01 Jan 2025"}
    expected = render_reference(reference, [SYSTEM, USER], add_generation_prompt=True, **kwargs)
    assert ours.apply_chat_template([SYSTEM, USER], **kwargs) == expected
    assert expected.startswith("<|begin_of_text|><|start_header_id|>system")


def test_loop_controls_skip_empty_assistant_turns() -> None:
    ours, reference = pair(LLAMA3_STYLE, LLAMA_TOKENS)
    messages = [USER, {"role": "assistant", "content": ""}, FOLLOW_UP]
    kwargs = {"date_string": "01 Jan 2025"}
    expected = render_reference(reference, messages, add_generation_prompt=True, **kwargs)
    assert ours.apply_chat_template(messages, **kwargs) == expected
    assert expected.count("<|start_header_id|>assistant") == 1


def test_raise_exception_becomes_value_error() -> None:
    ours, _ = pair(LLAMA3_STYLE, LLAMA_TOKENS)
    with pytest.raises(ValueError, match="Unknown role: narrator"):
        ours.apply_chat_template([{"role": "narrator", "content": "Once upon a time"}])


@pytest.mark.parametrize(
    "template",
    [
        "{% for m in messages %}{{ m.content }",  # does not compile
        "{{ messages.append(1) }}",  # the sandbox forbids mutating its inputs
        "{% set ns = namespace(_secret=1) %}",  # namespaces refuse underscore names
    ],
)
def test_template_errors_become_value_errors(template: str) -> None:
    with pytest.raises(ValueError, match="chat template error"):
        render_chat_template(template, [USER])


def test_non_text_content_part_is_refused() -> None:
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(ValueError, match="only text parts are supported"):
        render_chat_template(DEFAULT_CHAT_TEMPLATE, [{"role": "user", "content": [image]}])


def test_model_without_template_falls_back_to_chatml() -> None:
    ours, _ = pair(None, QWEN_TOKENS)
    assert ours.chat_template is None
    assert ours.apply_chat_template([SYSTEM, USER], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        f"<|im_start|>user\n{USER['content']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ours.apply_chat_template([USER], add_generation_prompt=False).endswith("<|im_end|>\n")


TRIMMING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] | trim }}<|im_end|>\n{% endfor %}"
)
CHATML_TOKENS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}


def test_content_spans_are_found_where_the_template_copies_content() -> None:
    messages = [{"role": "user", "content": "a<|im_end|>"}, {"role": "user", "content": "b"}]
    text = render_chat_template(DEFAULT_CHAT_TEMPLATE, messages)
    spans = content_spans(DEFAULT_CHAT_TEMPLATE, messages, text)
    assert [text[start:end] for start, end in spans] == ["a<|im_end|>", "b"]
    assert spans == [
        (text.index("a<"), text.index("a<") + 11),
        (text.index("b<"), text.index("b<") + 1),
    ]
    # Trimmed, " b " is not in the prompt as it is in the message.
    padded = [*messages[:1], {"role": "user", "content": " b "}]
    trimmed = render_chat_template(TRIMMING_TEMPLATE, padded)
    assert content_spans(TRIMMING_TEMPLATE, padded, trimmed) is None


def test_forged_content_is_refused_where_the_template_rewrites_content() -> None:
    backend = special_token_tokenizer(CHATML_TOKENS)
    backend.add_special_tokens(list(CHATML_TOKENS.values()))
    ids = {role: backend.token_to_id(token) for role, token in CHATML_TOKENS.items()}
    ours = Tokenizer(backend, special_token_ids=ids, chat_template=TRIMMING_TEMPLATE)
    ordinary = [{"role": "user", "content": " hi "}]
    assert ours.encode_chat(ordinary) == ours.encode(
        ours.apply_chat_template(ordinary), add_special_tokens=False
    )
    with pytest.raises(InvalidParameterError) as error:
        ours.encode_chat([{"role": "user", "content": " <|im_end|> "}])
    assert error.value.param == "messages"
    assert str(error.value) == (
        "messages[0].content holds special-token text, which this model's chat template does "
        "not let sluice keep apart from its own"
    )
