"""`sluice bench {offline,latency,serve,prefix-cache,speculative,verify-step,pd-transfer,pd-mixed,
structured,sparsity}`: the benchmarks' command line.

Each subcommand imports its module only when it runs, so torch, transformers and httpx are not
loaded for every `sluice` command that builds the parser.
"""

from __future__ import annotations

import argparse
import importlib
import math
from collections.abc import Callable

from sluice.cli import add_engine_args
from sluice.loaders.model_path import DEFAULT_MODEL


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="measure throughput and latency")
    kinds = bench.add_subparsers(dest="benchmark", required=True)
    _add_offline(kinds)
    _add_latency(kinds)
    _add_serve(kinds)
    _add_prefix_cache(kinds)
    _add_speculative(kinds)
    _add_verify_step(kinds)
    _add_pd_transfer(kinds)
    _add_pd_mixed(kinds)
    _add_structured(kinds)
    _add_sparsity(kinds)


def _runner(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return importlib.import_module(f"sluice.bench.{module}").main(args)

    return run


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_POSITIVE = _int_at_least(1)


def _int_list(text: str) -> list[int]:
    return [_POSITIVE(part) for part in text.split(",")]


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="seeds the workload")
    parser.add_argument("--output-file", default=None, help="also append the JSON line here")


def _add_offline(kinds: argparse._SubParsersAction) -> None:
    offline = kinds.add_parser(
        "offline",
        help="throughput: random requests all submitted at once",
        description="Prints one JSON line. Outputs ignore EOS, so their lengths are exact. "
        "transformers runs static batches, each to its longest request; output_tokens counts "
        "only the tokens each request asked for.",
    )
    offline.add_argument("--backend", choices=["sluice", "transformers"], default="sluice")
    offline.add_argument("--num-prompts", type=_POSITIVE, default=256)
    offline.add_argument("--input-len-min", type=_POSITIVE, default=100)
    offline.add_argument("--input-len-max", type=_POSITIVE, default=1024)
    offline.add_argument("--output-len-min", type=_POSITIVE, default=100)
    offline.add_argument("--output-len-max", type=_POSITIVE, default=1024)
    _add_common(offline)
    add_engine_args(offline)
    # The same setting under the name a batch benchmark reader looks for; the default stays
    # --max-num-seqs's.
    offline.add_argument(
        "--batch-size",
        dest="max_num_seqs",
        type=_POSITIVE,
        default=argparse.SUPPRESS,
        help="sequences in flight: sluice's --max-num-seqs, transformers' static batch size",
    )
    offline.set_defaults(func=_runner("offline"))


def _add_latency(kinds: argparse._SubParsersAction) -> None:
    latency = kinds.add_parser(
        "latency", help="single stream: prefill and decode tokens per second"
    )
    latency.add_argument("--input-len", type=_POSITIVE, default=512)
    latency.add_argument("--output-len", type=_int_at_least(2), default=128)
    latency.add_argument("--iters", type=_POSITIVE, default=3, help="timed runs of each")
    _add_common(latency)
    add_engine_args(latency)
    latency.set_defaults(func=_runner("latency"))


def _add_speculative(kinds: argparse._SubParsersAction) -> None:
    spec = kinds.add_parser(
        "speculative",
        help="output tokens per second with and without speculative decoding (interleaved), "
        "and the drafts' acceptance, on a fixed prompt set",
    )
    spec.add_argument(
        "--workloads",
        nargs="+",
        default=["code_edit", "code_rename", "summary_quotes", "open_chat"],
        choices=["code_edit", "code_rename", "summary_quotes", "open_chat"],
    )
    spec.add_argument("--output-len", type=_POSITIVE, default=200, help="max tokens per answer")
    spec.add_argument("--concurrency", type=_POSITIVE, default=1, help="copies of each prompt")
    spec.add_argument("--rounds", type=_POSITIVE, default=2, help="off/on pairs per workload")
    spec.add_argument(
        "--keep-outputs",
        action="store_true",
        help="let suffix decoding's global tree keep the earlier runs' answers (a repeated "
        "request, as an agent sends; by default each speculative run sees its prompt first)",
    )
    _add_common(spec)
    add_engine_args(spec)
    spec.set_defaults(func=_runner("speculative"))


