"""Engine steps through graphs compiled by torch.compile.

Eagerly, each layer makes some 25 small calls around its four matmuls (norms, rotary, SwiGLU,
residual adds, dtype casts), each a few microseconds of dispatch for a few hundred bytes of work
when decoding; compiled, they fuse into a few kernels (C++ on the CPU). An attention-only model
gets two graphs, each serving its steps whatever their sizes (token and row counts are unbacked:
not specialized, not even to 0 or 1):
- decodes alone, the steady state of every stream: attention is traced in (cache writes as
  in-place scatters, the paged decode kernel), so no Python runs between layers;
- every other step (prefill chunks, alone or beside decodes): attention is an opaque operator
  (layers/attention.py), so variable-length prompts and their masks stay out of the graph.

Compiling both takes about 90 s on a first start on two cores, much less once inductor's
on-disk cache holds them; where it fails (no C++ compiler, say), the engine logs why and runs
eagerly. Weights are not frozen into the graphs: freezing measured no faster per step here and
defeats the autograd-level cache.
"""

from __future__ import annotations

import functools
import logging
import time
import types
from collections.abc import Callable

import torch

from sluice.layers.attention import AttentionMetadata, DecodeMetadata, step_metadata
from sluice.memory import loading_allocations_mapped
from sluice.models.base import CausalLM

logger = logging.getLogger(__name__)


class CompiledStep:
    """Two graphs over one model: decodes alone, with attention traced in, and every other step
    (prefill chunks, alone or beside decodes), with attention as the opaque operator."""

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        # size_asserts off: checking every operator output's shape costs ~0.5 ms a step.
        guard_filter = functools.partial(_step_guards, model)
        options = {"size_asserts": False, "guard_filter_fn": guard_filter}
        self._decode_graph = torch.compile(_own_code(_step), fullgraph=True, options=options)
        self._graph = torch.compile(_own_code(_step), fullgraph=True, options=options)

    def __call__(
        self, input_ids: torch.Tensor, meta: AttentionMetadata | DecodeMetadata, rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits [R, vocab] of the R token rows `rows` of the step's T tokens `input_ids`."""
        for per_token in (input_ids, meta.positions, meta.slot_mapping, rows):
            torch._dynamo.decorators.mark_unbacked(per_token, 0)
        if isinstance(meta, DecodeMetadata):
            torch._dynamo.decorators.mark_unbacked(meta.page_tables, 0)
            torch._dynamo.decorators.mark_unbacked(meta.kv_lens, 0)
            torch._dynamo.mark_dynamic(meta.page_tables, 1)
            return self._decode_graph(self.model, input_ids, meta, rows)
        with step_metadata(meta):
            return self._graph(self.model, input_ids, meta, rows)


def _step(
    model: CausalLM,
    input_ids: torch.Tensor,
    meta: AttentionMetadata | DecodeMetadata,
    rows: torch.Tensor,
) -> torch.Tensor:
    return model.compute_logits(model(input_ids, meta)[rows])


def _own_code(function: Callable) -> Callable:
    """A copy of `function` with a code object of its own. Dynamo keeps compiled graphs per code
    object: a copy per graph and model means each cache only ever sees one model and one kind of
    step, so nothing has to tell models or step kinds apart at run time (see `_input_guards`)."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)


def _step_guards(model: CausalLM, guards: list) -> list[bool]:
    """Keep the guards on what may differ between calls: the step's own tensors (its arguments),
    the KV pools, and global state (grad mode, default device). The pools are guarded through the
    first layer's pair: `allocate_kv_cache` gives every layer pools alike, in one call, and an
    engine sharing the model rebinds them all. Drop the rest, thousands on the model's structure
    and weights (fixed once it is loaded): checking them cost ~1.7 ms a step, a sixth of a
    single-stream decode step (the last 0.7 ms the weight and pool tensors' own)."""
    first = model.attention_layers()[0]
    pools = (first.k_cache, first.v_cache)
    return [
        guard.guard_type in _STATE_GUARDS
        or (
            guard.guard_type == "TENSOR_MATCH"
            and (_is_step_argument(guard.name) or any(guard.value is pool for pool in pools))
        )
        for guard in guards
    ]


def _is_step_argument(source: str) -> bool:
    return source.split(".")[0] in ("input_ids", "meta", "rows")


_STATE_GUARDS = frozenset({"GLOBAL_STATE", "GRAD_MODE", "DEFAULT_DEVICE", "TORCH_FUNCTION_STATE"})


def compiled_step(model: CausalLM, page_size: int, device: torch.device) -> CompiledStep | None:
    """The model's compiled step: compiled on first call and kept on the model, so engines
    that share a model share it (attention reads each engine's own cache through the operator).
    None, with the reason logged, where the model or the toolchain can't be compiled."""
    if not hasattr(model, "_compiled_step"):
        model._compiled_step = _compile(model, page_size, device)
    return model._compiled_step


def _compile(model: CausalLM, page_size: int, device: torch.device) -> CompiledStep | None:
    """Compile both graphs by running steps into page 0 (a slot is always written before it is
    read, so what they leave there is never seen)."""
    if model.config.is_hybrid:
        logger.info("compile: hybrid models run eagerly (their recurrent layers are not compiled)")
        return None
    logger.info("compiling the model step (tens of seconds on a first start, then cached)")
    start = time.perf_counter()
    compiled = CompiledStep(model)
    try:
        # the runner's tensors are inference tensors: so are these
        with torch.inference_mode(), loading_allocations_mapped():
            for query_lens, context_lens in _WARMUP_STEPS:
                compiled(*_warmup_step(query_lens, context_lens, page_size, device))
    except Exception as error:  # inductor fails in many ways (no compiler, headers, ...)
        logger.warning("compile failed, running eagerly: %s", error)
        return None
    logger.info("model step compiled in %.1f s", time.perf_counter() - start)
    return compiled


# Decodes (one, then two), a prompt, a prompt beside two decodes: sizes that are all distinct
# (batch, pages, tokens), so the kernels compile general in each rather than for sizes that
# happened to be equal.
_WARMUP_STEPS = (([1], [0]), ([1, 1], [40, 0]), ([3], [0]), ([1, 2, 1], [40, 0, 7]))


def _warmup_step(
    query_lens: list[int], context_lens: list[int], page_size: int, device: torch.device
) -> tuple[torch.Tensor, AttentionMetadata | DecodeMetadata, torch.Tensor]:
    """A step whose every token goes to page 0, sampling each sequence's last token."""
    tables = [[0] * (-(-(c + q) // page_size)) for c, q in zip(context_lens, query_lens)]
    meta = step_metadata_for(query_lens, context_lens, tables, page_size, device)
    rows = torch.tensor(query_lens, device=device).cumsum(0) - 1
    return torch.zeros(sum(query_lens), dtype=torch.long, device=device), meta, rows


def step_metadata_for(
    query_lens: list[int],
    context_lens: list[int],
    page_tables: list[list[int]],
    page_size: int,
    device: torch.device,
) -> AttentionMetadata | DecodeMetadata:
    """What a compiled step takes: decodes alone go to the graph with attention traced in."""
    if all(n == 1 for n in query_lens):
        return DecodeMetadata.build(context_lens, page_tables, page_size, device)
    return AttentionMetadata.build(query_lens, context_lens, page_tables, page_size, device, True)
