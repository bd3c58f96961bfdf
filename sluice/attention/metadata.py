"""What attention needs to know about one step, built once per step from plain lists and shared
by every layer.

`AttentionMetadata` describes any step for the eager attention: positions, the cache slot of each
new token, and its requests in groups that share one call (decodes of alike context lengths,
prompt chunks of alike lengths, each group padded to its longest, and in compiled steps the rows
of the paged kernel). `DecodeMetadata` describes a step of short queries (decodes, and decodes
with draft tokens to verify) as tensors only, one row per token, so a compiled graph can take
it as an input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Compiled steps read every token's keys through the paged kernel, one query at a time, except
# the chunks of prompts past this many tokens: there SDPA, which shares each key among a chunk's
# queries, is the faster (a 512-token chunk ending at 2048 tokens: SDPA took 0.7-0.8x the
# kernel's time; from an empty context, 1.2x).
KERNEL_MAX_CONTEXT = 1024
# Compiled steps whose every request computes at most this many tokens (decodes, the verify
# steps of speculative decoding, a prompt's short last chunk) run the decode graph, a row per
# token: each token reads its context through the paged kernel like a decode, so a query of n
# tokens reads its context n times, which for a few tokens costs far less than the other graph's
# Python between layers (docs/benchmarks.md).
DECODE_GRAPH_MAX_QUERY = 16


def runs_as_decode_rows(query_lens: list[int]) -> bool:
    """Whether a step's requests all compute few enough tokens to be decode rows."""
    return all(n <= DECODE_GRAPH_MAX_QUERY for n in query_lens)


@dataclass
class AttentionGroup:
    """Requests that share one padded SDPA call."""

    token_index: torch.Tensor  # [Tg] the group's tokens in the step's flat token order
    page_tables: torch.Tensor  # [Bg, pages] page ids, padded with 0
    query_scatter: torch.Tensor  # [Tg] each token's row in the padded [Bg * max_query_len]
    # [Bg, 1, max_query_len, max_kv_len] True where a query may attend; None when every query
    # sees every key (decodes of equal context length)
    mask: torch.Tensor | None
    num_seqs: int
    max_query_len: int
    max_kv_len: int
    # A lone sequence whose pages are consecutive reads its keys as one slice of the pool's
    # slots, [start, stop), not a gathered copy.
    slot_range: tuple[int, int] | None = None
    # [Bg] context length of each decode, where the group runs the compiled paged kernel.
    kv_lens: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] position of each flat token in its sequence
    slot_mapping: torch.Tensor  # [T] flat cache slot each new token's K/V goes to
    groups: list[AttentionGroup]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
        paged_kernel: bool = False,
    ) -> AttentionMetadata:
        """`context_lens[i]`: tokens of request i already cached before this step.
        `paged_kernel` (compiled steps): tokens read their pages through the paged kernel, but
        for prompts past `KERNEL_MAX_CONTEXT`, which share one SDPA call; otherwise requests share
        SDPA calls with requests of alike lengths (`_alike`)."""
        starts, seq_of_token, positions = _token_positions(query_lens, context_lens)
        table = _page_table(
            page_tables, max(c + q for c, q in zip(context_lens, query_lens)), page_size
        )
        slot_mapping = _slots(table[seq_of_token], positions, page_size)
        decodes = [i for i, n in enumerate(query_lens) if n == 1]
        prompts = [i for i, n in enumerate(query_lens) if n > 1]
        if paged_kernel:  # SDPA only for the prompts past the kernel's reach
            prompts = [i for i in prompts if context_lens[i] + query_lens[i] > KERNEL_MAX_CONTEXT]
        group_args = (query_lens, context_lens, page_tables, table, starts, page_size, device)
        if paged_kernel:
            calls = [prompts]
        else:
            sizes = [(q, c + q) for q, c in zip(query_lens, context_lens)]
            calls = _alike(decodes, sizes) + _alike(prompts, sizes)
        groups = [_group(seqs, *group_args) for seqs in calls if seqs]
        if paged_kernel:
            # Every other token is a row of the kernel, with its sequence's pages and, as
            # context, the tokens up to itself (causal), whether it decodes or is a prompt's.
            rows = torch.isin(seq_of_token, torch.tensor(prompts, dtype=torch.long), invert=True)
            rows = rows.nonzero()[:, 0]
            if len(rows):
                kv_lens = positions[rows] + 1
                kernel_rows = _paged_rows(
                    rows, table[seq_of_token[rows]], kv_lens, page_size, device
                )
                groups.insert(0, kernel_rows)
        return cls(positions.to(device), slot_mapping.to(device), groups)


