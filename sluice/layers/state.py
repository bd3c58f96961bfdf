"""How recurrent layers (Gated DeltaNet, Mamba2) see one engine step.

Every request of a hybrid model owns a state slot. Each recurrent layer's states are tensors
indexed by slot (`[num_slots, ...]`, held by the state cache, `cache/state_cache.py`), and
the slot always holds the state after the request's already-computed tokens: the runner zeroes
it before a request's first token and copies a prefix-cache checkpoint into it on a cache hit.
A layer reads the slot, runs this step's tokens and writes the new state back in place.

Decodes (one token each) run together as one batched recurrent step; prefill chunks run one
request at a time through the chunked (parallel) form, since their lengths differ.

A verify run (the request's last token and k drafts, speculative decoding) must leave the state
after each of its 1 + k tokens, since only the model's samples tell which of them is kept (a
recurrent state cannot be rolled back). It runs as 1 + k recurrent steps, each reading the state
the one before wrote: token j writes its state to the request's verify slot j and the last token
to the request's own slot. Token j of every verify run steps together with the decodes' tokens
(j = 0) or with the other runs' tokens j; each step is batched like a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrefillRun:
    """One request's prefill chunk: flat tokens [start, end) of the step, its state slot."""

    start: int
    end: int
    slot: int


@dataclass(frozen=True)
class TokenStep:
    """One token of each of several requests, run as one batched recurrent step: their rows in
    the step's flat token order, the slots their states are read from and written to."""

    token_index: torch.Tensor  # [B]
    read_slots: torch.Tensor  # [B]
    write_slots: torch.Tensor  # [B]


@dataclass
class StateMetadata:
    token_steps: list[TokenStep]  # run in order: a verify run's step reads the one before's
    prefills: list[PrefillRun]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        slots: list[int],
        device: torch.device,
        verify_slots: list[list[int]] | None = None,
    ) -> StateMetadata:
        """`query_lens[i]` tokens of request i run this step, in order, with state `slots[i]`.
        A request with `verify_slots[i]` (k slots for its 1 + k tokens) runs a verify run."""
        steps: list[tuple[list[int], list[int], list[int]]] = []  # rows, reads, writes
        prefills: list[PrefillRun] = []
        start = 0
        for i, (n, slot) in enumerate(zip(query_lens, slots, strict=True)):
            scratch = verify_slots[i] if verify_slots is not None else []
            if n == 1 or scratch:
                assert n == len(scratch) + 1, "a verify run needs a slot per token but the last"
                reads, writes = [slot, *scratch], [*scratch, slot]
                for j in range(n):
                    if j == len(steps):
                        steps.append(([], [], []))
                    for column, value in zip(steps[j], (start + j, reads[j], writes[j])):
                        column.append(value)
            else:
                prefills.append(PrefillRun(start, start + n, slot))
            start += n
        return cls(
            [
                TokenStep(*(torch.tensor(c, dtype=torch.long, device=device) for c in step))
                for step in steps
            ],
            prefills,
        )


StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # state name -> per-slot shape, dtype


def spec_bytes(specs: list[StateSpec]) -> int:
    return sum(
        dtype.itemsize * torch.Size(shape).numel()
        for spec in specs
        for shape, dtype in spec.values()
    )
