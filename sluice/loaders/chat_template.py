"""Render a model's Jinja chat template into a prompt string, the way transformers does.

Chat templates come from the model file, so they are untrusted code: they run in an immutable
sandbox with the same globals, filters and hardening transformers gives them, so a template renders
byte-for-byte what `tokenizer.apply_chat_template(..., tokenize=False)` renders.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a model ships no template: ChatML, one `<|im_start|>{role}\n{content}<|im_end|>\n`
# block per message, then `<|im_start|>assistant\n` when a reply is wanted.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Stands in for message `i`'s content while finding where the template puts it: Unicode
# noncharacters, which are meant for such internal use and which no template writes.
_CONTENT_MARK = "\ufdd0{}\ufdd1"
_CONTENT_MARKS = re.compile("\ufdd0(\\d+)\ufdd1")

# Older names a message's reasoning arrives under; templates read `reasoning_content`, gpt-oss
# templates read `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str] | None = None,
    **kwargs: Any,
) -> str:
    """The prompt `template` makes of `messages`.

    `special_tokens` fills `bos_token`, `eos_token`, ... ; `kwargs` are further template variables
    (`tools`, `documents`, `enable_thinking`, ...) and override them. Raises ValueError if the
    template does not compile, or fails or calls `raise_exception` while rendering.
    """
    variables = {"tools": None, "documents": None, **(special_tokens or {}), **kwargs}
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=[_normalize_message(message) for message in messages],
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except jinja2.TemplateError as error:
        raise ValueError(f"chat template error: {error}") from error


def content_spans(
    template: str, messages: list[dict[str, Any]], rendered: str, **kwargs: Any
) -> list[tuple[int, int]] | None:
    """Where in `rendered` (what `render_chat_template(template, messages, **kwargs)` made) each
    message's content text lies, in order; None when the template does not copy contents as they
    are (it trims, splits or inspects them), so that they cannot be told apart from its own text.

    The template is rendered a second time with a mark in place of each content; putting the
    contents back where the marks are must give `rendered` exactly.
    """
    contents = [_normalize_message(message).get("content") for message in messages]
    marked = [
        {**message, "content": _CONTENT_MARK.format(index)} if isinstance(content, str) else message
        for index, (message, content) in enumerate(zip(messages, contents, strict=True))
    ]
    try:
        skeleton = render_chat_template(template, marked, **kwargs)
    except ValueError:  # the template refused a mark where it took the content
        return None
    pieces = _CONTENT_MARKS.split(skeleton)  # template text, index, template text, ...
    spans, rebuilt, position = [], [], 0
    for number, piece in enumerate(pieces):
        if number % 2 == 0:
            text = piece
        elif int(piece) < len(contents) and isinstance(contents[int(piece)], str):
            text = contents[int(piece)]
            spans.append((position, position + len(text)))
        else:  # a mark that came in some other field's text
            return None
        rebuilt.append(text)
        position += len(text)
    return spans if "".join(rebuilt) == rendered else None


def _normalize_message(message: dict[str, Any]) -> dict[str, Any]:
    # OpenAI clients send `content: null` (e.g. beside tool calls); templates handle a missing key,
    # but would render a None as the text "None".
    normalized = {key: value for key, value in message.items() if value is not None}
    if isinstance(normalized.get("content"), list):
        normalized["content"] = _flatten_content_parts(normalized["content"])
    reasoning = next((normalized[key] for key in _REASONING_FIELDS if key in normalized), None)
    if reasoning is not None:
        normalized = {"thinking": reasoning, **normalized, "reasoning_content": reasoning}
    return normalized


def _flatten_content_parts(parts: list[Any]) -> str:
    """OpenAI content parts to one string; text parts are joined by newlines, as vLLM does."""
    texts = []
    for part in parts:
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type != "text" or not isinstance(part.get("text"), str):
            raise ValueError(
                f"unsupported message content part {part!r}: only text parts are supported"
            )
        texts.append(part["text"])
    return "\n".join(texts)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _TemplateDict()
    environment.globals["namespace"] = _TemplateNamespace
    return environment.from_string(template)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes `<`, `>`, `&` and `'`, which would change tool schemas.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` without exposing the `dict` type to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """A Jinja namespace that refuses underscore-prefixed names, a way into CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        # Jinja's signature trick: `self` is positional-only so `namespace(self=...)` still works.
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes, got {name!r}"
            )
