"""The CUDA graphs' host-side logic, on the CPU: buckets, buffer sizes, and padded decode inputs
that attend exactly as the unpadded step (FlexAttention's reference runs here)."""

import pytest
import torch
from model_harness import load_ours, prompts

from sluice.attention.flex import FlexBackend
from sluice.attention.sdpa import SdpaBackend
from sluice.bench.tiny_checkpoint import make_tiny_checkpoint
from sluice.cache.kv_cache import KVCache
from sluice.engine.cuda_graphs import (
    CudaGraphDecoder,
    GraphShape,
    batch_buckets,
    bucket_for,
    padded_decode_inputs,
)
from sluice.layers.forward_context import ForwardContext

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without")


def test_buckets_cover_every_batch_up_to_the_largest() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(256)[:5] == [1, 2, 4, 8, 16] and batch_buckets(256)[-1] == 256
    buckets = batch_buckets(64)
    for batch in range(1, 65):
        bucket = bucket_for(batch, buckets)
        assert bucket >= batch and bucket - batch < 8
    assert bucket_for(65, buckets) is None  # runs eagerly


def test_padding_rows_write_only_the_scratch_page_and_real_rows_attend_as_unpadded() -> None:
    shape = GraphShape(max_batch=8, max_pages=5, num_pages=21, page_size=4)
    generator = torch.Generator().manual_seed(0)
    pools = [torch.randn(1, 21, 4, 2, 16, generator=generator) for _ in "kv"]
    context_lens, tables = [9, 0, 4], [[3, 8, 1], [5], [6, 2, 7]]
    q = torch.randn(8, 4, 16, generator=generator)
    k, v = (torch.randn(8, 2, 16, generator=generator) for _ in "kv")
    backend = FlexBackend(compiled=False)

    step = padded_decode_inputs([11, 12, 13], context_lens, tables, 8, shape)
    assert step.input_ids.tolist() == [11, 12, 13, 0, 0, 0, 0, 0]
    assert step.meta.page_tables.shape == (8, 5)
    assert step.meta.slot_mapping.tolist() == [1 * 4 + 1, 5 * 4, 2 * 4] + [20 * 4] * 5
    padded_cache = KVCache(*(list(p.clone()) for p in pools))
    padded = backend.forward(0, q, k, v, 0.25, ForwardContext(step.meta, padded_cache, backend))

    cache = KVCache(*(list(p.clone()) for p in pools))
    meta = backend.build_metadata([1, 1, 1], context_lens, tables, 4, torch.device("cpu"))
    alone = backend.forward(0, q[:3], k[:3], v[:3], 0.25, ForwardContext(meta, cache, backend))
    torch.testing.assert_close(padded[:3], alone, atol=1e-6, rtol=1e-6)
    for pool, pool_alone in ((padded_cache.k[0], cache.k[0]), (padded_cache.v[0], cache.v[0])):
        assert torch.equal(pool[:20], pool_alone[:20])  # the scratch page alone differs


def test_the_graphs_forward_pass_over_the_buffers_is_the_eager_decode(tmp_path) -> None:
    """What a graph captures, run eagerly on the CPU: a decode step loaded into the persistent
    buffers (bucket 4 for 3 sequences) gives the logits of the eager step through SDPA."""
    make_tiny_checkpoint("llama", tmp_path)
    model = load_ours(tmp_path)
    cpu = torch.device("cpu")
    shape = GraphShape(max_batch=8, max_pages=16, num_pages=41, page_size=4)
    kv = KVCache.allocate(model.config, shape.num_pages, 4, torch.float32, cpu)
    tables = [list(range(s, 40, 3)) for s in range(3)]  # interleaved pages
    batch = prompts([9, 4, 13])
    sdpa = SdpaBackend()
    with torch.inference_mode():
        ctx = ForwardContext.build(sdpa, kv, [9, 4, 13], [0, 0, 0], tables, cpu)
        model(torch.tensor([t for p in batch for t in p]), ctx)
        eager_kv = KVCache([k.clone() for k in kv.k], [v.clone() for v in kv.v])
        decoder = CudaGraphDecoder(model, kv, FlexBackend(compiled=False), shape)
        assert decoder.load([5, 6, 7], [9, 4, 13], tables) == 4
        got = decoder.forward_eagerly(4)[:3]
        ctx = ForwardContext.build(sdpa, eager_kv, [1, 1, 1], [9, 4, 13], tables, cpu)
        want = model.compute_logits(model(torch.tensor([5, 6, 7]), ctx))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    for got_keys, want_keys in zip(kv.k, eager_kv.k, strict=True):  # the same keys, in place
        torch.testing.assert_close(got_keys[:40], want_keys[:40])
