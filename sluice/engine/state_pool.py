"""Request-level state slots for hybrid models. Plain Python, no torch.

A slot holds every recurrent layer's conv and SSM/delta state for one sequence. Each slot has one
owner at a time: a running request (for its whole life, until it finishes or is preempted) or a
prefix-cache node (a checkpoint of the state after that node's last token).

The pool decides; the model side moves the bytes. Zeroing a request's fresh slot, copying a
checkpoint into it on a cache hit and copying a request's state into a new checkpoint are queued
here as ops; the scheduler hands them over in the next step's input, applied in order before its
forward. Order is all that makes reuse safe: a checkpoint evicted right after a hit was copied
from before it is reused.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple


class OutOfSlotsError(RuntimeError):
    pass


class StateOp(NamedTuple):
    source: int | None  # None: zero the target
    target: int


class StatePool:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"the state pool needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._allocated = [False] * num_slots
        self._ops: list[StateOp] = []

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise OutOfSlotsError(f"all {self.num_slots} state slots are in use")
        slot = self._free.popleft()
        self._allocated[slot] = True
        return slot

    def free(self, slot: int) -> None:
        assert self._allocated[slot], f"state slot {slot} freed twice"
        self._allocated[slot] = False
        self._free.append(slot)

    def is_allocated(self, slot: int) -> bool:
        return self._allocated[slot]

    def zero(self, slot: int) -> None:
        self._ops.append(StateOp(None, slot))

    def copy(self, source: int, target: int) -> None:
        self._ops.append(StateOp(source, target))

    def take_ops(self) -> list[StateOp]:
        ops, self._ops = self._ops, []
        return ops
