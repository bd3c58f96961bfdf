"""The HTTP side of prefill/decode disaggregation and of the routers that drive it.

- The side channel: P serves its NIXL agent's metadata and cache layout at `/pd/nixl_metadata`;
  D fetches it once per P (`Peers`), checks the layouts agree, and from then on moves pages over
  NIXL alone (the pull's completion notifies P).
- What vllm-router, sglang-router and llm-d's endpoint picker read: `/server_info`,
  `/model_info`, `/get_load`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import httpx
from fastapi import APIRouter, Depends, Request

from sluice.disagg.params import TransferRequest
from sluice.server.errors import APIError

logger = logging.getLogger(__name__)

SIDE_CHANNEL_TIMEOUT_S = 5.0


async def read_transfer(server, value: object) -> TransferRequest | None:
    """A request's `kv_transfer_params`, with P's side channel read when D meets a new P. A P
    that cannot be reached is left out: D then computes the prompt itself."""
    transfer = TransferRequest.parse(value)
    prefill = transfer.remote_prefill if transfer is not None else None
    disagg = server.engine.engine.disagg
    if prefill is None or disagg is None or prefill.remote_engine_id in disagg.peers:
        return transfer
    try:
        async with httpx.AsyncClient(timeout=SIDE_CHANNEL_TIMEOUT_S) as client:
            reply = await client.get(f"{prefill.side_channel}/pd/nixl_metadata")
            reply.raise_for_status()
            metadata = reply.json()
    except (httpx.HTTPError, ValueError) as error:
        logger.warning("prefill instance %s unreachable: %s", prefill.side_channel, error)
        return transfer
    if metadata.get("engine_id") == prefill.remote_engine_id:
        disagg.add_peer(metadata)  # InvalidParameterError when the layouts disagree
    return transfer


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
