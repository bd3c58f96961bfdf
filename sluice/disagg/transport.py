"""Moving KV pages and state slots between engines: the `KVTransport` interface and its NIXL
implementation.

Each engine registers its KV cache (a K and a V pool per layer) and its state tensors once; a
pull then names page runs, not bytes. A run of pages consecutive on both sides is one descriptor
per layer and K/V (a pool is `[pages, page_size, heads, dim]`, so a run within it is
contiguous), a state slot one descriptor per state tensor. The pull reads from
P's memory (NIXL READ: on GPUs, RDMA or NVLink; here UCX over TCP) and its completion notifies P
with the lease id, so P frees the pages without a round trip of its own.

A READ needs P's side to progress too (UCX over TCP answers it in P's process). P's engine
thread does between steps, but a prefill step on a CPU takes seconds: while P holds leases, a
thread of its own progresses the transport every few ms (`serve_in_background`), so a pull
never waits for P's step to end.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any

from sluice.cache.kv_cache import KVCache
from sluice.cache.state_cache import StateCache

logger = logging.getLogger(__name__)

NIXL_VERSION = "1.5.1"  # the nixl-cu12 release this was tested with (pyproject pins it)
PROGRESS_INTERVAL_S = 0.002  # how often P's background thread progresses the transport


@dataclass(frozen=True)
class CacheLayout:
    """What both sides must agree on for pages to mean the same thing."""

    model: str
    page_size: int
    kv_dtype: str
    kv_page_shape: tuple[int, ...]  # [layers, page_size, kv_heads, head_dim]
    state_shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, per-slot shape) per tensor

    @classmethod
    def of(cls, model: str, kv: KVCache, state: StateCache | None) -> CacheLayout:
        _, page_size, heads, dim = kv.k[0].shape
        layers = kv.num_layers
        tensors = state.tensors() if state is not None else []
        return cls(
            model,
            page_size,
            str(kv.dtype).removeprefix("torch."),
            (layers, page_size, heads, dim),
            tuple((str(t.dtype).removeprefix("torch."), tuple(t.shape[1:])) for t in tensors),
        )

    def disagreement(self, remote: CacheLayout) -> str | None:
        """Why pages of `remote` cannot be read into this layout, or None."""
        names = {
            "model": "model",
            "page_size": "page size",
            "kv_dtype": "KV dtype",
            "kv_page_shape": "layer layout (layers, page size, KV heads, head dim)",
            "state_shapes": "recurrent-state layout",
        }
        for field, name in names.items():
            mine, theirs = getattr(self, field), getattr(remote, field)
            if mine != theirs:
                return (
                    f"prefill and decode instances disagree on {name}: P has {theirs}, D has {mine}"
                )
        return None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CacheLayout:
        return cls(
            data["model"],
            data["page_size"],
            data["kv_dtype"],
            tuple(data["kv_page_shape"]),
            tuple((dtype, tuple(shape)) for dtype, shape in data["state_shapes"]),
        )


@dataclass(frozen=True)
class PageRun:
    """`count` pages from `remote_start` on P to `local_start` on D, consecutive on both."""

    remote_start: int
    local_start: int
    count: int


def page_runs(remote_pages: list[int], local_pages: list[int]) -> list[PageRun]:
    """The fewest runs that map `remote_pages[i]` to `local_pages[i]`."""
    runs: list[PageRun] = []
    for remote, local in zip(remote_pages, local_pages, strict=True):
        last = runs[-1] if runs else None
        if (
            last is not None
            and remote == last.remote_start + last.count
            and local == last.local_start + last.count
        ):
            runs[-1] = PageRun(last.remote_start, last.local_start, last.count + 1)
        else:
            runs.append(PageRun(remote, local, 1))
    return runs


@dataclass(frozen=True)
class Regions:
    """Where one engine's registered caches are: base addresses and strides, in bytes."""

    k: tuple[int, ...]  # each attention layer's K pool
    v: tuple[int, ...]
    num_pages: int
    page_bytes: int
    state: tuple[tuple[int, int], ...]  # (base, slot bytes) per state tensor

    @classmethod
    def of(cls, kv: KVCache, state: StateCache | None) -> Regions:
        page_bytes = kv.k[0][0].numel() * kv.k[0].element_size()
        tensors = state.tensors() if state is not None else []
        return cls(
            tuple(pool.data_ptr() for pool in kv.k),
            tuple(pool.data_ptr() for pool in kv.v),
            kv.num_pages,
            page_bytes,
            tuple((t.data_ptr(), t[0].numel() * t.element_size()) for t in tensors),
        )

    def page_descs(self, runs: list[PageRun], remote: bool) -> list[tuple[int, int, int]]:
        """(address, length, device) of every run, per layer, K then V."""
        descs = []
        for base in (*self.k, *self.v):
            for run in runs:
                start = run.remote_start if remote else run.local_start
                address = base + start * self.page_bytes
                descs.append((address, run.count * self.page_bytes, 0))
        return descs

    def slot_descs(self, slot: int) -> list[tuple[int, int, int]]:
        return [(base + slot * size, size, 0) for base, size in self.state]


