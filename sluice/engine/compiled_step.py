"""Engine steps through one graph compiled by torch.compile.

Every step of an attention-only model (prefill chunks, decodes, or both) runs the model's forward
and the logits of its sampled rows as one inductor graph (C++ kernels on the CPU). Eagerly, each
layer makes some 25 small calls around its four matmuls (norms, rotary, SwiGLU, residual adds,
dtype casts), each a few microseconds of dispatch for a few hundred bytes of work when decoding;
compiled, they fuse into a few kernels. The token and row counts are unbacked (not specialized,
not even to 0 or 1), so one compilation serves every step. Attention stays outside the graph's
reach as an opaque operator (layers/attention.py); decodes there read their pages through a
second compiled kernel.

Compiling takes about 45 s on a first start on two cores and about 11 s once inductor's on-disk
cache holds the graph; where it fails (no C++ compiler, say), the engine logs why and runs
eagerly. Weights are not frozen into the graph: freezing measured no faster per step here and
defeats the autograd-level cache (25 s instead of 11 s for a cached start).
"""

from __future__ import annotations

import logging
import time

import torch

from sluice.layers.attention import AttentionMetadata, step_metadata
from sluice.models.base import CausalLM

logger = logging.getLogger(__name__)


class CompiledStep:
    def __init__(self, model: CausalLM) -> None:
        self.model = model
        # size_asserts off: checking every operator output's shape costs ~0.5 ms a step.
        options = {"size_asserts": False}
        self._graph = torch.compile(self._step, fullgraph=True, options=options)

    def __call__(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, rows: torch.Tensor
    ) -> torch.Tensor:
        """Logits [R, vocab] of the R token rows `rows` of the step's T tokens `input_ids`."""
        for per_token in (input_ids, meta.positions, meta.slot_mapping, rows):
            torch._dynamo.decorators.mark_unbacked(per_token, 0)
        with step_metadata(meta):
            return self._graph(input_ids, meta, rows)

    def _step(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, rows: torch.Tensor
    ) -> torch.Tensor:
        return self.model.compute_logits(self.model(input_ids, meta)[rows])


def compiled_step(model: CausalLM, page_size: int, device: torch.device) -> CompiledStep | None:
    """The model's compiled step: compiled on first call and kept on the model, so engines
    that share a model share it (attention reads each engine's own cache through the operator).
    None, with the reason logged, where the model or the toolchain can't be compiled."""
    if not hasattr(model, "_compiled_step"):
        model._compiled_step = _compile(model, page_size, device)
    return model._compiled_step


def _compile(model: CausalLM, page_size: int, device: torch.device) -> CompiledStep | None:
    """Compile by running two decode steps into page 0 (a slot is always written before it is
    read, so what they leave there is never seen)."""
    if model.config.is_hybrid:
        logger.info("compile: hybrid models run eagerly (their recurrent layers are not compiled)")
        return None
    logger.info("compiling the model step (tens of seconds on a first start, then cached)")
    start = time.perf_counter()
    compiled = CompiledStep(model)
    try:
        with torch.inference_mode():  # the runner's tensors are inference tensors: so are these
            for context_lens in ([0], [40, 0]):  # one token; then two, in 3 pages
                compiled(*_warmup_step(context_lens, page_size, device))
    except Exception as error:  # inductor fails in many ways (no compiler, headers, ...)
        logger.warning("compile failed, running eagerly: %s", error)
        return None
    logger.info("model step compiled in %.1f s", time.perf_counter() - start)
    return compiled


def _warmup_step(
    context_lens: list[int], page_size: int, device: torch.device
) -> tuple[torch.Tensor, AttentionMetadata, torch.Tensor]:
    """A decode step whose every token goes to page 0: its sizes (batch 2, 3 pages) are all
    distinct, so the kernels compile general in each, not for sizes that happened to be equal."""
    tables = [[0] * (-(-(n + 1) // page_size)) for n in context_lens]
    n = len(context_lens)
    meta = AttentionMetadata.build([1] * n, context_lens, tables, page_size, device, True)
    return torch.zeros(n, dtype=torch.long, device=device), meta, torch.arange(n, device=device)
