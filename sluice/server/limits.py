"""The server's default bounds on one request, here so the command line reads them cheaply."""

from __future__ import annotations

# A request may bring this many sequences (prompts x n): OpenAI's largest n, twice over.
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 256

# A body is parsed and validated on the event loop, at a cost that grows with the number of JSON
# values in it: 1 MiB of `[[1],[1],...]` (200k lists) takes ~0.3 s, 4 MiB over a second. A full
# context window fits in 16 bytes a token: English text takes about 4 a token in JSON, escaped
# non-ASCII text up to 12, token ids up to 7. At least 1 MiB, for batches of short prompts.
BYTES_PER_CONTEXT_TOKEN = 16
MIN_BODY_BYTES = 2**20


def default_max_body_bytes(max_model_len: int) -> int:
    return max(MIN_BODY_BYTES, BYTES_PER_CONTEXT_TOKEN * max_model_len)
