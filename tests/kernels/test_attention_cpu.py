"""sluice's paged decode attention kernel (kernels/attention_cpu.cpp) against SDPA over the
gathered pages, for every page dtype, and its checks on bad operands; the paged backend, which
runs it where it can, against the SDPA backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sluice.attention.metadata import KERNEL_MAX_CONTEXT
from sluice.attention.paged import PagedBackend
from sluice.attention.sdpa import SdpaBackend
from sluice.attention.select import select_backend
from sluice.cache.kv_cache import KVCache
from sluice.kernels import attention_cpu
from sluice.layers.attention import PagedAttention
from sluice.layers.forward_context import ForwardContext

native = pytest.mark.skipif(
    not attention_cpu.available(), reason="sluice's attention kernel does not run on this machine"
)

PAGE_SIZE = 16


def make_case(
    kv_lens: list[int], heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Caches of 160 pages, each sequence on its own scattered pages, tables padded with page 0."""
    generator = torch.Generator().manual_seed(seed)
    k_cache, v_cache = torch.randn(2, 160, PAGE_SIZE, kv_heads, dim, generator=generator).to(dtype)
    columns = max(2, -(-max(kv_lens) // PAGE_SIZE) + 1)  # one padding column past the longest
    pages = torch.randperm(159, generator=generator)[: len(kv_lens) * columns] + 1
    tables = pages.view(len(kv_lens), columns)
    q = torch.randn(len(kv_lens), heads, dim, generator=generator)
    return q, k_cache, v_cache, tables, torch.tensor(kv_lens)


def sdpa_over_pages(q, k_cache, v_cache, tables, kv_lens, scale) -> torch.Tensor:
    rows = []
    for i, kv_len in enumerate(kv_lens.tolist()):
        keys = k_cache[tables[i]].flatten(0, 1)[:kv_len].float().transpose(0, 1)
        values = v_cache[tables[i]].flatten(0, 1)[:kv_len].float().transpose(0, 1)
        out = F.scaled_dot_product_attention(
            q[i].unsqueeze(1), keys, values, scale=scale, enable_gqa=True
        )
        rows.append(out.reshape(1, -1))
    return torch.cat(rows)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
# Groups of 3, 1, 4, 8 and 5 query heads a KV head: the heads of a group are weighed in passes
# of up to 4 (2 at dim 128), so 8 and 5 take more than one.
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"),
    [(9, 3, 64), (4, 4, 16), (8, 2, 128), (16, 2, 64), (10, 2, 32)],
)
def test_matches_sdpa_over_gathered_pages(dtype, heads, kv_heads, dim) -> None:
    """GQA and plain heads, contexts of one token, of a page, ending mid-page, long ones."""
    case = make_case([1, 16, 17, 200, 5, 129], heads, kv_heads, dim, dtype)
    got = attention_cpu.paged_decode(*case, dim**-0.5)
    assert got.shape == (6, heads * dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, sdpa_over_pages(*case, dim**-0.5), atol=1e-5, rtol=1e-5)


@native
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch() -> None:
    q, k_cache, v_cache, tables, lens = make_case([33, 7, 300, 64], 9, 3, 64, torch.float16)
    batch = attention_cpu.paged_decode(q, k_cache, v_cache, tables, lens, 0.125)
    for i in range(len(lens)):
        alone = attention_cpu.paged_decode(
            q[i : i + 1], k_cache, v_cache, tables[i : i + 1], lens[i : i + 1], 0.125
        )
        assert torch.equal(alone, batch[i : i + 1])


@native
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_of_one_sequence_share_reads_and_keep_their_bits(threads: int) -> None:
    """A verify step's or a prompt chunk's rows (one sequence, each a token longer than the one
    before: read together, in spans) beside a lone decode and a second run of rows: each row
    gets the bits it gets alone, and what SDPA gives."""
    _, k_cache, v_cache, tables, _ = make_case([5, 290, 42], 9, 3, 64, torch.float16)
    lens = [5, *range(278, 291), 40, 41, 42]  # 13 rows cross page ends and a partial block
    tables = tables[[0] + [1] * 13 + [2] * 3].clone()
    # Rows of up to 287 tokens read 18 pages and need not name the 19th that 289 and 290 read:
    # a span reads by its longest row's table.
    tables[1:11, 18] = 0
    kv_lens = torch.tensor(lens)
    q = torch.randn(len(lens), 9, 64, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        batch = attention_cpu.paged_decode(q, k_cache, v_cache, tables, kv_lens, 0.125)
    finally:
        torch.set_num_threads(before)
    for i in range(len(lens)):
        alone = attention_cpu.paged_decode(
            q[i : i + 1], k_cache, v_cache, tables[i : i + 1], kv_lens[i : i + 1], 0.125
        )
        assert torch.equal(alone, batch[i : i + 1]), i
    reference = sdpa_over_pages(q, k_cache, v_cache, tables, kv_lens, 0.125)
    torch.testing.assert_close(batch, reference, atol=1e-5, rtol=1e-5)


@native
def test_bfloat16_queries_are_widened() -> None:
    q, *rest = make_case([40, 9], 9, 3, 64, torch.bfloat16)
    got = attention_cpu.paged_decode(q.bfloat16(), *rest, 0.125)
    torch.testing.assert_close(got, sdpa_over_pages(q.bfloat16().float(), *rest, 0.125))


@native
def test_bad_operands_are_named() -> None:
    q, k_cache, v_cache, tables, lens = make_case([20, 5], 9, 3, 64, torch.float32)
    with pytest.raises(RuntimeError, match="sequence 1 has 100 tokens, its table holds 48"):
        attention_cpu.paged_decode(q, k_cache, v_cache, tables, torch.tensor([20, 100]), 0.1)
    bad_tables = tables.clone()
    bad_tables[0, 1] = 160
    with pytest.raises(RuntimeError, match="sequence 0 names page 160 of 160"):
        attention_cpu.paged_decode(q, k_cache, v_cache, bad_tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="head dim 48"):
        narrow = k_cache[..., :48].contiguous()
        attention_cpu.paged_decode(q[..., :48], narrow, narrow, tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="caches must be contiguous"):
        attention_cpu.paged_decode(q, k_cache, v_cache.half(), tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="8 query heads do not group over 3"):
        attention_cpu.paged_decode(q[:, :8], k_cache, v_cache, tables, lens, 0.1)
    with pytest.raises(RuntimeError, match="must be int64"):
        attention_cpu.paged_decode(q, k_cache, v_cache, tables.int(), lens, 0.1)


@pytest.mark.parametrize("dim", [48, 64])
def test_models_of_any_head_size_decode(dim) -> None:
    """A model whose head size the kernel lacks (48) gets the paged backend of tensor ops
    instead; where the kernel does not run, every model does."""
    cpu = torch.device("cpu")
    backend = select_backend(dim, cpu, compiled=True)
    assert backend.native == (dim in attention_cpu.HEAD_DIMS and attention_cpu.available())
    layer = PagedAttention(layer_index=0, num_heads=4, num_kv_heads=2, head_dim=dim)
    _, k_cache, v_cache, tables, _ = make_case([30, 3], 4, 2, dim, torch.float16)
    cache = KVCache([k_cache], [v_cache])  # one layer, the same memory
    meta = backend.build_metadata([1, 1], [29, 2], tables.tolist(), PAGE_SIZE, cpu)
    q, k, v = torch.randn(2, 4, dim), torch.randn(2, 2, dim), torch.randn(2, 2, dim)
    got = layer(q, k, v, ForwardContext(meta, cache, backend))
    expected = sdpa_over_pages(q, k_cache, v_cache, tables, meta.kv_lens, dim**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_prompt_chunks_attend_through_the_kernel_as_through_sdpa() -> None:
    """In compiled steps a prompt's tokens are rows of the paged kernel, each with the context up
    to itself, beside the decodes; a chunk past KERNEL_MAX_CONTEXT goes to SDPA. Every token's
    attention is SDPA's (where the kernel does not run, the compiled tensor ops take the rows)."""
    layer = PagedAttention(layer_index=1, num_heads=9, num_kv_heads=3, head_dim=64)
    generator = torch.Generator().manual_seed(0)
    cache = KVCache(
        *(list(torch.randn(2, 100, PAGE_SIZE, 3, 64, generator=generator)) for _ in "kv")
    )
    long = KERNEL_MAX_CONTEXT - 24  # its 40-token chunk ends past the kernel's reach
    query_lens, context_lens = [1, 37, 1, 40], [70, 3, 12, long]
    tables = [[1, 2, 3, 4, 5], [20, 21, 22], [30], list(range(31, 31 + -(-(long + 40) // 16)))]
    q = torch.randn(sum(query_lens), 9, 64, generator=generator)
    k, v = (torch.randn(sum(query_lens), 3, 64, generator=generator) for _ in range(2))
    cpu = torch.device("cpu")
    paged, sdpa = PagedBackend(attention_cpu.available()), SdpaBackend()
    kernel = paged.build_metadata(query_lens, context_lens, tables, PAGE_SIZE, cpu)
    assert [g.kv_lens is not None for g in kernel.groups] == [True, False]
    assert kernel.groups[0].token_index.tolist() == list(range(39))  # all but the long chunk's
    assert kernel.groups[0].kv_lens.tolist() == [71, *range(4, 41), 13]
    got = layer(q, k, v, ForwardContext(kernel, cache, paged))
    meta = sdpa.build_metadata(query_lens, context_lens, tables, PAGE_SIZE, cpu)
    expected = layer(q, k, v, ForwardContext(meta, cache, sdpa))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_eager_decodes_are_padded_only_to_alike_contexts() -> None:
    """The SDPA backend pads a group's keys to its longest context, so decodes share a call only
    with contexts within a factor of two (62 and 64 together, 0 and 299 alone); each decode still
    attends exactly to its own context (its new key written first)."""
    kv_lens = [40, 300, 33, 63, 65, 1]  # contexts 39, 299, 32, 62, 64, 0
    q, k_cache, v_cache, tables, lens = make_case(kv_lens, 9, 3, 64, torch.float32)
    cache = KVCache([k_cache.clone()], [v_cache.clone()])
    sdpa, cpu = SdpaBackend(), torch.device("cpu")
    context_lens = [n - 1 for n in kv_lens]
    meta = sdpa.build_metadata([1] * 6, context_lens, tables.tolist(), PAGE_SIZE, cpu)
    assert sorted(g.token_index.tolist() for g in meta.groups) == [[0, 2, 3, 4], [1], [5]]
    assert [g.max_kv_len for g in meta.groups if 0 in g.token_index.tolist()] == [65]
    generator = torch.Generator().manual_seed(1)
    k, v = (torch.randn(6, 3, 64, generator=generator) for _ in "kv")
    got = sdpa.forward(0, q, k, v, 0.125, ForwardContext(meta, cache, sdpa))
    for i, n in enumerate(kv_lens):  # the reference reads the new keys from the pools too
        page, offset = tables[i, (n - 1) // PAGE_SIZE], (n - 1) % PAGE_SIZE
        k_cache[page, offset], v_cache[page, offset] = k[i], v[i]
    expected = sdpa_over_pages(q, k_cache, v_cache, tables, lens, 0.125)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_eager_prompts_are_padded_only_to_alike_lengths() -> None:
    """The SDPA backend pads a group's queries and keys to its longest, so prompt chunks share a
    call only with chunks whose query and key lengths are each within a factor of two: a
    200-token chunk and a 180-token one together, a 5-token chunk at 300 tokens of context and a
    9-token prompt apart from them and from each other. Every token still attends exactly to its
    own context, as the paged backend's rows do."""
    layer = PagedAttention(layer_index=0, num_heads=9, num_kv_heads=3, head_dim=64)
    generator = torch.Generator().manual_seed(2)
    cache = KVCache(
        *(list(torch.randn(2, 120, PAGE_SIZE, 3, 64, generator=generator)) for _ in "kv")
    )
    query_lens, context_lens = [1, 200, 9, 180, 5], [30, 0, 4, 10, 300]
    pages = [-(-(q + c) // PAGE_SIZE) for q, c in zip(query_lens, context_lens)]
    firsts = [1 + sum(pages[:i]) for i in range(len(pages))]
    tables = [list(range(first, first + n)) for first, n in zip(firsts, pages)]
    q = torch.randn(sum(query_lens), 9, 64, generator=generator)
    k, v = (torch.randn(sum(query_lens), 3, 64, generator=generator) for _ in range(2))
    cpu, sdpa = torch.device("cpu"), SdpaBackend()
    meta = sdpa.build_metadata(query_lens, context_lens, tables, PAGE_SIZE, cpu)
    seq_of_token = torch.repeat_interleave(torch.arange(5), torch.tensor(query_lens))
    groups = sorted(sorted(set(seq_of_token[g.token_index].tolist())) for g in meta.groups)
    assert groups == [[0], [1, 3], [2], [4]]
    assert sorted(g.max_query_len for g in meta.groups) == [1, 5, 9, 200]
    copy = KVCache([t.clone() for t in cache.k], [t.clone() for t in cache.v])
    got = layer(q, k, v, ForwardContext(meta, copy, sdpa))
    paged = PagedBackend(attention_cpu.available())
    kernel = paged.build_metadata(query_lens, context_lens, tables, PAGE_SIZE, cpu)
    expected = layer(q, k, v, ForwardContext(kernel, cache, paged))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
