"""Engine steps through graphs compiled by torch.compile.

Eagerly, each layer makes some 25 small calls around its four matmuls (norms, rotary, SwiGLU,
residual adds, dtype casts), each a few microseconds of dispatch for a few hundred bytes of work
when decoding; compiled, they fuse into a few kernels (C++ on the CPU). An attention-only model
gets two graphs, each serving its steps whatever their sizes (token and row counts are unbacked:
not specialized, not even to 0 or 1):
- steps of short queries, a row per token: decodes alone, the steady state of every stream, and
  the verify steps of speculative decoding (1 + k tokens a request): attention is traced in
  (cache writes as in-place scatters, the paged decode kernel), so no Python runs between layers;
- every other step (prefill chunks, alone or beside decodes): attention is an opaque operator
  (attention/opaque.py), so variable-length prompts and their masks stay out of the graph.

Both take the step's forward context as an argument, KV cache included: engines sharing a model
share its graphs, each stepping its own cache through them.

Both are compiled at engine start (inductor's on-disk cache makes later starts much faster)
by running the attention backend's capture steps; where that fails (no C++ compiler, say), the
engine logs why and runs eagerly. Weights are not frozen into the graphs: freezing was no
faster per step here and defeats the autograd-level cache.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from collections.abc import Callable

import torch

from sluice.attention import opaque
from sluice.attention.backend import AttentionBackend
from sluice.attention.metadata import DECODE_GRAPH_MAX_QUERY, DecodeMetadata
from sluice.cache.kv_cache import KVCache
from sluice.layers.forward_context import ForwardContext
from sluice.memory import loading_allocations_mapped
from sluice.models.base import CausalLM
from sluice.sparse import decoding as sparse_decoding
from sluice.sparse.decoding import SparseDecoding

logger = logging.getLogger(__name__)


class CompiledStep:
    """Two graphs over one model: short queries (decodes, verify steps), with attention traced
    in, and every other step (prefill chunks, alone or beside decodes), with attention as the
    opaque operator."""

    def __init__(self, model: CausalLM, backend: AttentionBackend) -> None:
        self.model = model
        self.backend = backend  # the paged backend the graphs were captured with
        self._opaque = opaque.OpaqueBackend(backend)
        # size_asserts off: checking every operator output's shape costs ~0.5 ms a step.
        options = {"size_asserts": False, "guard_filter_fn": _step_guards}
        self._decode_graph = torch.compile(_own_code(_step), fullgraph=True, options=options)
        self._graph = torch.compile(_own_code(_step), fullgraph=True, options=options)

    def __call__(
        self, input_ids: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits [R, vocab] of the R token rows `rows` of the step's T tokens `input_ids`; `ctx`
        is built by `self.backend`, over any KV cache of the model's layout and dtype."""
        for per_token in (input_ids, rows):
            torch._dynamo.decorators.mark_unbacked(per_token, 0)
        self.backend.mark_dynamic(ctx.attn)
        if isinstance(ctx.attn, DecodeMetadata):
            with sparse_decoding.installed(_decode_graph_sparsity(ctx)):
                return self._decode_graph(self.model, input_ids, ctx, rows)
        with opaque.installed(ctx):
            traced_ctx = dataclasses.replace(ctx, backend=self._opaque)
            return self._graph(self.model, input_ids, traced_ctx, rows)


def _decode_graph_sparsity(ctx: ForwardContext) -> SparseDecoding | None:
    """What the decode graph's MLPs run: it calls the sparse operator in every step, but only
    steps of one token a request are sparse (`ForwardContext.decodes_only`); a verify step's rows
    run dense, as they do eagerly."""
    if ctx.sparse is None or ctx.decodes_only:
        return ctx.sparse
    return ctx.sparse.dense_rows()


def _step(
    model: CausalLM, input_ids: torch.Tensor, ctx: ForwardContext, rows: torch.Tensor
) -> torch.Tensor:
    return model.compute_logits(model(input_ids, ctx)[rows])


