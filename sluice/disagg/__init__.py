"""Prefill/decode disaggregation: a prefill instance (P) computes a prompt and keeps its KV pages
(and a hybrid model's recurrent state) under a lease; a decode instance (D) pulls what its own
prefix cache lacks over NIXL and decodes. The protocol is vLLM's `kv_transfer_params`, so
vllm-router and llm-d drive sluice unchanged."""
