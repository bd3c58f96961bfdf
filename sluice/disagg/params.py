"""vLLM's `kv_transfer_params`, the one field a router passes between P and D.

A request to P carries `do_remote_decode: true`; P's response carries the params D needs (where
P is, which pages, the first token P sampled, the lease); the router copies them into the request
to D unchanged. Field names are vLLM's where vLLM has the field; sluice adds the token count, the
first token and its logprob, the lease's id and expiry, and the state slot of a hybrid model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sluice.engine.request import TokenLogprob
from sluice.sampling_params import InvalidParameterError

PARAM = "kv_transfer_params"


@dataclass(frozen=True)
class RemotePrefill:
    """What D needs to pull one prompt's KV (and state) from P: P's answer to `do_remote_decode`."""

    remote_engine_id: str
    remote_host: str
    remote_port: int
    remote_block_ids: list[int]  # P's pages, in order, covering `num_tokens`
    remote_request_id: str  # the lease on those pages
    num_tokens: int  # prompt tokens the pages hold
    first_token_id: int  # sampled on P
    lease_expires: float  # unix time after which P may reuse the pages
    first_token_logprob: dict[str, Any] | None = None  # TokenLogprob as a dict, when asked for
    remote_state_slot: int | None = None  # hybrid models: P's slot holding the prompt's state
    do_remote_decode: bool = False
    do_remote_prefill: bool = True

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def first_logprob(self) -> TokenLogprob | None:
        lp = self.first_token_logprob
        if lp is None:
            return None
        return TokenLogprob(lp["token_id"], lp["logprob"], [tuple(t) for t in lp["top"]])

    @property
    def side_channel(self) -> str:
        return f"http://{self.remote_host}:{self.remote_port}"

    def check_prompt(self, num_prompt_tokens: int) -> None:
        """InvalidParameterError when P computed another prompt than this request's."""
        if self.num_tokens != num_prompt_tokens:
            raise InvalidParameterError(
                PARAM,
                f"the prefill instance computed {self.num_tokens} prompt tokens, this request's "
                f"prompt has {num_prompt_tokens}: the two requests differ",
            )


class PendingPrefill:
    """P's params for a request D takes before P has them: sglang-router sends P and D the
    request at once, so D admits it (pages, state slot) while P computes. The server fills this
    in from P's bootstrap room on the event loop; the engine thread looks at it every step.

    It ends with a `RemotePrefill`, with None (P never answered: a failed transfer) or with an
    `error` (P's params cannot be used here: the request fails with it)."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.prefill: RemotePrefill | None = None
        self.error: InvalidParameterError | None = None
        self.done = False  # set last: once True, the other fields are final

    def resolve(
        self, prefill: RemotePrefill | None, error: InvalidParameterError | None = None
    ) -> None:
        if not self.done:
            self.prefill, self.error = prefill, error
            self.done = True


def logprob_json(logprob: TokenLogprob | None) -> dict[str, Any] | None:
    if logprob is None:
        return None
    return {"token_id": logprob.token_id, "logprob": logprob.logprob, "top": logprob.top}


@dataclass(frozen=True)
class TransferRequest:
    """A request's `kv_transfer_params`, read: either P is asked to keep the KV for a remote
    decode, or D is given a `RemotePrefill` to pull (or, under sglang-router, the promise of
    one: `pending`)."""

    remote_decode: bool = False
    remote_prefill: RemotePrefill | None = None
    room: int | None = None  # SGLang's bootstrap_room: where D asks P for the params
    pending: PendingPrefill | None = None

    @classmethod
    def parse(cls, value: object) -> TransferRequest | None:
        """None when the field is absent or asks for nothing; InvalidParameterError naming the
        field when it is malformed."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise InvalidParameterError(PARAM, f"{PARAM} must be an object")
        if value.get("do_remote_decode"):
            return cls(remote_decode=True)
        if value.get("remote_engine_id") is None:
            return None  # the router's template with nothing filled in
        try:
            fields = {name: value[name] for name in _REQUIRED}
            optional = {name: value[name] for name in _OPTIONAL if value.get(name) is not None}
            prefill = RemotePrefill(**fields, **optional)
        except KeyError as missing:
            raise InvalidParameterError(PARAM, f"{PARAM} lacks {missing.args[0]}") from None
        _check_types(prefill)
        return cls(remote_prefill=prefill)


_REQUIRED = (
    "remote_engine_id",
    "remote_host",
    "remote_port",
    "remote_block_ids",
    "remote_request_id",
    "num_tokens",
    "first_token_id",
    "lease_expires",
)
_OPTIONAL = ("first_token_logprob", "remote_state_slot")


def _check_types(prefill: RemotePrefill) -> None:
    ints = [prefill.remote_port, prefill.num_tokens, prefill.first_token_id]
    ids = prefill.remote_block_ids
    if not all(isinstance(v, int) for v in ints) or not (
        isinstance(ids, list) and all(isinstance(v, int) and v >= 0 for v in ids)
    ):
        raise InvalidParameterError(
            PARAM,
            f"{PARAM}: remote_port, num_tokens and first_token_id must be integers and "
            "remote_block_ids a list of page ids",
        )
    if not isinstance(prefill.lease_expires, (int, float)):
        raise InvalidParameterError(PARAM, f"{PARAM}: lease_expires must be a unix time")
