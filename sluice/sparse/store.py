"""One MLP layer's weights regrouped by intermediate neuron, for computing a subset of neurons.

Neuron j owns gate row j, up row j and down column j. `NeuronStore.neuron_tensors` hold them
indexed by neuron along their first axis, so any subset (or the weight cache's copy of one) is a
selection of rows. Two stores: `Int4NeuronStore` keeps 4-bit weights as their quantized kernel
does (exact: the same codes, scales and offsets) for sluice's gathered kernels; `DenseNeuronStore`
keeps dense weights and runs torch ops (dense models, and where no C++ compiler builds the
kernels).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from sluice.kernels import sparse_mlp_cpu
from sluice.layers.linear import Linear
from sluice.layers.quant import QuantizedWeight, _PlanarInt4Weight

GROUP = 32  # the kernels' quantization group, as every GGUF 4-bit format's


class NeuronStore:
    """`rows` index the neuron tensors (the store's own, or a weight cache's copy of them);
    `neurons` name the neurons at those rows (the int4 down projection's scale groups)."""

    neuron_tensors: list[Tensor]
    every_neuron: Tensor  # rows 0..I-1 of the store's own tensors

    def gate_up(self, x: Tensor, tensors: list[Tensor], rows: Tensor, threshold: float) -> Tensor:
        """h = silu(gate . x) * (up . x) [n] of the neurons at `rows`, 0 where |h| <= threshold."""
        raise NotImplementedError

    def down(self, h: Tensor, tensors: list[Tensor], rows: Tensor, neurons: Tensor) -> Tensor:
        """sum over k of h[k] * the down column stored at rows[k]: [hidden]."""
        raise NotImplementedError


class DenseNeuronStore(NeuronStore):
    def __init__(self, gate: Tensor, up: Tensor, down: Tensor) -> None:
        # down column j stored as row j: a gather reads contiguous memory
        self.neuron_tensors = [gate.float(), up.float(), down.float().T.contiguous()]
        self.every_neuron = torch.arange(gate.shape[0])

    def gate_up(self, x: Tensor, tensors: list[Tensor], rows: Tensor, threshold: float) -> Tensor:
        if rows is self.every_neuron:  # no gathered copy of the whole layer
            gate, up = tensors[0], tensors[1]
        else:
            gate, up = tensors[0][rows], tensors[1][rows]
        h = F.silu(gate @ x) * (up @ x)
        return torch.where(h.abs() > threshold, h, 0.0)

    def down(self, h: Tensor, tensors: list[Tensor], rows: Tensor, neurons: Tensor) -> Tensor:
        return h @ tensors[2][rows]


class Int4NeuronStore(NeuronStore):
    """Codes as the kernels read them (see sparse_mlp_cpu.cpp): gate and up rows side by side,
    [neurons, 2, hidden / 2] with (scale, offset) [neurons, 2, hidden / 32, 2]; down columns as
    rows [neurons, hidden / 2], their scales and offsets [neurons / 32, hidden] shared by the
    32 neurons of a group (not per neuron: the down weight's groups run along the neurons)."""

    def __init__(self, gate_up: _PlanarInt4Weight, down: _PlanarInt4Weight) -> None:
        inter = down.in_features
        codes, scales, offsets = _unpadded(gate_up)
        scale_offset = torch.stack([scales, offsets], dim=-1)  # [2I, G, 2]
        self.neuron_tensors = [
            _packed(codes).view(2, inter, -1).transpose(0, 1).contiguous(),
            scale_offset.view(2, inter, -1, 2).transpose(0, 1).contiguous(),
        ]
        codes, scales, offsets = _unpadded(down)  # [hidden, I], [hidden, I / 32]
        self.neuron_tensors.append(_packed(codes.T.contiguous()))
        self.down_scales = scales.T.contiguous()
        self.down_offsets = offsets.T.contiguous()
        self.every_neuron = torch.arange(inter)

    def gate_up(self, x: Tensor, tensors: list[Tensor], rows: Tensor, threshold: float) -> Tensor:
        return sparse_mlp_cpu.gathered_gate_up(x, tensors[0], tensors[1], rows, threshold)

    def down(self, h: Tensor, tensors: list[Tensor], rows: Tensor, neurons: Tensor) -> Tensor:
        groups = torch.div(neurons, GROUP, rounding_mode="floor")
        return sparse_mlp_cpu.gathered_down(
            h, tensors[2], self.down_scales, self.down_offsets, rows, groups
        )


def neuron_store(gate_up_proj: Linear, down_proj: Linear) -> NeuronStore:
    """The store for a SwiGLU layer's weights: 4-bit where both are one plane of 32-groups on
    the CPU and the kernels build, else dense (dequantized once). Made once per layer: engines
    sharing a model share its stores."""
    if gate_up_proj not in _stores:
        _stores[gate_up_proj] = _new_store(gate_up_proj, down_proj)
    return _stores[gate_up_proj]


_stores: weakref.WeakKeyDictionary[Linear, NeuronStore] = weakref.WeakKeyDictionary()


def _new_store(gate_up_proj: Linear, down_proj: Linear) -> NeuronStore:
    gate_up, down = gate_up_proj.qweight, down_proj.qweight
    if _kernel_fits(gate_up) and _kernel_fits(down) and sparse_mlp_cpu.available():
        return Int4NeuronStore(gate_up, down)
    gate, up = dense_weight(gate_up_proj).chunk(2)
    return DenseNeuronStore(gate, up, dense_weight(down_proj))


def _kernel_fits(weight: QuantizedWeight | None) -> bool:
    return (
        isinstance(weight, _PlanarInt4Weight)
        and weight.planes == 1
        and weight.group_size == GROUP
        and weight.out_features % 64 == 0
        and weight.in_features % 64 == 0
    )


def dense_weight(linear: Linear) -> Tensor:
    """The weight as a dense [out, in] tensor (4-bit ones dequantized)."""
    return linear.qweight.dequantize() if linear.qweight is not None else linear.weight.detach()


def _unpadded(weight: _PlanarInt4Weight) -> tuple[Tensor, Tensor, Tensor]:
    codes, scales, offsets = weight._stored()
    rows = weight.out_features
    return codes[:rows], scales[:rows].contiguous(), offsets[:rows].contiguous()


def _packed(codes: Tensor) -> Tensor:
    """Codes [rows, n] (0..15) -> uint8 [rows, n / 2]: per group of 32, byte b holds element b
    (low nibble) and element b + 16 (high nibble)."""
    groups = codes.to(torch.uint8).view(codes.shape[0], -1, 2, GROUP // 2)
    return (groups[:, :, 0] | (groups[:, :, 1] << 4)).reshape(codes.shape[0], -1)
