"""What a request's output must match, as the client said it; plain data, no grammar engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ConstraintKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutput:
    """`value`: the JSON schema (as JSON text), the regex, the choices (a JSON list of strings)
    or the EBNF grammar; empty for `json_object`. `param` names the request field it came from,
    for errors. Frozen and hashable: compiled grammars are cached by it."""

    kind: ConstraintKind
    value: str = ""
    param: str = "structured_outputs"