def _own_code(function: Callable) -> Callable:
    """A copy of `function` with a code object of its own. Dynamo keeps compiled graphs per code
    object: a copy per graph and model means each cache only ever sees one model and one kind of
    step, so nothing has to tell models or step kinds apart at run time (see `_step_guards`)."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)


def _step_guards(guards: list) -> list[bool]:
    """Keep the guards on what may differ between calls: the step's own tensors (its arguments:
    the token ids, the rows, and in the forward context the metadata's tensors and the KV cache's
    first pools) and global state (grad mode, default device). Drop the
    rest, thousands on the model's structure and weights (fixed once it is loaded) and on the
    context's Python objects (one kind per graph), whose checks would cost a sizeable share of a
    decode step (docs/benchmarks.md). A cache of another dtype or layout fails K's guard and
    gets graphs of its own; one of another size does not (its page count is dynamic)."""
    return [
        guard.guard_type in _STATE_GUARDS
        or (guard.guard_type == "TENSOR_MATCH" and _is_step_argument(guard.name))
        for guard in guards
    ]


def _is_step_argument(source: str) -> bool:
    """The step's own tensors, but of the KV cache only the first layer's K and V pools: they
    stand for every layer's, which `KVCache.allocate` makes alike."""
    if source.startswith(_CACHE_POOLS):
        return source.endswith("[0]")
    return source.split(".")[0] in ("input_ids", "ctx", "rows")


_CACHE_POOLS = ("ctx.kv_cache.k[", "ctx.kv_cache.v[")


_STATE_GUARDS = frozenset({"GLOBAL_STATE", "GRAD_MODE", "DEFAULT_DEVICE", "TORCH_FUNCTION_STATE"})


def compiled_step(
    model: CausalLM,
    kv_cache: KVCache,
    backend: AttentionBackend,
    sparse: SparseDecoding | None = None,
) -> CompiledStep | None:
    """The model's compiled step: compiled on first call and kept on the model, so engines
    that share a model share it (each passes its own cache in). Engines with sparse decoding
    get steps of their own, whose decode graph calls the sparse MLP operator (any engine's
    decoding: it is installed per call). None, with the reason logged, where the model or the
    toolchain can't be compiled."""
    steps = model.__dict__.setdefault("_compiled_steps", {})
    key = sparse is not None
    if key not in steps:
        steps[key] = _compile(model, kv_cache, backend, sparse)
    return steps[key]


def _compile(
    model: CausalLM,
    kv_cache: KVCache,
    backend: AttentionBackend,
    sparse: SparseDecoding | None,
) -> CompiledStep | None:
    """Capture both graphs by running steps into page 0 of `kv_cache` (a slot is always written
    before it is read, so what they leave there is never seen)."""
    if model.config.is_hybrid:
        logger.info("compile: hybrid models run eagerly (their recurrent layers are not compiled)")
        return None
    logger.info("compiling the model step (tens of seconds on a first start, then cached)")
    start = time.perf_counter()
    compiled = CompiledStep(model, backend)
    device = kv_cache.device
    try:
        # the runner's tensors are inference tensors: so are these
        with torch.inference_mode(), loading_allocations_mapped():
            for query_lens, context_lens in _WARMUP_STEPS:
                meta = backend.metadata_for_capture(
                    query_lens, context_lens, kv_cache.page_size, device
                )
                decodes_only = all(n == 1 for n in query_lens)
                ctx = ForwardContext(
                    meta, kv_cache, backend, decodes_only=decodes_only, sparse=sparse
                )
                ids = torch.zeros(sum(query_lens), dtype=torch.long, device=device)
                rows = torch.tensor(query_lens, device=device).cumsum(0) - 1
                compiled(ids, ctx, rows)
    except Exception as error:  # inductor fails in many ways (no compiler, headers, ...)
        logger.warning("compile failed, running eagerly: %s", error)
        return None
    logger.info("model step compiled in %.1f s", time.perf_counter() - start)
    return compiled


# Decodes (one, then two), a verify step beside a decode, a prompt, a prompt beside two
# decodes (prompts longer than the decode graph takes): sizes that are all distinct (batch,
# pages, tokens), so the kernels compile general in each rather than for sizes that happened
# to be equal.
_WARMUP_STEPS = (
    ([1], [0]),
    ([1, 1], [40, 0]),
    ([1, 4], [70, 0]),
    ([DECODE_GRAPH_MAX_QUERY + 4], [0]),
    ([1, DECODE_GRAPH_MAX_QUERY + 1, 1], [40, 0, 7]),
)
