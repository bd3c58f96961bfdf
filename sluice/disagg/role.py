"""An engine's part in prefill/decode disaggregation: `--role prefill` keeps finished prompts'
KV under leases (`LeaseTable`), `--role decode` pulls it (`PullQueue`); both register their
caches with one `KVTransport`. The engine calls in at the points of a request's life that
matter: added, every step, finished."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sluice.disagg.decode import PullQueue
from sluice.disagg.leases import LeaseTable
from sluice.disagg.params import RemotePrefill, logprob_json
from sluice.disagg.transport import CacheLayout, KVTransport, NixlTransport
from sluice.engine.request import Request, TokenLogprob
from sluice.sampling_params import InvalidParameterError

logger = logging.getLogger(__name__)

ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class DisaggConfig:
    role: str = "both"
    host: str = "127.0.0.1"  # where D reaches this P's side channel (its HTTP server)
    port: int = 8000
    model_name: str = ""  # both sides must serve the same model
    lease_seconds: float = 30.0
    inject_transfer_error_rate: float = 0.0  # D: this fraction of pulls fails (fault tests)
    poll_seconds: float = 0.01  # how often an idle engine looks for notifications and expiries

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not 0.0 <= self.inject_transfer_error_rate <= 1.0:
            raise ValueError("the injected transfer error rate must be in [0, 1]")
        if self.lease_seconds <= 0:
            raise ValueError("the lease must last more than 0 seconds")


class Disaggregation:
    def __init__(self, config: DisaggConfig, engine) -> None:
        self.config = config
        self.engine = engine
        runner = engine.executor
        self.transport: KVTransport = NixlTransport()
        self.layout = CacheLayout.of(config.model_name, runner.kv_cache, runner.state_cache)
        self.transport.register(self.layout, runner.kv_cache, runner.state_cache)
        # Read here, on the engine thread: the side channel serves it from the event loop.
        self._metadata = self.transport.metadata()
        self.leases = LeaseTable(engine.kv, config.lease_seconds)
        kv = runner.kv_cache
        page_bytes = 2 * kv.num_layers * kv.k[0][0].numel() * kv.k[0].element_size()
        self.pulls = PullQueue(
            self.transport,
            engine.kv,
            engine.scheduler,
            page_bytes,
            config.inject_transfer_error_rate,
        )
        self.peers: dict[str, dict[str, Any]] = {}  # engine id -> its side channel's metadata
        # P, driven by sglang-router: bootstrap room -> the params D fetches (`/pd/rooms/N`).
        self.rooms: dict[int, dict[str, Any]] = {}
        self.num_released = 0  # leases D confirmed
        logger.info("disaggregation: role %s, NIXL agent %s", config.role, self.transport.engine_id)

    @property
    def is_prefill(self) -> bool:
        return self.config.role == "prefill"

    @property
    def is_decode(self) -> bool:
        return self.config.role == "decode"

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def add_peer(self, metadata: dict[str, Any]) -> None:
        """Remember a P (from its side channel); InvalidParameterError when its caches cannot be
        read into ours."""
        why = self.layout.disagreement(CacheLayout.from_json(metadata["layout"]))
        if why is not None:
            raise InvalidParameterError("kv_transfer_params", why)
        self.peers[metadata["engine_id"]] = metadata

    @property
    def idle_poll_seconds(self) -> float | None:
        """How long an idle engine may wait before `poll` has work: None when never."""
        busy = self.leases.num_leases or self.pulls.num_in_flight
        return self.config.poll_seconds if busy else None

    def poll(self) -> None:
        """P: release the leases D confirmed, expire the rest. D: move the pulls on."""
        for message in self.transport.notifications():
            self.num_released += self.leases.release(message.decode())
        self.leases.expire()
        if self.engine.scheduler.pulling or self.pulls.num_in_flight:
            self.pulls.advance(self.peers)

    def wait(self) -> None:
        """Nothing to compute but pulls in flight: do not spin the core the pull shares."""
        if self.pulls.num_in_flight:
            time.sleep(0.001)

    def finished(self, request: Request, first_logprob: TokenLogprob | None) -> dict | None:
        """A request ended. P: lease its held KV and return the params for D. D: free what an
        aborted pull still holds, or tell P a lease is not needed."""
        if request.remote_prefill is not None:
            if request.held is not None:
                self.pulls.abandon(request)
            else:
                self.pulls.release_unused(request.remote_prefill, self.peers)
            return None
        held = request.held
        if held is None:
            return None
        request.held = None
        lease = self.leases.grant(held.page_ids, held.state_slot)
        params = RemotePrefill(
            remote_engine_id=self.transport.engine_id,
            remote_host=self.config.host,
            remote_port=self.config.port,
            remote_block_ids=held.page_ids,
            remote_request_id=lease.lease_id,
            num_tokens=request.num_prompt_tokens,
            first_token_id=request.output_token_ids[0],
            lease_expires=lease.expires,
            first_token_logprob=logprob_json(first_logprob),
            remote_state_slot=held.state_slot,
        ).to_json()
        if request.room is not None:
            self._post_room(request.room, params)
        return params

    def _post_room(self, room: int, params: dict[str, Any]) -> None:
        """Keep the params for D to fetch; rooms whose lease is over are dropped."""
        now = time.time()
        for stale in [r for r, p in self.rooms.items() if p["lease_expires"] <= now]:
            del self.rooms[stale]
        self.rooms[room] = params
