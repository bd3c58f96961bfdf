"""The HTTP side of prefill/decode disaggregation and of the routers that drive it.

- The side channel: P serves its NIXL agent's metadata and cache layout at `/pd/nixl_metadata`;
  D fetches it once per P (`Peers`), checks the layouts agree, and from then on moves pages over
  NIXL alone (the pull's completion notifies P).
- What vllm-router, sglang-router and llm-d's endpoint picker read: `/server_info`,
  `/model_info`, `/get_load`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Request

from sluice.disagg.params import PendingPrefill, RemotePrefill, TransferRequest
from sluice.sampling_params import InvalidParameterError
from sluice.server.errors import APIError
from sluice.server.protocol import GenerationRequest

logger = logging.getLogger(__name__)

SIDE_CHANNEL_TIMEOUT_S = 5.0
ROOM_WAIT_S = 60.0  # how long P's side channel holds D's question while P prefills


async def read_transfer(server, body: GenerationRequest) -> TransferRequest | None:
    """A request's `kv_transfer_params` (vllm-router) or bootstrap room (sglang-router), with
    P's side channel read when D meets a new P. A P that cannot be reached is left out: D then
    computes the prompt itself (or fails the request: `--pd-on-transfer-failure error`)."""
    disagg = server.engine.engine.disagg
    if body.bootstrap_room is not None and disagg is not None:
        if disagg.is_prefill:
            return TransferRequest(remote_decode=True, room=body.bootstrap_room)
        return _await_room(disagg, body)
    transfer = TransferRequest.parse(body.kv_transfer_params)
    if transfer is not None and transfer.remote_prefill is not None:
        await _meet(disagg, transfer.remote_prefill)
    return transfer


async def _meet(disagg, prefill: RemotePrefill) -> None:
    """Read a new P's side channel; InvalidParameterError when its caches do not fit ours."""
    if disagg is None or prefill.remote_engine_id in disagg.peers:
        return
    metadata = await _get(f"{prefill.side_channel}/pd/nixl_metadata", SIDE_CHANNEL_TIMEOUT_S)
    if metadata is not None and metadata.get("engine_id") == prefill.remote_engine_id:
        disagg.add_peer(metadata)


_room_tasks: set[asyncio.Task] = set()  # running: the loop keeps only weak references


def _await_room(disagg, body: GenerationRequest) -> TransferRequest:
    """sglang-router sends P and D the request at once: D admits it now, while P computes, and
    its pull starts once P's side channel gives the room's params."""
    pending = PendingPrefill(body.bootstrap_room)
    task = asyncio.create_task(_fill(pending, disagg, body))
    _room_tasks.add(task)
    task.add_done_callback(_room_tasks.discard)
    return TransferRequest(room=body.bootstrap_room, pending=pending)


async def _fill(pending: PendingPrefill, disagg, body: GenerationRequest) -> None:
    url = f"http://{body.bootstrap_host}:{body.bootstrap_port}/pd/rooms/{body.bootstrap_room}"
    try:
        transfer = TransferRequest.parse(await _get(url, ROOM_WAIT_S + SIDE_CHANNEL_TIMEOUT_S))
        prefill = transfer.remote_prefill if transfer is not None else None
        if prefill is not None:
            await _meet(disagg, prefill)
        pending.resolve(prefill)
    except InvalidParameterError as error:
        pending.resolve(None, error)
    finally:
        pending.resolve(None)  # cancelled (shutdown): no params will come


async def _get(url: str, timeout: float) -> dict[str, Any] | None:
    try:
        async with httpx.AsyncClient(timeout=timeout) as client:
            reply = await client.get(url)
            reply.raise_for_status()
            return reply.json()
    except (httpx.HTTPError, ValueError) as error:
        logger.warning("prefill instance unreachable at %s: %s", url, error)
        return None


def _server(request: Request):
    return request.app.state.server


Server = Annotated[Any, Depends(_server)]

routes = APIRouter()


@routes.get("/pd/nixl_metadata", include_in_schema=False)
async def nixl_metadata(server: Server) -> dict[str, Any]:
    disagg = server.engine.engine.disagg
    if disagg is None:
        raise APIError(404, "this server is not a prefill or decode instance", code="not_found")
    return disagg.metadata()


@routes.get("/pd/rooms/{room}", include_in_schema=False)
async def room_params(room: int, server: Server) -> dict[str, Any]:
    """The params of a prefill sglang-router sent with `bootstrap_room`, once P has them."""
    disagg = server.engine.engine.disagg
    if disagg is None or not disagg.is_prefill:
        raise APIError(404, "this server is not a prefill instance", code="not_found")
    deadline = time.monotonic() + ROOM_WAIT_S
    while (params := disagg.rooms.pop(room, None)) is None:
        if time.monotonic() > deadline:
            raise APIError(404, f"no prefill for bootstrap room {room}", code="not_found")
        await asyncio.sleep(0.005)
    return params


@routes.get("/server_info")
async def server_info(server: Server) -> dict[str, Any]:
    engine = server.engine.engine
    disagg = engine.disagg
    return {
        "model": server.settings.model_name,
        "served_model_name": server.settings.model_name,
        "max_model_len": server.max_model_len,
        "disaggregation_mode": disagg.config.role if disagg is not None else "null",
        "page_size": engine.kv.page_size,
        "max_num_seqs": engine.scheduler.config.max_num_seqs,
        "max_num_batched_tokens": engine.scheduler.config.max_num_batched_tokens,
        "kv_engine_id": disagg.transport.engine_id if disagg is not None else None,
    }


@routes.get("/model_info")
async def model_info(server: Server) -> dict[str, Any]:
    config = server.engine.engine.model_config
    return {
        "model_path": server.settings.model_name,
        "served_model_name": server.settings.model_name,
        "architecture": config.architecture,
        "is_generation": True,
        "max_model_len": server.max_model_len,
    }


@routes.get("/get_load")
async def get_load(server: Server) -> dict[str, Any]:
    engine = server.engine.engine
    pool = engine.pool
    return {
        "load": engine.num_running + engine.num_waiting,
        "num_reqs": engine.num_running,
        "num_waiting_reqs": engine.num_waiting,
        "num_tokens": sum(r.num_tokens for r in list(engine.scheduler.running)),
        "kv_cache_usage": pool.num_used / pool.num_pages,
    }
