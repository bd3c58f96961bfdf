"""Attention over the paged KV cache: per-step metadata and the backends that compute it."""
