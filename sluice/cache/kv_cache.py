"""Every attention layer's K and V pages, owned by one object per engine.

K and V are one tensor each, `[num_layers, num_pages, page_size, kv_heads, head_dim]`, taken
from calloc (`lazy_zeros`), so only pages actually written are resident. A layer reaches its
pool by its index among the model's attention layers (`pools(layer)`: views, no copies). One
tensor per K and V, rather than one per layer, is what a compiled step takes as its input: two
tensors to guard and to pass whatever the depth, and engines sharing a model each hand in their
own cache to the same graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sluice.config import ModelConfig
from sluice.memory import lazy_zeros


@dataclass
class KVCache:
    k: torch.Tensor  # [num_layers, num_pages, page_size, kv_heads, head_dim]
    v: torch.Tensor
    # Per layer, the pools [num_pages, page_size, kv_heads, dim] and the same memory as flat token
    # slots [num_pages * page_size, kv_heads, dim]: views made once, for the eager paths.
    _pools: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)
    _slots: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._pools = list(zip(self.k.unbind(0), self.v.unbind(0)))
        self._slots = [(k.flatten(0, 1), v.flatten(0, 1)) for k, v in self._pools]
        # One compilation serves caches of every size: the decode graph takes K and V whole,
        # the paged kernel compiled on its own a layer's pools.
        for pool in (self.k, self.v):
            torch._dynamo.mark_dynamic(pool, 1)
        for pools in self._pools:
            for pool in pools:
                torch._dynamo.mark_dynamic(pool, 0)

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVCache:
        """Zeroed pools for every attention layer of a model of `config`."""
        shape = (
            config.num_attention_layers,
            num_pages,
            page_size,
            config.num_kv_heads,
            config.head_dim,
        )
        return cls(lazy_zeros(shape, dtype, device), lazy_zeros(shape, dtype, device))

    @property
    def num_pages(self) -> int:
        return self.k.shape[1]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V pools, [num_pages, page_size, kv_heads, head_dim]."""
        return self._pools[layer]

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V pools as flat token slots, [num_pages * page_size, ...]."""
        return self._slots[layer]

    def export_pages(self, page_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the pages `page_ids` of every layer, K and V: [num_layers, len(page_ids),
        page_size, kv_heads, head_dim] each (what a transfer to another cache carries)."""
        index = torch.tensor(page_ids, dtype=torch.long, device=self.k.device)
        return self.k.index_select(1, index), self.v.index_select(1, index)

    def import_pages(self, page_ids: list[int], pages: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Write exported pages (`export_pages`' result) into this cache's pages `page_ids`."""
        index = torch.tensor(page_ids, dtype=torch.long, device=self.k.device)
        for pool, exported in zip((self.k, self.v), pages, strict=True):
            pool.index_copy_(1, index, exported.to(pool.device, pool.dtype))
