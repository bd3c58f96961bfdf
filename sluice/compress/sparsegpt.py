"""SparseGPT (Frantar & Alistarh, 2023): prune a layer and update the weights it keeps so that
the layer's output on the calibration inputs changes least.

Columns are pruned left to right; each pruned (or quantized) weight's error is spread over the
columns still to come through the inverse Hessian of the inputs (the OBS update), in blocks of
`block_size` columns with the updates to later blocks applied lazily, as in the paper. With
`quantize_group`, kept weights are also rounded to 4 bits as they are reached (GPTQ's error
feedback); a group's scale and offset come from its kept weights when the group is reached, so
its 2:4 masks are chosen then too (without quantization, every four columns).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sluice.compress.masks import Sparsity

DEFAULT_BLOCK_SIZE = 128
DEFAULT_DAMPING = 0.01


def inverse_hessian_factor(hessian: Tensor, damping: float = DEFAULT_DAMPING) -> Tensor:
    """The upper Cholesky factor of (H + damping * mean(diag H) * I)^-1; inputs that were never
    non-zero get a unit diagonal (their weights see no input and are pruned freely)."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h += damping * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float()


def sparsegpt(
    weight: Tensor,
    hessian: Tensor,
    sparsity: Sparsity,
    quantize_group: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    damping: float = DEFAULT_DAMPING,
) -> Tensor:
    """The pruned (and, with `quantize_group`, 4-bit rounded) weight, float32 [out, in].
    `hessian` is X^T X over the calibration inputs X [tokens, in]."""
    w = weight.float().clone()
    w[:, torch.diag(hessian) == 0] = 0
    hinv = inverse_hessian_factor(hessian, damping)
    mask_step = quantize_group or sparsity.group
    if quantize_group and block_size % quantize_group:
        raise ValueError(f"block size {block_size} is not a multiple of group {quantize_group}")
    columns = w.shape[1]
    for b1 in range(0, columns, block_size):
        b2 = min(b1 + block_size, columns)
        block, hblock = w[:, b1:b2].clone(), hinv[b1:b2, b1:b2]
        done, errors = torch.zeros_like(block), torch.zeros_like(block)
        pruned = _block_mask(block, hblock, sparsity)
        grid = None
        for i in range(b2 - b1):
            if i % mask_step == 0:
                if sparsity.structured:
                    _choose_2_of_4(block, hblock, pruned, i, mask_step)
                if quantize_group:
                    grid = _grid(
                        block[:, i : i + quantize_group], pruned[:, i : i + quantize_group]
                    )
            column = block[:, i]
            kept = torch.where(pruned[:, i], 0.0, column)
            if grid is not None:
                kept = torch.where(pruned[:, i], 0.0, _round_to(grid, column))
            error = (column - kept) / hblock[i, i]
            block[:, i:] -= error[:, None] * hblock[i, i:][None, :]
            done[:, i], errors[:, i] = kept, error
        w[:, b1:b2] = done
        w[:, b2:] -= errors @ hinv[b1:b2, b2:]
    return w


def _saliency(block: Tensor, hblock: Tensor) -> Tensor:
    """w^2 / [H^-1]_jj^2: the error pruning each weight alone would add (the OBS criterion)."""
    return block**2 / torch.diag(hblock).reshape(1, -1) ** 2


def _block_mask(block: Tensor, hblock: Tensor, sparsity: Sparsity) -> Tensor:
    """True where pruned: for unstructured sparsity the block's least salient fraction, at once;
    for 2:4 none yet (chosen as the columns are reached)."""
    if sparsity.structured:
        return torch.zeros_like(block, dtype=torch.bool)
    saliency = _saliency(block, hblock).flatten()
    threshold = saliency.sort().values[int(saliency.numel() * sparsity.fraction)]
    return (saliency <= threshold).reshape(block.shape)


def _choose_2_of_4(block: Tensor, hblock: Tensor, pruned: Tensor, start: int, width: int) -> None:
    """Prune the two least salient of every four columns in [start, start + width)."""
    for g in range(start, min(start + width, block.shape[1]), 4):
        saliency = _saliency(block[:, g : g + 4], hblock[g : g + 4, g : g + 4])
        pruned[:, g : g + 4].scatter_(1, saliency.topk(2, dim=1, largest=False).indices, True)


def _grid(values: Tensor, pruned: Tensor) -> tuple[Tensor, Tensor]:
    """Per row (low, scale) of the 4-bit grid over the kept values (as `quantize_kept`)."""
    inf = torch.tensor(float("inf"))
    low = torch.where(pruned, inf, values).amin(dim=1).half().float()
    high = torch.where(pruned, -inf, values).amax(dim=1)
    scale = ((high - low) / 15).half().float()
    return low, torch.where(scale == 0, 1.0, scale)


def _round_to(grid: tuple[Tensor, Tensor], column: Tensor) -> Tensor:
    low, scale = grid
    return torch.round((column - low) / scale).clamp(0, 15) * scale + low
