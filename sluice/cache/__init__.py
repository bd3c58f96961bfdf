"""The memory of a model's caches: KV pages of attention layers, state slots of recurrent ones."""
