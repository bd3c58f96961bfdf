"""The server's default bounds on one request, here so the command line reads them cheaply."""

from __future__ import annotations

# A request may bring this many sequences (prompts x n): OpenAI's largest n, twice over.
DEFAULT_MAX_SEQUENCES_PER_REQUEST = 256

# A full context window of text is about 4 bytes a token in English, up to 12 when the JSON
# escapes non-ASCII text, and token ids take up to 7 bytes each: 64 bytes a token leaves room for
# the window several times over, with its chat envelope. Never less than 4 MiB, a batch's worth.
BYTES_PER_CONTEXT_TOKEN = 64
MIN_BODY_BYTES = 4 * 2**20


def default_max_body_bytes(max_model_len: int) -> int:
    return max(MIN_BODY_BYTES, BYTES_PER_CONTEXT_TOKEN * max_model_len)