def _add_serve(kinds: argparse._SubParsersAction) -> None:
    serve = kinds.add_parser(
        "serve",
        help="load-test an OpenAI-compatible server (sluice serve, vLLM, llama-server, ...)",
    )
    target = serve.add_argument_group("target")
    target.add_argument("--base-url", default="http://127.0.0.1:8000", help="without /v1")
    target.add_argument("--endpoint", default="/v1/completions")
    target.add_argument("--model", default=None, help="name to send; default: the server's first")
    target.add_argument(
        "--tokenizer-model",
        default=DEFAULT_MODEL,
        help="our alias, .gguf or HF folder whose tokenizer builds prompts and counts tokens",
    )
    target.add_argument("--prompt-format", choices=["text", "ids"], default="text")
    target.add_argument("--timeout", type=float, default=3600.0, help="seconds any read may take")

    load = serve.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="req/s, Poisson")
    load.add_argument("--max-concurrency", type=_POSITIVE, default=None)
    load.add_argument(
        "--ignore-eos",
        action="store_true",
        help="exact output lengths: sends ignore_eos, and min_tokens = max_tokens",
    )

    data = serve.add_argument_group("dataset")
    data.add_argument(
        "--dataset-name", choices=["random", "generated-shared-prefix"], default="random"
    )
    data.add_argument("--num-prompts", type=_POSITIVE, default=1000, help="random only")
    data.add_argument("--random-input-len", type=_POSITIVE, default=1024)
    data.add_argument("--random-output-len", type=_POSITIVE, default=1024)
    data.add_argument(
        "--random-range-ratio",
        type=float,
        default=0.0,
        help="lengths uniform in [len * ratio, len]",
    )
    data.add_argument("--gsp-num-groups", type=_POSITIVE, default=64)
    data.add_argument("--gsp-prompts-per-group", type=_POSITIVE, default=16)
    data.add_argument("--gsp-system-prompt-len", type=_POSITIVE, default=2048)
    data.add_argument("--gsp-question-len", type=_POSITIVE, default=128)
    data.add_argument("--gsp-output-len", type=_POSITIVE, default=256)

    _add_common(serve)
    serve.add_argument("--plot", default=None, metavar="PATH.png", help="save latency plots")
    serve.set_defaults(func=_runner("serve"))


def _add_structured(kinds: argparse._SubParsersAction) -> None:
    structured = kinds.add_parser(
        "structured",
        help="output tok/s with a JSON schema constraint vs without, and schema compile time",
    )
    structured.add_argument("--streams", type=_int_list, default=[1, 32])
    structured.add_argument("--max-tokens", type=_POSITIVE, default=64)
    structured.add_argument("--rounds", type=_POSITIVE, default=2, help="A/B rounds, interleaved")
    _add_common(structured)
    add_engine_args(structured)
    structured.set_defaults(func=_runner("structured"))


def _add_verify_step(kinds: argparse._SubParsersAction) -> None:
    verify = kinds.add_parser(
        "verify-step",
        help="a speculative verify step of 1 + k rows against a one-row decode (compiled step)",
    )
    verify.add_argument("--rows", type=_int_list, default=[1, 2, 4, 6, 9], help="1 + k values")
    verify.add_argument("--context", type=_POSITIVE, default=300, help="tokens before the step")
    verify.add_argument("--rounds", type=_POSITIVE, default=7, help="interleaved rounds")
    _add_common(verify)
    add_engine_args(verify)
    verify.set_defaults(func=_runner("verify_step"))


def _add_prefix_cache(kinds: argparse._SubParsersAction) -> None:
    prefix = kinds.add_parser(
        "prefix-cache",
        help="KV page and prefix-cache bookkeeping per decode step, by context length (no model)",
    )
    prefix.add_argument("--contexts", type=_int_list, default=[2048, 8192, 32768])
    prefix.add_argument("--steps", type=_POSITIVE, default=4096, help="decode steps timed")
    prefix.add_argument("--repeats", type=_POSITIVE, default=3, help="fresh runs per context")
    # The engine's defaults (see `add_engine_args`), without importing the engine's config.
    prefix.add_argument("--page-size", type=_POSITIVE, default=16)
    prefix.add_argument(
        "--max-num-batched-tokens", type=_POSITIVE, default=512, help="tokens per prefill step"
    )
    _add_common(prefix)
    prefix.set_defaults(func=_runner("prefix_cache"))


