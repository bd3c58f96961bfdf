"""Drive our model code directly (no engine) on tiny checkpoints: pages and state slots by hand."""

from __future__ import annotations

import torch

from sluice.attention.sdpa import SdpaBackend
from sluice.bench.tiny_checkpoint import VOCAB_SIZE
from sluice.cache.kv_cache import KVCache
from sluice.cache.state_cache import StateCache
from sluice.engine.engine import Engine
from sluice.engine.model_runner import allocate_state
from sluice.layers.forward_context import ForwardContext
from sluice.layers.state import StateMetadata
from sluice.loaders import safetensors
from sluice.models.registry import MODEL_CLASSES
from sluice.spec.draft import DraftProposer

PAGE_SIZE = 4
NUM_PAGES = 256


def load_ours(folder):
    config = safetensors.read_hf_config(folder)
    model = MODEL_CLASSES[config.architecture](config)
    model.load_weights(safetensors.read_hf_tensors(folder), torch.float32)
    return model.eval()


class PagedRunner:
    """Feeds chunks of several sequences through the model, each with its own page table and,
    for hybrid models, its own state slot, over caches of its own."""

    def __init__(self, model, num_seqs: int) -> None:
        self.model = model
        cpu = torch.device("cpu")
        self.kv_cache = KVCache.allocate(model.config, NUM_PAGES, PAGE_SIZE, torch.float32, cpu)
        self.state_cache = (
            allocate_state(model, 2 * num_seqs + 1, torch.float32, cpu)
            if model.config.is_hybrid
            else None
        )
        # Interleave page ids across sequences, and skip every other state slot, so a wrong page
        # table or slot cannot go unnoticed.
        self.tables = [list(range(s, NUM_PAGES, num_seqs)) for s in range(num_seqs)]
        self.slots = [2 * s + 1 for s in range(num_seqs)]
        self.done = [0] * num_seqs

    @torch.inference_mode()
    def run(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        seqs = list(chunks)
        lens = [len(chunks[s]) for s in seqs]
        ctx = ForwardContext.build(
            SdpaBackend(),
            self.kv_cache,
            lens,
            [self.done[s] for s in seqs],
            [self.tables[s] for s in seqs],
            torch.device("cpu"),
            self.state_cache,
            [self.slots[s] for s in seqs],
        )
        ids = torch.tensor([t for s in seqs for t in chunks[s]])
        logits = self.model.compute_logits(self.model(ids, ctx))
        out, start = {}, 0
        for s in seqs:
            out[s] = logits[start : start + len(chunks[s])]
            start += len(chunks[s])
            self.done[s] += len(chunks[s])
        return out


def state_cache_of(layer, num_slots: int) -> StateCache:
    """A state cache for one recurrent layer alone (its `state_index` is 0)."""
    return StateCache.allocate([layer.state_spec(torch.float32)], num_slots, torch.device("cpu"))


def recurrent_step(
    layer,
    cache: StateCache,
    x,
    query_lens: list[int],
    slots: list[int],
    verify_slots: list[list[int]] | None = None,
):
    """One step of a recurrent layer alone: `query_lens[i]` rows of x in state slot `slots[i]`
    (a verify run also in `verify_slots[i]`)."""
    state = StateMetadata.build(query_lens, slots, x.device, verify_slots)
    return layer(x, ForwardContext(None, None, None, state, cache))


def token_ids(results) -> list[list[int]]:
    """The first completion's token ids of each result."""
    return [r.outputs[0].token_ids for r in results]


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0]


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=g).tolist() for n in lengths]


def check_batched_greedy_decode(
    reference,
    runner: PagedRunner,
    last: dict[int, torch.Tensor],
    batch: list[list[int]],
    steps: int,
    atol: float,
) -> None:
    """Greedy-decode every sequence of `batch` `steps` times, all in one batch each step, starting
    from its `last` logits, and compare every step's logits with the reference's. The reference
    is causal, so one forward over each final sequence gives its logits at every step."""
    decoded: dict[int, list[torch.Tensor]] = {i: [] for i in last}
    for _ in range(steps):
        next_ids = {i: int(logits.argmax()) for i, logits in last.items()}
        for i, logits in runner.run({i: [token] for i, token in next_ids.items()}).items():
            batch[i].append(next_ids[i])
            decoded[i].append(logits[-1])
            last[i] = logits[-1]
    for i, steps_logits in decoded.items():
        expected = reference_logits(reference, batch[i])[-steps:]
        torch.testing.assert_close(torch.stack(steps_logits), expected, atol=atol, rtol=0)


@torch.no_grad()
def reference_greedy(reference, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation by full forwards of transformers' model: no cache anywhere."""
    ids = list(prompt)
    for _ in range(max_tokens):
        logits = reference(torch.tensor([ids], device=reference.device)).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt) :]


def assert_no_leaks(engine: Engine) -> None:
    """Every page (and state slot) is free or held once by the prefix cache; dropping the cache
    frees them all."""
    assert not engine.has_unfinished_requests()
    cache, slots = engine.prefix_cache, engine.state_pool
    if cache is not None:
        cache.check_integrity()
        assert engine.pool.num_free + cache.num_cached_pages == engine.pool.num_pages, (
            "KV pages leaked"
        )
        if slots is not None:
            assert slots.num_free + cache.num_checkpoints == slots.num_slots, "state slots leaked"
        cache.reset()
    assert engine.pool.num_free == engine.pool.num_pages, "KV pages leaked"
    if slots is not None:
        assert slots.num_free == slots.num_slots, "state slots leaked"
    if isinstance(engine.proposer, DraftProposer):
        assert engine.proposer.is_idle, "the draft model's KV pages leaked"
