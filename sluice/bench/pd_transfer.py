"""`sluice bench pd-transfer`: pulling a prompt's KV pages from a prefill engine against
recomputing them, by prompt length.

Two engines over one loaded model in this process, a prefill (P) and a decode (D) instance,
their caches registered with NIXL (UCX; set `UCX_TLS=tcp` for loopback TCP). Per prompt length
and repeat, interleaved: P prefills a random prompt (timed: what D would spend recomputing it,
on the same threads), then D pulls its pages (timed from the pull's start to its completion, the
transfer alone; D's own prefix cache is emptied first so every page is pulled). A first, untimed
pull makes the connection. One JSON line per length.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from sluice.bench.report import Record, emit
from sluice.cli import engine_kwargs
from sluice.config import EngineConfig
from sluice.disagg.params import TransferRequest
from sluice.disagg.role import DisaggConfig
from sluice.engine.engine import Engine
from sluice.loaders.model_path import resolve_model
from sluice.models.registry import load_model
from sluice.sampling_params import SamplingParams


def _engines(args: argparse.Namespace) -> tuple[Engine, Engine]:
    config = EngineConfig.create(**engine_kwargs(args))
    device = config.torch_device()
    loaded = load_model(
        resolve_model(config.model), device, config.torch_dtype(device), config.quantization
    )
    prefill, decode = (
        Engine(config, loaded, DisaggConfig(role, model_name=config.model))
        for role in ("prefill", "decode")
    )
    decode.disagg.add_peer(prefill.disagg.metadata())
    return prefill, decode


def _prefill(prefill: Engine, prompt: list[int], request_id: str) -> tuple[float, dict]:
    """Seconds P took to compute the prompt, and its answer for D."""
    start = time.perf_counter()
    prefill.add_request(
        request_id,
        prefill.make_request(
            prompt, SamplingParams(max_tokens=1), transfer=TransferRequest(remote_decode=True)
        ),
    )
    outputs = []
    while prefill.has_unfinished_requests():
        outputs += prefill.step()
    return time.perf_counter() - start, outputs[-1].kv_transfer_params


def _pull(prefill: Engine, decode: Engine, prompt: list[int], params: dict, request_id: str):
    """Seconds the pull took (the transfer alone), and the bytes it moved."""
    stats = decode.disagg.pulls.stats
    seconds, num_bytes, completed = stats.seconds, stats.bytes, stats.completed
    request = decode.make_request(
        prompt, SamplingParams(max_tokens=2), transfer=TransferRequest.parse(params)
    )
    decode.add_request(request_id, request)
    while decode.has_unfinished_requests():
        prefill.step()  # P progresses UCX and takes the completion notice
        decode.step()
    if stats.completed != completed + 1:
        raise RuntimeError(f"the pull failed: {stats.failures}")
    return stats.seconds - seconds, stats.bytes - num_bytes


def main(args: argparse.Namespace) -> int:
    prefill, decode = _engines(args)
    rng = random.Random(args.seed)
    vocab = prefill.model_config.vocab_size
    warmup = [rng.randrange(vocab) for _ in range(16)]  # UCX connects on the first pull
    _pull(prefill, decode, warmup, _prefill(prefill, warmup, "warmup")[1], "warmup")
    for length in args.prompt_lens:
        recompute, pull, moved = [], [], 0
        for repeat in range(args.repeats):
            prompt = [rng.randrange(vocab) for _ in range(length)]
            request_id = f"{length}-{repeat}"
            seconds, params = _prefill(prefill, prompt, request_id)
            recompute.append(seconds)
            if decode.prefix_cache is not None:
                decode.prefix_cache.reset()
            seconds, moved = _pull(prefill, decode, prompt, params, request_id)
            pull.append(seconds)
        record: Record = {
            "bench": "pd-transfer",
            "prompt_len": length,
            "repeats": args.repeats,
            "bytes_pulled": moved,
            "recompute_s_median": statistics.median(recompute),
            "pull_s_median": statistics.median(pull),
            "pull_GBps": moved / statistics.median(pull) / 1e9,
            "recompute_over_pull": statistics.median(recompute) / statistics.median(pull),
        }
        emit(record, args.output_file)
    return 0