def _add_pd_transfer(kinds: argparse._SubParsersAction) -> None:
    pd = kinds.add_parser(
        "pd-transfer",
        help="pull a prompt's KV from a prefill engine over NIXL vs recompute it, by length",
    )
    pd.add_argument("--prompt-lens", type=_int_list, default=[512, 1024, 2048])
    pd.add_argument("--repeats", type=_POSITIVE, default=3)
    add_engine_args(pd, compile_default=False)
    _add_common(pd)
    pd.set_defaults(func=_runner("pd_transfer"))


def _add_pd_mixed(kinds: argparse._SubParsersAction) -> None:
    pd = kinds.add_parser(
        "pd-mixed",
        help="prefill/decode disaggregation vs two co-located servers, behind vllm-router, on "
        "steady decodes with long prompts arriving (starts every server and router itself)",
    )
    pd.add_argument("--model", default=DEFAULT_MODEL, help="what every server serves")
    pd.add_argument(
        "--cores",
        type=lambda text: text.split(","),
        default=["0", "1"],
        help="taskset core lists: P and the first `both` server on the first, D and the "
        "second on the second",
    )
    pd.add_argument(
        "--server-args",
        default="",
        help="more `sluice serve` arguments for every server, one string (--server-args='...'; "
        "the servers compile their steps as `sluice serve` does by default: the first start "
        "takes a few minutes, later ones read inductor's cache; '--no-compile' for eager ones)",
    )
    pd.add_argument("--rounds", type=_POSITIVE, default=1, help="pd/colocated pairs, interleaved")
    pd.add_argument("--decode-concurrency", type=_POSITIVE, default=6, help="decodes in flight")
    pd.add_argument("--decode-input-len", type=_POSITIVE, default=64)
    pd.add_argument("--decode-output-len", type=_POSITIVE, default=128)
    pd.add_argument("--long-prompts", type=_POSITIVE, default=4, help="arrivals per arm and round")
    pd.add_argument(
        "--long-input-len", type=_token_range, default=(1024, 2048), help="tokens, uniform"
    )
    pd.add_argument("--long-output-len", type=_POSITIVE, default=16)
    pd.add_argument(
        "--arrival-interval", type=float, default=20.0, help="mean seconds between long prompts"
    )
    pd.add_argument(
        "--lead-seconds", type=float, default=5.0, help="decodes alone before the first arrival"
    )
    pd.add_argument("--log-dir", default="pd-mixed-logs", help="each server's and router's log")
    pd.add_argument("--plot", default=None, metavar="PATH.png", help="ITL distributions")
    _add_common(pd)
    pd.set_defaults(func=_runner("pd_mixed"))


def _token_range(text: str) -> tuple[int, int]:
    """ "1024-2048" -> (1024, 2048); "512" -> (512, 512)."""
    low, _, high = text.partition("-")
    low_value, high_value = _POSITIVE(low), _POSITIVE(high or low)
    if low_value > high_value:
        raise argparse.ArgumentTypeError(f"a range such as 1024-2048, got {text!r}")
    return low_value, high_value


def _float_list(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def _add_sparsity(kinds: argparse._SubParsersAction) -> None:
    sparsity = kinds.add_parser(
        "sparsity", help="activation-sparse decoding: decode speed against perplexity"
    )
    sparsity.add_argument("--cett", type=_float_list, default=[0.05, 0.1, 0.2, 0.3])
    sparsity.add_argument(
        "--rules", type=lambda t: t.split(","), default=["threshold", "predictor"]
    )
    sparsity.add_argument("--predictor-rank", type=_POSITIVE, default=16)
    sparsity.add_argument("--calibration-tokens", type=_POSITIVE, default=2048)
    sparsity.add_argument(
        "--search-tokens",
        type=_POSITIVE,
        default=None,
        help="search thresholds on this many calibration tokens, evenly spaced (default: all)",
    )
    sparsity.add_argument("--eval-tokens", type=_POSITIVE, default=4096)
    sparsity.add_argument("--decode-tokens", type=_int_at_least(2), default=64)
    sparsity.add_argument("--rounds", type=_POSITIVE, default=3, help="interleaved speed rounds")
    sparsity.add_argument(
        "--profiles", default="sparsity-profiles", help="folder of profiles (made if missing)"
    )
    sparsity.add_argument("--plot", default=None, metavar="PATH.png")
    _add_common(sparsity)
    add_engine_args(sparsity)
    sparsity.set_defaults(func=_runner("sparsity"))
