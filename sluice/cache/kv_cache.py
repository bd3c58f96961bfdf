"""Every attention layer's K and V pages, owned by one object per engine.

Each attention layer has a K and a V pool of its own, `[num_pages, page_size, kv_heads,
head_dim]`, taken from calloc (`lazy_zeros`), so only pages actually written are resident. A
layer reaches its pools by its index among the model's attention layers (`pools(layer)`). One
tensor per layer, rather than one for all layers, is what lets a compiled step write a layer's
pages in place through one kernel shared by every layer: indexing one tensor by layer would bake
the layer's offset into each layer's code (a kernel per layer, thirty times the compile), and
views of one tensor passed as separate inputs would make the graph copy the whole cache to
update them. Engines sharing a model each hand their own cache to the same graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sluice.config import ModelConfig
from sluice.memory import lazy_zeros


@dataclass
class KVCache:
    k: list[torch.Tensor]  # per attention layer, [num_pages, page_size, kv_heads, head_dim]
    v: list[torch.Tensor]
    # Per layer, the same memory as flat token slots [num_pages * page_size, kv_heads, dim]:
    # views made once, for the eager paths.
    _slots: list[tuple[torch.Tensor, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._slots = [(k.flatten(0, 1), v.flatten(0, 1)) for k, v in zip(self.k, self.v)]
        # One compilation serves caches of every size: the page count is dynamic.
        for pool in (*self.k, *self.v):
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
        shape = (num_pages, page_size, config.num_kv_heads, config.head_dim)
        layers = range(config.num_attention_layers)
        return cls(
            [lazy_zeros(shape, dtype, device) for _ in layers],
            [lazy_zeros(shape, dtype, device) for _ in layers],
        )

    @property
    def num_layers(self) -> int:
        return len(self.k)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def pools(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V pools, [num_pages, page_size, kv_heads, head_dim]."""
        return self.k[layer], self.v[layer]

    def slots(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s K and V pools as flat token slots, [num_pages * page_size, ...]."""
        return self._slots[layer]

    def export_pages(self, page_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the pages `page_ids` of every layer, K and V: [num_layers, len(page_ids),
        page_size, kv_heads, head_dim] each (what a transfer to another cache carries)."""
        index = torch.tensor(page_ids, dtype=torch.long, device=self.device)
        return tuple(  # type: ignore[return-value]
            torch.stack([pool.index_select(0, index) for pool in pools])
            for pools in (self.k, self.v)
        )

    def import_pages(self, page_ids: list[int], pages: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Write exported pages (`export_pages`' result) into this cache's pages `page_ids`."""
        index = torch.tensor(page_ids, dtype=torch.long, device=self.device)
        for pools, exported in zip((self.k, self.v), pages, strict=True):
            for pool, layer_pages in zip(pools, exported, strict=True):
                pool.index_copy_(0, index, layer_pages.to(pool.device, pool.dtype))
