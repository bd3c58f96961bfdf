"""How recurrent layers (Gated DeltaNet, Mamba2) see one engine step.

Every request of a hybrid model owns a state slot. Each recurrent layer's states are tensors
indexed by slot (`[num_slots, ...]`, held by the state cache, `cache/state_cache.py`), and
the slot always holds the state after the request's already-computed tokens: the runner zeroes
it before a request's first token and copies a prefix-cache checkpoint into it on a cache hit.
A layer reads the slot, runs this step's tokens and writes the new state back in place.

Decodes (one token each) run together as one batched recurrent step; prefill chunks run one
request at a time through the chunked (parallel) form, since their lengths differ.
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


@dataclass
class StateMetadata:
    decode_token_index: torch.Tensor  # [Bd] the decodes' rows in the step's flat token order
    decode_slots: torch.Tensor  # [Bd] their state slots
    prefills: list[PrefillRun]

    @classmethod
    def build(cls, query_lens: list[int], slots: list[int], device: torch.device) -> StateMetadata:
        """`query_lens[i]` tokens of request i run this step, in order, with state `slots[i]`."""
        decode_rows: list[int] = []
        decode_slots: list[int] = []
        prefills: list[PrefillRun] = []
        start = 0
        for n, slot in zip(query_lens, slots, strict=True):
            if n == 1:
                decode_rows.append(start)
                decode_slots.append(slot)
            else:
                prefills.append(PrefillRun(start, start + n, slot))
            start += n
        return cls(
            decode_token_index=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_slots=torch.tensor(decode_slots, dtype=torch.long, device=device),
            prefills=prefills,
        )

    @property
    def num_decodes(self) -> int:
        return self.decode_slots.numel()


StateSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]  # state name -> per-slot shape, dtype


def spec_bytes(specs: list[StateSpec]) -> int:
    return sum(
        dtype.itemsize * torch.Size(shape).numel()
        for spec in specs
        for shape, dtype in spec.values()
    )
