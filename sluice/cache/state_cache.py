"""Every recurrent layer's state, by slot, owned by one object per engine.

A hybrid model's recurrent layers (Gated DeltaNet, Mamba2) each declare their per-slot state
(`state_spec`: conv state, SSM/delta state); the cache holds `[num_slots, *shape]` tensors of
each, from calloc (`lazy_zeros`). A layer reaches its tensors by its index among the model's
recurrent layers. Slot `s` of every tensor together is one request's state (or a prefix-cache
checkpoint): `engine/state_pool.py` decides who owns which slot and queues the zeroing and
copying that `apply` carries out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sluice.engine.state_pool import StateOp
from sluice.layers.state import StateSpec
from sluice.memory import lazy_zeros


@dataclass
class StateCache:
    layers: list[dict[str, torch.Tensor]]  # per recurrent layer: state name -> [num_slots, ...]

    @classmethod
    def allocate(cls, specs: list[StateSpec], num_slots: int, device: torch.device) -> StateCache:
        """Zeroed state of `num_slots` slots for layers declaring `specs`, in layer order."""
        return cls(
            [
                {
                    name: lazy_zeros((num_slots, *shape), dtype, device)
                    for name, (shape, dtype) in spec.items()
                }
                for spec in specs
            ]
        )

    def layer(self, index: int) -> dict[str, torch.Tensor]:
        return self.layers[index]

    def tensors(self) -> list[torch.Tensor]:
        """Every state tensor, in layer order (what a KV transport registers)."""
        return [tensor for layer in self.layers for tensor in layer.values()]

    def apply(self, ops: list[StateOp]) -> None:
        """Zero fresh slots and copy checkpoints, in the order the pool queued them."""
        for op in ops:
            for tensor in self.tensors():
                if op.source is None:
                    tensor[op.target].zero_()
                else:
                    tensor[op.target].copy_(tensor[op.source])

    def export_slot(self, slot: int) -> list[torch.Tensor]:
        """Copies of slot `slot` of every state tensor, in layer order."""
        return [tensor[slot].clone() for tensor in self.tensors()]

    def import_slot(self, slot: int, state: list[torch.Tensor]) -> None:
        """Write an exported slot (`export_slot`'s result) into this cache's slot `slot`."""
        for tensor, exported in zip(self.tensors(), state, strict=True):
            tensor[slot].copy_(exported)
