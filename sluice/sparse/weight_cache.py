"""A layer's active neurons' weights kept contiguous across tokens (NimbleEdge's index swaps).

Consecutive tokens activate largely the same neurons. The cache keeps the current set's rows
of every neuron tensor of a `NeuronStore` in slots 0..n-1; moving to the next set copies in
only the neurons that entered, into the slots of those that left, and closes the remaining gap
by moving the last slots' neurons down, so the kernels read one contiguous run of memory.
"""

from __future__ import annotations

import torch
from torch import Tensor


class WeightCache:
    def __init__(self, neuron_tensors: list[Tensor]) -> None:
        self.source = neuron_tensors
        num_neurons = neuron_tensors[0].shape[0]
        self.slots = [torch.empty_like(t) for t in neuron_tensors]
        self.slot_of = torch.full((num_neurons,), -1, dtype=torch.long)  # -1: not cached
        self.neuron_at = torch.empty(num_neurons, dtype=torch.long)  # first `size` are valid
        self.size = 0
        self.rows_moved = 0  # neurons copied in or moved, for the statistics

    def update(self, neurons: Tensor) -> Tensor:
        """Make the cache hold exactly `neurons` (distinct ids); returns the neuron in each
        occupied slot, [len(neurons)] (slots 0..len-1)."""
        wanted = torch.zeros_like(self.slot_of, dtype=torch.bool)
        wanted[neurons] = True
        cached = self.slot_of >= 0
        size = int(neurons.shape[0])
        held = self.neuron_at[: self.size]
        # the slots below the new size that need a neuron: left by a leaving one, or new
        left = self.slot_of[cached & ~wanted]
        targets = torch.cat([left[left < size], torch.arange(self.size, max(self.size, size))])
        # what fills them: neurons kept but sitting at or past the new size, then entering ones
        movers = held[size:][wanted[held[size:]]]
        entering = torch.nonzero(wanted & ~cached).flatten()
        moved, copied = targets[: len(movers)], targets[len(movers) :]
        for slots, source in zip(self.slots, self.source):
            slots[moved] = slots[self.slot_of[movers]]
            slots[copied] = source[entering]
        self.slot_of[cached & ~wanted] = -1
        incoming = torch.cat([movers, entering])
        self.slot_of[incoming] = targets
        self.neuron_at[targets] = incoming
        self.size = size
        self.rows_moved += len(incoming)
        return self.neuron_at[:size]
