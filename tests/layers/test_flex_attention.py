"""The FlexAttention backend (CUDA's) against SDPA over gathered pages, on the CPU through
FlexAttention's unfused reference: prefill chunks, decodes, mixed steps, scattered and shared
pages. The reference applies the mask alone, so the block mask is checked on its own: every key a
query may see lies in a block the mask lists."""

import pytest
import torch

from sluice.attention import flex
from sluice.attention.flex import FlexBackend
from sluice.attention.sdpa import SdpaBackend
from sluice.cache.kv_cache import KVCache
from sluice.layers.forward_context import ForwardContext

PAGE_SIZE = 4
HEADS, KV_HEADS, DIM = 4, 2, 16
cpu = torch.device("cpu")
# the CPU runs FlexAttention unfused, which it warns about
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without")


def _attend(backend, cache, query_lens, context_lens, tables, q, k, v):
    meta = backend.build_metadata(query_lens, context_lens, tables, PAGE_SIZE, cpu)
    ctx = ForwardContext(meta, cache, backend)
    return backend.forward(0, q, k, v, 0.25, ctx)


STEPS = {
    "prefill chunks": ([5, 3], [0, 6], [[7, 2], [0, 9, 4]]),
    "decodes": ([1, 1, 1], [9, 0, 4], [[3, 8, 1], [5], [6, 2]]),
    "mixed": ([1, 6, 1], [12, 2, 3], [[10, 3, 8, 1], [5, 0], [6]]),
    # two sequences sharing a prefix page (the prefix cache), then their own pages
    "shared prefix": ([2, 1], [4, 5], [[11, 2], [11, 7]]),
    "long packed": (
        [150, 1, 40],
        [0, 30, 9],
        [list(range(20, 58)), [1, 2, 3, 4, 5, 6, 7, 8], list(range(60, 73))],
    ),
}


@pytest.mark.parametrize("step", STEPS.values(), ids=STEPS.keys())
def test_flex_attends_as_sdpa_over_gathered_pages(step) -> None:
    query_lens, context_lens, tables = step
    generator = torch.Generator().manual_seed(0)
    pools = [torch.randn(1, 80, PAGE_SIZE, KV_HEADS, DIM, generator=generator) for _ in "kv"]
    tokens = sum(query_lens)
    q, k, v = (
        torch.randn(tokens, h, DIM, generator=generator) for h in (HEADS, KV_HEADS, KV_HEADS)
    )
    expected = _attend(
        SdpaBackend(),
        KVCache(*(list(p.clone()) for p in pools)),
        query_lens,
        context_lens,
        tables,
        q,
        k,
        v,
    )
    cache = KVCache(*(list(p.clone()) for p in pools))
    got = _attend(FlexBackend(compiled=False), cache, query_lens, context_lens, tables, q, k, v)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("step", STEPS.values(), ids=STEPS.keys())
def test_block_mask_lists_every_page_a_query_reads(step) -> None:
    query_lens, context_lens, tables = step
    meta = flex.build(query_lens, context_lens, tables, PAGE_SIZE)
    slots = 80 * PAGE_SIZE
    kv = torch.arange(slots)
    for token in range(len(meta.positions)):
        visible = flex.allowed(meta, torch.tensor(token), kv).nonzero()[:, 0]
        seq, position = int(meta.query_seq[token]), int(meta.positions[token])
        assert len(visible) == position + 1  # its whole context, itself included, nothing else
        row, block = (token, 0) if meta.decode else (0, token // flex.Q_BLOCK)
        listed = meta.kv_indices[row, 0, block, : meta.kv_num_blocks[row, 0, block]]
        assert set((visible // PAGE_SIZE).tolist()) <= set(listed.tolist())
        assert set((visible // PAGE_SIZE).tolist()) == set(tables[seq][: position // PAGE_SIZE + 1])


def test_a_page_at_two_places_is_refused() -> None:
    with pytest.raises(ValueError, match="different places"):
        flex.logical_pages([[3, 4], [4, 3]])