@dataclass
class DecodeMetadata:
    """A step of short queries as tensors only, one row per token: the compiled decode graph
    takes it as an input, so the cache writes and the paged kernel are traced into that graph
    with no Python between layers. A row is one token with its sequence's page table and, as
    its context, the tokens up to itself: every row's K/V is written before any row attends, so
    a request's later tokens (drafts to verify) see its earlier ones. Page tables have at least
    two columns (padding pages are masked out by `kv_lens`), so one compilation fits every
    step."""

    positions: torch.Tensor  # [T] position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] flat cache slot its K/V goes to
    page_tables: torch.Tensor  # [T, P] its sequence's page ids, padded with 0
    kv_lens: torch.Tensor  # [T] context length including the token

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device,
    ) -> DecodeMetadata:
        """`query_lens[i]` tokens of sequence i after its `context_lens[i]` cached ones."""
        _, seq_of_token, positions = _token_positions(query_lens, context_lens)
        max_kv = max(c + q for c, q in zip(context_lens, query_lens))
        table = _page_table(page_tables, max(2 * page_size, max_kv), page_size)[seq_of_token]
        slots = _slots(table, positions, page_size)
        return cls(
            positions.to(device), slots.to(device), table.to(device), (positions + 1).to(device)
        )


def _token_positions(
    query_lens: list[int], context_lens: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a step's flat tokens: where each request's tokens start, each token's request, and
    its position in that request's sequence."""
    q_lens = torch.tensor(query_lens)
    starts = torch.cumsum(q_lens, 0) - q_lens
    seq_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), q_lens)
    offset_in_seq = torch.arange(len(seq_of_token)) - starts[seq_of_token]
    return starts, seq_of_token, torch.tensor(context_lens)[seq_of_token] + offset_in_seq


