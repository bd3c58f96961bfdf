"""The transformers baseline of `sluice bench offline`: HF `generate` on the same checkpoint.

transformers dequantizes a GGUF to dense weights as it loads it. Requests run in fixed-size
batches in workload order, left-padded. A batch decodes until its longest request is done:
`min_new_tokens = max_new_tokens` = that length, so EOS cannot end it early and every row
decodes exactly that many tokens. Shorter requests' extra tokens are wasted work, which is what
static batching costs; the caller counts only the tokens each request asked for.
"""

from __future__ import annotations

import sys
import time

import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

from sluice.bench.datasets import BenchRequest
from sluice.loaders.model_path import resolve_model

_PAD_ID = 0  # padded positions are masked out, so any id will do


def load_hf_model(model: str | None, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    path = resolve_model(model)
    if path.suffix == ".gguf":
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return loaded.to(device).eval()


def transformers_generate(
    model: PreTrainedModel, requests: list[BenchRequest], batch_size: int
) -> float:
    """Run every request in batches of `batch_size`; returns the wall seconds it took."""
    bar = tqdm(total=len(requests), desc="transformers", file=sys.stderr)
    start = time.perf_counter()
    for first in range(0, len(requests), batch_size):
        batch = requests[first : first + batch_size]
        _generate_batch(model, batch)
        bar.update(len(batch))
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    wall_s = time.perf_counter() - start
    bar.close()
    return wall_s


@torch.inference_mode()
def _generate_batch(model: PreTrainedModel, batch: list[BenchRequest]) -> None:
    width = max(r.prompt_len for r in batch)
    input_ids = torch.full((len(batch), width), _PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, request in enumerate(batch):
        input_ids[row, width - request.prompt_len :] = torch.tensor(request.prompt_ids)
        attention_mask[row, width - request.prompt_len :] = 1
    new_tokens = max(r.output_len for r in batch)
    output = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=_PAD_ID,
    )
    if output.shape[1] != width + new_tokens:
        raise RuntimeError(
            f"transformers generated {output.shape[1] - width} tokens, expected {new_tokens}"
        )