class KVTransport(ABC):
    """Register an engine's caches once; pull page runs and state slots from another engine;
    tell it when done. Every call is made from the engine thread."""

    engine_id: str

    @abstractmethod
    def register(self, layout: CacheLayout, kv: KVCache, state: StateCache | None) -> None: ...

    @abstractmethod
    def metadata(self) -> dict[str, Any]:
        """What the side channel serves: how another engine reaches these caches."""

    @abstractmethod
    def connect(self, metadata: dict[str, Any]) -> None:
        """Make the engine `metadata` describes readable (once per engine id)."""

    @abstractmethod
    def pull(
        self,
        engine_id: str,
        runs: list[PageRun],
        slots: tuple[int, int] | None,
        notify: bytes,
    ) -> object:
        """Start reading `runs` (and the state slot `slots` = (remote, local)) from `engine_id`;
        the remote side gets `notify` when it is done. Returns a handle for `poll`."""

    @abstractmethod
    def poll(self, handle: object) -> str:
        """ "DONE", "PROC" (still going) or "ERR"; a finished handle is released."""

    @abstractmethod
    def notify(self, engine_id: str, message: bytes) -> None: ...

    @abstractmethod
    def notifications(self) -> list[bytes]:
        """Messages other engines sent since the last call."""

    @abstractmethod
    def serve_in_background(self, on: bool) -> None:
        """P: while `on`, answer other engines' pulls from a thread of its own (not only when
        the engine thread calls in, between steps)."""


class NixlTransport(KVTransport):
    def __init__(self, background: bool = False) -> None:
        """`background`: start the thread `serve_in_background` turns on (P)."""
        from nixl_cu12 import nixl_agent, nixl_agent_config

        self.engine_id = f"sluice-{uuid.uuid4().hex[:12]}"
        # No NIXL progress thread: it spins (a tenth of a core while idle, more while P
        # computes); the engine thread polls (which progresses UCX) every step and every few ms
        # while transfers are pending, and P's own thread while it holds leases.
        config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self._agent = nixl_agent(self.engine_id, config)
        self._regions: Regions | None = None
        self._layout: CacheLayout | None = None
        self._remotes: dict[str, Regions] = {}
        # The agent takes one caller at a time: the background thread and the engine thread's
        # `notifications` (the only other call P makes once serving) take turns.
        self._lock = threading.Lock()
        self._inbox: list[bytes] = []
        self._serving = threading.Event()
        if background:
            threading.Thread(target=self._serve, name="sluice-nixl", daemon=True).start()

    def register(self, layout: CacheLayout, kv: KVCache, state: StateCache | None) -> None:
        tensors = [*kv.k, *kv.v] + (state.tensors() if state is not None else [])
        self._agent.register_memory(tensors)
        self._regions = Regions.of(kv, state)
        self._layout = layout

    @property
    def layout(self) -> CacheLayout:
        assert self._layout is not None
        return self._layout

    def metadata(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "agent": base64.b64encode(self._agent.get_agent_metadata()).decode(),
            "layout": asdict(self.layout),
            "regions": asdict(self._regions),
        }

    def connect(self, metadata: dict[str, Any]) -> None:
        engine_id = metadata["engine_id"]
        if engine_id in self._remotes:
            return
        self._agent.add_remote_agent(base64.b64decode(metadata["agent"]))
        regions = dict(metadata["regions"])
        regions["state"] = tuple(tuple(s) for s in regions["state"])
        regions["k"], regions["v"] = tuple(regions["k"]), tuple(regions["v"])
        self._remotes[engine_id] = Regions(**regions)

    def is_connected(self, engine_id: str) -> bool:
        return engine_id in self._remotes

    def pull(
        self, engine_id: str, runs: list[PageRun], slots: tuple[int, int] | None, notify: bytes
    ) -> object:
        remote, local = self._remotes[engine_id], self._regions
        remote_descs = remote.page_descs(runs, remote=True)
        local_descs = local.page_descs(runs, remote=False)
        if slots is not None:
            remote_descs += remote.slot_descs(slots[0])
            local_descs += local.slot_descs(slots[1])
        agent = self._agent
        handle = agent.initialize_xfer(
            "READ",
            agent.get_xfer_descs(local_descs, "DRAM"),
            agent.get_xfer_descs(remote_descs, "DRAM"),
            engine_id,
            notify,
        )
        if agent.transfer(handle) == "ERR":
            agent.release_xfer_handle(handle)
            return None
        return handle

    def poll(self, handle: object) -> str:
        if handle is None:
            return "ERR"
        state = self._agent.check_xfer_state(handle)
        if state != "PROC":
            self._agent.release_xfer_handle(handle)
        return state

    def notify(self, engine_id: str, message: bytes) -> None:
        if engine_id in self._remotes:
            self._agent.send_notif(engine_id, message)

    def serve_in_background(self, on: bool) -> None:
        if on:
            self._serving.set()
        else:
            self._serving.clear()

    def _serve(self) -> None:
        while True:
            self._serving.wait()
            self._collect()
            time.sleep(PROGRESS_INTERVAL_S)

    def _collect(self) -> None:
        """Progress the transport; keep the notifications it brought."""
        with self._lock:
            for messages in self._agent.get_new_notifs().values():
                self._inbox.extend(messages)

    def notifications(self) -> list[bytes]:
        self._collect()
        with self._lock:
            messages, self._inbox = self._inbox, []
        return messages
