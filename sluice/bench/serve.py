"""`sluice bench serve`: a load generator for any OpenAI-compatible streaming completions endpoint.

Requests arrive as a Poisson process at `request_rate` (all at once when it is inf), at most
`max_concurrency` of them in flight, each one a streaming `POST {base_url}{endpoint}`. Prompts are
sent as text (or token ids) built with our tokenizer, so sluice, vLLM, SGLang and llama.cpp's
llama-server can all be measured on the same workload; metrics.py defines what is reported.

Output tokens are counted from the server's `usage` when it sends one (we ask for it with
`stream_options.include_usage`), else as one token per chunk that carries text.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import random
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass

import httpx
from tqdm import tqdm

from sluice.bench.datasets import (
    BenchRequest,
    Dataset,
    RandomDataset,
    SharedPrefixDataset,
    load_tokenizer,
)
from sluice.bench.metrics import RequestRecord, ServeMetrics, summarize
from sluice.bench.report import emit, format_table

Clock = Callable[[], float]


@dataclass(frozen=True)
class LoadConfig:
    base_url: str
    endpoint: str = "/v1/completions"
    model: str | None = None  # None: the first model the server lists
    request_rate: float = math.inf  # requests per second
    max_concurrency: int | None = None
    ignore_eos: bool = False
    prompt_format: str = "text"  # "text" or "ids"
    seed: int = 0
    timeout_s: float = 3600.0  # the longest wait for any one read, first token included

    def __post_init__(self) -> None:
        # A relative path keeps every request on base_url; httpx would follow an absolute URL.
        if not self.endpoint.startswith("/"):
            raise ValueError(f"--endpoint must be a path such as /v1/completions: {self.endpoint}")


@dataclass
class LoadResult:
    model: str
    records: list[RequestRecord]
    duration_s: float


def completion_payload(config: LoadConfig, model: str, request: BenchRequest) -> dict:
    payload = {
        "model": model,
        "prompt": request.text if config.prompt_format == "text" else request.prompt_ids,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.ignore_eos:
        # vLLM and SGLang honour ignore_eos with min_tokens; llama-server, ignore_eos with
        # max_tokens (its n_predict). Either way the output is exactly max_tokens long.
        payload |= {"ignore_eos": True, "min_tokens": request.output_len}
    return payload


async def stream_request(
    client: httpx.AsyncClient, endpoint: str, payload: dict, prompt_len: int, clock: Clock
) -> RequestRecord:
    """Send one request and time its stream; failures end up in `record.error`, never raised."""
    record = RequestRecord(prompt_len=prompt_len, start=clock())
    try:
        async with client.stream("POST", endpoint, json=payload) as response:
            if response.status_code == httpx.codes.OK:
                await _read_stream(response, record, clock)
            else:
                body = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {body[:300]}"
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a chunk that is not JSON
        record.error = f"{type(exc).__name__}: {exc}"
    record.end = clock()
    if record.ok and not record.chunk_times:
        record.error = "the stream carried no text"
    return record


async def _read_stream(response: httpx.Response, record: RequestRecord, clock: Clock) -> None:
    usage = None
    async for data in _sse_data(response):
        chunk = json.loads(data)
        if "error" in chunk:
            record.error = f"server error: {chunk['error']}"
            return
        if any(choice.get("text") for choice in chunk.get("choices") or []):
            record.chunk_times.append(clock())
        usage = chunk.get("usage") or usage
    if usage is None:
        record.output_tokens = len(record.chunk_times)
        return
    record.output_tokens = usage.get("completion_tokens") or 0
    record.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


async def _sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The payloads of a server-sent event stream, up to `[DONE]` or the end of the body."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line.removeprefix("data:").strip()
        if data == "[DONE]":
            return
        yield data


def arrival_gaps(count: int, request_rate: float, rng: random.Random) -> list[float]:
    """Seconds to wait before sending each request: 0 for the first, then exponential gaps
    (a Poisson process), or all 0 at an infinite rate."""
    if math.isinf(request_rate):
        return [0.0] * count
    return [0.0] + [rng.expovariate(request_rate) for _ in range(count - 1)]


async def served_model(client: httpx.AsyncClient) -> str:
    response = await client.get("/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def _client(config: LoadConfig) -> httpx.AsyncClient:
    limit = config.max_concurrency  # None: as many connections as requests in flight
    return httpx.AsyncClient(
        base_url=config.base_url,
        timeout=httpx.Timeout(config.timeout_s, connect=30.0),
        limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        trust_env=False,  # no proxy from the environment: talk to base_url and nothing else
    )


async def _warm_up(
    client: httpx.AsyncClient, config: LoadConfig, model: str, warmups: list[BenchRequest]
) -> None:
    """Send each request alone; each must succeed."""
    for warmup in warmups:
        payload = completion_payload(config, model, warmup)
        check = await stream_request(
            client, config.endpoint, payload, warmup.prompt_len, time.perf_counter
        )
        if not check.ok:
            raise RuntimeError(f"warmup request to {config.base_url} failed: {check.error}")


async def run_load(
    config: LoadConfig, requests: list[BenchRequest], warmup: BenchRequest
) -> LoadResult:
    """Send `warmup` alone (it must succeed), then the timed workload."""
    async with _client(config) as client:
        model = config.model or await served_model(client)
        await _warm_up(client, config, model, [warmup])
        gate = (
            asyncio.Semaphore(config.max_concurrency)
            if config.max_concurrency
            else contextlib.nullcontext()
        )
        bar = tqdm(total=len(requests), desc="requests", file=sys.stderr)
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        async def send(request: BenchRequest) -> RequestRecord:
            async with gate:
                payload = completion_payload(config, model, request)
                record = await stream_request(
                    client, config.endpoint, payload, request.prompt_len, clock
                )
            bar.update(1)
            return record

        tasks = []
        for request, gap in zip(
            requests, arrival_gaps(len(requests), config.request_rate, random.Random(config.seed))
        ):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(send(request)))
        records = await asyncio.gather(*tasks)
        duration_s = clock()
        bar.close()
    return LoadResult(model, list(records), duration_s)


@dataclass
class MixedResult:
    model: str
    decodes: list[RequestRecord]
    arrivals: list[RequestRecord]  # in the order of `arrival_times`
    arrival_times: list[float]  # seconds since the start
    duration_s: float

    @property
    def records(self) -> list[RequestRecord]:
        return self.decodes + self.arrivals


async def run_mixed_load(
    config: LoadConfig,
    decodes: list[BenchRequest],
    arrivals: list[BenchRequest],
    concurrency: int,
    warmups: list[BenchRequest],
    lead_s: float,
) -> MixedResult:
    """Steady decodes with arrivals among them: `concurrency` of `decodes` always in flight
    (each one sent as the last ends, in order) while `arrivals` come as a Poisson process at
    `config.request_rate`, the first `lead_s` seconds after the decodes start; once the last
    arrival is answered no decode starts, and the run ends with the last one in flight.
    `warmups` go first, alone."""
    if not arrivals:
        raise ValueError("a mixed load needs at least one arrival")
    async with _client(config) as client:
        model = config.model or await served_model(client)
        await _warm_up(client, config, model, warmups)
        gaps = arrival_gaps(len(arrivals), config.request_rate, random.Random(config.seed))
        times = [lead_s + t for t in itertools.accumulate(gaps)]
        bar = tqdm(total=len(arrivals), desc="arrivals answered", file=sys.stderr)
        supply = iter(decodes)
        arrivals_done = asyncio.Event()
        start = time.perf_counter()

        def clock() -> float:
            return time.perf_counter() - start

        async def send(request: BenchRequest) -> RequestRecord:
            payload = completion_payload(config, model, request)
            return await stream_request(client, config.endpoint, payload, request.prompt_len, clock)

        async def keep_decoding(records: list[RequestRecord]) -> None:
            while not arrivals_done.is_set():
                request = next(supply, None)
                if request is None:
                    raise RuntimeError(f"the {len(decodes)} decodes ran out before the arrivals")
                records.append(await send(request))

        unanswered = len(arrivals)

        async def arrive(at: float, request: BenchRequest) -> RequestRecord:
            nonlocal unanswered
            await asyncio.sleep(max(0.0, at - clock()))
            record = await send(request)
            bar.update(1)
            unanswered -= 1
            # Set here, in the step that stamped the answer's end: waiting for the gather below
            # would let a decode that finished meanwhile start one more after it.
            if unanswered == 0:
                arrivals_done.set()
            return record

        decode_records: list[RequestRecord] = []
        workers = [asyncio.create_task(keep_decoding(decode_records)) for _ in range(concurrency)]
        arrival_records = await asyncio.gather(*map(arrive, times, arrivals))
        await asyncio.gather(*workers)
        bar.close()
    return MixedResult(model, decode_records, list(arrival_records), times, clock())


def dataset_from_args(args: argparse.Namespace) -> Dataset:
    if args.dataset_name == SharedPrefixDataset.name:
        return SharedPrefixDataset(
            num_groups=args.gsp_num_groups,
            prompts_per_group=args.gsp_prompts_per_group,
            system_prompt_len=args.gsp_system_prompt_len,
            question_len=args.gsp_question_len,
            output_len=args.gsp_output_len,
        )
    return RandomDataset(
        num_prompts=args.num_prompts,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
    )


def summary_rows(config: LoadConfig, metrics: ServeMetrics) -> list[tuple[str, object] | str]:
    rows: list[tuple[str, object] | str] = [
        ("Successful requests", metrics.completed),
        ("Failed requests", metrics.failed),
        ("Request rate (req/s)", config.request_rate),
        ("Max concurrency", config.max_concurrency or "unlimited"),
        ("Benchmark duration (s)", metrics.duration_s),
        ("Total input tokens", metrics.input_tokens),
        ("Total generated tokens", metrics.output_tokens),
        ("Input tokens from the prefix cache", metrics.cached_input_tokens),
        ("Request throughput (req/s)", metrics.request_throughput),
        ("Input token throughput (tok/s)", metrics.input_throughput),
        ("Output token throughput (tok/s)", metrics.output_throughput),
    ]
    sections = {
        "ttft": "Time to First Token",
        "tpot": "Time per Output Token (excl. 1st token)",
        "itl": "Inter-token Latency",
        "e2e": "End-to-end Latency",
    }
    for name, heading in sections.items():
        stats = getattr(metrics, name)
        rows += [
            heading,
            (f"Mean {name.upper()} (ms)", stats.mean_ms),
            (f"Median {name.upper()} (ms)", stats.median_ms),
            (f"P99 {name.upper()} (ms)", stats.p99_ms),
        ]
    return rows


def _report_failures(records: list[RequestRecord]) -> None:
    errors = sorted({r.error for r in records if r.error is not None})
    for error in errors[:5]:
        print(f"failed request: {error}", file=sys.stderr)


def main(args: argparse.Namespace) -> int:
    config = LoadConfig(
        base_url=args.base_url,
        endpoint=args.endpoint,
        model=args.model,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        ignore_eos=args.ignore_eos,
        prompt_format=args.prompt_format,
        seed=args.seed,
        timeout_s=args.timeout,
    )
    tokenizer = load_tokenizer(args.tokenizer_model)
    dataset = dataset_from_args(args)
    requests = dataset.build(tokenizer, args.seed)
    # A prompt of its own, so the warmup leaves nothing in a prefix cache for the workload.
    warmup = RandomDataset(1, 16, 4, range_ratio=1.0).build(tokenizer, args.seed + 1)[0]
    result = asyncio.run(run_load(config, requests, warmup))
    metrics = summarize(result.records, result.duration_s)
    _report_failures(result.records)
    print(format_table("Serving Benchmark Result", summary_rows(config, metrics)))
    if args.plot:
        # Imported here: matplotlib is an optional dependency, needed only for plots.
        from sluice.bench.plot import plot_serve

        plot_serve(result.records, f"{result.model} @ {config.base_url}", args.plot)
    record = {
        "bench": "serve",
        "base_url": config.base_url,
        "endpoint": config.endpoint,
        "model": result.model,
        "dataset": dataset.name,
        **asdict(dataset),
        "seed": config.seed,
        "request_rate": config.request_rate,
        "max_concurrency": config.max_concurrency,
        "ignore_eos": config.ignore_eos,
        **metrics.as_record(),
    }
    emit(record, args.output_file)
    return 0
