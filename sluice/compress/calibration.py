"""Calibration inputs, one decoder layer at a time: each layer's linear inputs are gathered as
X^T X (the Hessian SparseGPT needs; its diagonal gives Wanda's input norms) over a few hundred to
a few thousand tokens, while only the hidden states between two layers are held."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sluice.layers.linear import Linear


def calibration_sequences(token_ids: list[int], tokens: int, length: int) -> list[list[int]]:
    """The last `tokens` ids cut into sequences of `length` (the last may be shorter): the text's
    end, so that `sluice eval`, which scores a text's beginning, can use the same text unseen."""
    ids = token_ids[-tokens:]
    if not ids:
        raise ValueError("the calibration text has no tokens")
    return [ids[start : start + length] for start in range(0, len(ids), length)]


def linears_of(layer: nn.Module) -> dict[str, Linear]:
    return {name: module for name, module in layer.named_modules() if isinstance(module, Linear)}


@contextmanager
def input_hessians(linears: dict[str, Linear]) -> Iterator[dict[str, Tensor]]:
    """While open, every call of each linear adds X^T X of its input to `hessians[name]`."""
    hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}

    def recorder(name: str):
        def record(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].reshape(-1, module.in_features).float()
            hessians[name].addmm_(x.T, x)

        return record

    handles = [m.register_forward_pre_hook(recorder(name)) for name, m in linears.items()]
    try:
        yield hessians
    finally:
        for handle in handles:
            handle.remove()