def _slots(token_tables: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """The flat cache slot of each token, from its own row of page ids and its position."""
    rows = torch.arange(len(positions))
    return token_tables[rows, positions // page_size] * page_size + positions % page_size


def _page_table(page_tables: list[list[int]], max_kv: int, page_size: int) -> torch.Tensor:
    pages = -(-max_kv // page_size)
    rows = [row[:pages] + [0] * (pages - len(row[:pages])) for row in page_tables]
    return torch.tensor(rows, dtype=torch.long)


def _alike(seqs: list[int], sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Requests in groups within which the longest query is at most twice the shortest, and the
    longest keys (context + query) at most twice the shortest, each group in step order: a
    group's queries and keys are padded to its longest, and one long context among short ones
    made every decode read as many keys (a 2k-token context beside six of ~100 made a one-thread
    eager step 5-6x as long), as a 512-token chunk made a short prompt beside it compute 512
    queries. Requests alike stay in one call."""
    groups: list[list[int]] = []
    low = high = (0, 0)  # the last group's shortest and longest query and keys
    for seq in sorted(seqs, key=sizes.__getitem__):
        size = sizes[seq]
        wider = tuple(map(min, low, size)), tuple(map(max, high, size))
        if groups and all(longest <= 2 * shortest for shortest, longest in zip(*wider)):
            groups[-1].append(seq)
            low, high = wider
        else:
            groups.append([seq])
            low = high = size
    return [sorted(group) for group in groups]


def _group(
    seqs: list[int],
    query_lens: list[int],
    context_lens: list[int],
    page_tables: list[list[int]],
    table: torch.Tensor,
    starts: torch.Tensor,
    page_size: int,
    device: torch.device,
) -> AttentionGroup:
    q_lens = torch.tensor([query_lens[s] for s in seqs])
    ctx = torch.tensor([context_lens[s] for s in seqs])
    max_q, max_kv = int(q_lens.max()), int((q_lens + ctx).max())
    local_seq = torch.repeat_interleave(torch.arange(len(seqs)), q_lens)
    offset = torch.arange(int(q_lens.sum())) - (torch.cumsum(q_lens, 0) - q_lens)[local_seq]
    token_index = starts[torch.tensor(seqs)][local_seq] + offset
    pages = -(-max_kv // page_size)
    uniform_decodes = max_q == 1 and len({context_lens[s] for s in seqs}) == 1
    return AttentionGroup(
        token_index=token_index.to(device),
        page_tables=table[torch.tensor(seqs), :pages].to(device),
        query_scatter=(local_seq * max_q + offset).to(device),
        mask=None if uniform_decodes else _mask(local_seq, offset, ctx, max_q, max_kv, device),
        num_seqs=len(seqs),
        max_query_len=max_q,
        max_kv_len=max_kv,
        slot_range=_consecutive_slots(page_tables[seqs[0]][:pages], max_kv, page_size)
        if len(seqs) == 1
        else None,
    )


def _paged_rows(
    token_index: torch.Tensor,
    tables: torch.Tensor,
    kv_lens: torch.Tensor,
    page_size: int,
    device: torch.device,
) -> AttentionGroup:
    """Rows of the paged kernel: one query each, with its page table and context length, and at
    least two page columns (padding pages are masked out) so one compiled kernel fits every
    step. One kernel for every row keeps a token's attention independent of the batch around it
    and of how its prompt was chunked."""
    pages = max(2, -(-int(kv_lens.max()) // page_size))
    tables = torch.nn.functional.pad(tables, (0, pages - tables.shape[1])).to(device)
    lens = kv_lens.to(device)
    _mark_paged_decode_sizes(tables, lens)
    return AttentionGroup(
        token_index=token_index.to(device),
        page_tables=tables,
        query_scatter=torch.arange(len(token_index), device=device),
        mask=None,
        num_seqs=len(token_index),
        max_query_len=1,
        max_kv_len=int(kv_lens.max()),
        kv_lens=lens,
    )


def _mask(
    local_seq: torch.Tensor,
    offset: torch.Tensor,
    ctx: torch.Tensor,
    max_q: int,
    max_kv: int,
    device: torch.device,
) -> torch.Tensor:
    query_pos = torch.zeros(len(ctx), max_q, dtype=torch.long)
    query_pos[local_seq, offset] = ctx[local_seq] + offset
    mask = torch.arange(max_kv).view(1, 1, -1) <= query_pos.unsqueeze(-1)
    return mask.unsqueeze(1).to(device)


def _consecutive_slots(pages: list[int], kv_len: int, page_size: int) -> tuple[int, int] | None:
    first = pages[0]
    if pages != list(range(first, first + len(pages))):
        return None
    return first * page_size, first * page_size + kv_len


def _mark_paged_decode_sizes(page_tables: torch.Tensor, kv_lens: torch.Tensor) -> None:
    """The paged kernel, compiled on its own, is dynamic in its rows (unbacked: a lone sequence
    runs the very kernel a batch runs, so its numbers do not depend on the batch) and pages per
    row (at least 2, so never specialized to 1): one compilation serves every step."""
    torch._dynamo.decorators.mark_unbacked(page_tables, 0)
    torch._dynamo.decorators.mark_unbacked(kv_lens, 0)
    torch._dynamo.mark_dynamic(page_tables, 1)
