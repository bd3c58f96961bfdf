"""An engine's part in prefill/decode disaggregation: `--role prefill` keeps finished prompts'
KV under leases (`LeaseTable`), `--role decode` pulls it (`PullQueue`); both register their
caches with one `KVTransport`. The engine calls in at the points of a request's life that
matter: added, every step, finished."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sluice.disagg.decode import ON_FAILURE, PullNews, PullQueue
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
    on_transfer_failure: str = "recompute"  # D: or "error": the request fails, cleanly
    inject_transfer_error_rate: float = 0.0  # D: this fraction of pulls fails (fault tests)
    # P, for fault tests: serve no pull for this long after granting a lease (a kill then
    # lands mid-transfer).
    inject_serve_stall_seconds: float = 0.0
    poll_seconds: float = 0.01  # how often an idle engine looks for notifications and expiries

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.on_transfer_failure not in ON_FAILURE:
            raise ValueError(
                f"on a transfer failure, {' or '.join(ON_FAILURE)}; got {self.on_transfer_failure!r}"
            )
        if not 0.0 <= self.inject_transfer_error_rate <= 1.0:
            raise ValueError("the injected transfer error rate must be in [0, 1]")
        if self.lease_seconds <= 0:
            raise ValueError("the lease must last more than 0 seconds")


class Disaggregation:
    def __init__(self, config: DisaggConfig, engine) -> None:
        self.config = config
        self.engine = engine
        runner = engine.executor
        self.transport: KVTransport = NixlTransport(background=self.is_prefill)
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
            on_failure=config.on_transfer_failure,
        )
        self.peers: dict[str, dict[str, Any]] = {}  # engine id -> its side channel's metadata
        # P, driven by sglang-router: bootstrap room -> the params D fetches (`/pd/rooms/N`).
        self.rooms: dict[int, dict[str, Any]] = {}
        self.num_released = 0  # leases D confirmed
        self._stalled_until = 0.0  # P: serves no pull before (`inject_serve_stall_seconds`)
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
        busy = self.leases.num_leases or self.pulls.is_busy
        return self.config.poll_seconds if busy else None

    def poll(self) -> PullNews:
        """P: release the leases D confirmed, expire the rest. D: move the pulls on."""
        # Reading notifications progresses the transport: while it stalls, P serves no pull.
        stalled = time.monotonic() < self._stalled_until
        if not stalled:
            for message in self.transport.notifications():
                self.num_released += self.leases.release(message.decode())
        self.leases.expire()
        self.transport.serve_in_background(self.leases.num_leases > 0 and not stalled)
        if self.engine.scheduler.pulling or self.pulls.num_in_flight:
            return self.pulls.advance(self.peers)
        return PullNews()

    def wait(self) -> None:
        """Nothing to compute but pulls in flight (or P's params to come): do not spin the
        core they share."""
        if self.pulls.num_in_flight or self.engine.scheduler.pulling:
            time.sleep(0.001)

    def finished(self, request: Request, first_logprob: TokenLogprob | None) -> dict | None:
        """A request ended. P: lease its held KV and return the params for D. D: free what an
        aborted pull still holds, or tell P a lease is not needed."""
        if request.pulls_prompt:
            self.pulls.ended(request, self.peers)
            return None
        held = request.held
        if held is None:
            return None
        request.held = None
        lease = self.leases.grant(held.page_ids, held.state_slot)
        if self.config.inject_serve_stall_seconds:
            self._stalled_until = time.monotonic() + self.config.inject_serve_stall_seconds
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
