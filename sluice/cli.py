"""`sluice generate | chat | serve | bench | eval | compress ...`: the command line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from sluice.loaders.model_path import DEFAULT_MODEL
from sluice.sampling_params import SamplingParams
from sluice.server.limits import DEFAULT_MAX_SEQUENCES_PER_REQUEST
from sluice.spec.policy import DRAFT_ROW_COST

QUANTIZATION_HELP = (
    "auto: keep GGUF weights quantized where a kernel exists (and a `sluice compress --quantize "
    "int4` checkpoint 4-bit); none: all dense; int8/int4: quantize dense weights on load "
    "(exactly 2:4 sparse ones to the 2:4 int4 kernel)"
)


def add_model_options(group: argparse._ArgumentGroup) -> None:
    """Which model, on which device, in which dtype and quantization."""
    group.add_argument("--model", default=DEFAULT_MODEL, help="alias, .gguf file or HF folder")
    group.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    group.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    group.add_argument(
        "--quantization",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help=QUANTIZATION_HELP,
    )


def add_engine_args(parser: argparse.ArgumentParser, compile_default: bool = True) -> None:
    """`compile_default`: off for one-shot commands, where compiling costs more than it saves."""
    group = parser.add_argument_group("engine")
    add_model_options(group)
    group.add_argument("--no-prefix-cache", dest="enable_prefix_cache", action="store_false")
    group.add_argument("--max-model-len", type=int, default=None)
    group.add_argument("--page-size", type=int, default=16)
    group.add_argument(
        "--kv-cache-memory-gb",
        type=float,
        default=2.0,
        help="memory for KV pages (and, for hybrid models, recurrent-state slots)",
    )
    group.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="K and V as stored in the pages (auto: float16 on the CPU, else the model's dtype)",
    )
    group.add_argument(
        "--state-pool-ratio",
        type=float,
        default=0.5,
        help="hybrid models: share of the cache memory given to recurrent-state slots",
    )
    group.add_argument("--max-num-batched-tokens", type=int, default=512)
    group.add_argument("--max-num-seqs", type=int, default=64)
    group.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=compile_default,
        help="run steps through torch.compile (compiled at start, ~90 s, then cached)",
    )
    group.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="CUDA: replay decode steps from graphs captured at start (logged with its time)",
    )
    group.add_argument(
        "--sparsity",
        default=None,
        metavar="PROFILE",
        help="decode with activation-sparse MLPs per this `sluice calibrate-sparsity` profile",
    )
    group.add_argument(
        "--sparsity-rule",
        default="auto",
        choices=["auto", "threshold", "predictor", "topk"],
        help="how a decode token's neurons are chosen (auto: predictor where the profile has "
        "predictors, else threshold)",
    )
    add_speculative_args(parser)


def add_speculative_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speculative decoding")
    group.add_argument(
        "--speculative-method",
        default=None,
        choices=["ngram", "suffix", "draft"],
        help="propose draft tokens for the model to verify: ngram (prompt lookup), suffix "
        "(suffix decoding over the request and recent outputs) or draft (a draft model, "
        "--draft-model); default off",
    )
    group.add_argument(
        "--num-speculative-tokens",
        type=int,
        default=None,
        help="most draft tokens per step (k; default 5, 12 for suffix)",
    )
    group.add_argument(
        "--draft-model",
        default=None,
        metavar="MODEL",
        help="draft: alias, .gguf file or HF folder sharing the model's vocabulary, or 'self' "
        "(the model's own checkpoint, at --draft-quantization)",
    )
    group.add_argument(
        "--draft-quantization",
        default="auto",
        choices=["auto", "none", "int8", "int4"],
        help="how the draft model loads (as --quantization); auto: int4 for 'self'",
    )
    group.add_argument("--ngram-min", type=int, default=1, help="shortest n-gram matched")
    group.add_argument("--ngram-max", type=int, default=4, help="longest n-gram matched")
    group.add_argument(
        "--speculative-disable-batch-size",
        type=int,
        default=8,
        help="propose nothing while more requests than this run",
    )
    group.add_argument(
        "--speculative-draft-row-cost",
        type=float,
        default=DRAFT_ROW_COST,
        help="what a draft row adds to a step, in one-row decode steps: each request proposes "
        "only the drafts its acceptance rate pays for (0: always the full k)",
    )


ENGINE_OPTIONS = (
    "model",
    "device",
    "dtype",
    "quantization",
    "enable_prefix_cache",
    "max_model_len",
    "page_size",
    "kv_cache_memory_gb",
    "kv_cache_dtype",
    "state_pool_ratio",
    "max_num_batched_tokens",
    "max_num_seqs",
    "threads",
    "compile",
    "speculative_method",
    "num_speculative_tokens",
    "ngram_min",
    "ngram_max",
    "speculative_disable_batch_size",
    "draft_model",
    "draft_quantization",
    "speculative_draft_row_cost",
    "cuda_graphs",
    "sparsity",
    "sparsity_rule",
)
SAMPLING_OPTIONS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
)


def engine_kwargs(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in ENGINE_OPTIONS}


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=256)
    group.add_argument("--temperature", type=float, default=0.0)
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("--seed", type=int, default=None)
    group.add_argument("--stop", action="append", default=[])


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(**{name: getattr(args, name) for name in SAMPLING_OPTIONS})


def cmd_generate(args: argparse.Namespace) -> int:
    from sluice.api import LLM

    llm = LLM(**engine_kwargs(args))
    for out in llm.stream(args.prompt, sampling_params(args)):
        print(out.new_text, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from sluice.api import LLM

    llm = LLM(**engine_kwargs(args))
    params = sampling_params(args)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    turns = [args.once] if args.once else _read_turns()
    for user_text in turns:
        messages.append({"role": "user", "content": user_text})
        if args.once:
            print(f"> {user_text}")
        reply = "".join(_print_stream(llm.stream(llm.chat_prompt(messages), params)))
        messages.append({"role": "assistant", "content": reply})
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from sluice.server.runner import bind, serve

    try:  # before the model loads: a busy port fails in a second, not after a minute
        sock = bind(args.host, args.port)
    except OSError as error:
        print(f"sluice: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1

    from sluice.config import EngineConfig
    from sluice.disagg.role import DisaggConfig
    from sluice.engine.async_engine import AsyncEngine
    from sluice.engine.engine import Engine
    from sluice.server.openai import ServerSettings, create_app, served_model_name

    config = EngineConfig.create(**engine_kwargs(args))
    disagg = DisaggConfig(
        args.role,
        args.pd_host or args.host,
        args.port,
        served_model_name(args.model),
        args.pd_lease_seconds,
        on_transfer_failure=args.pd_on_transfer_failure,
        inject_transfer_error_rate=args.pd_inject_transfer_errors,
        inject_serve_stall_seconds=args.pd_inject_serve_stall,
    )
    engine = AsyncEngine(lambda: Engine(config, disagg=disagg))
    settings = ServerSettings(
        served_model_name(args.model),
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_sequences_per_request=args.max_sequences_per_request,
        max_body_bytes=args.max_body_bytes,
        auth_all_endpoints=args.auth_all_endpoints,
        allow_special_tokens_in_content=args.allow_special_tokens_in_content,
    )
    app = create_app(engine, settings)
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again for its
    # default effect (death by signal); by then the shutdown is complete, so exit cleanly.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _exit_cleanly)
    print(
        f"sluice: serving {settings.model_name} at http://{args.host}:{args.port}", file=sys.stderr
    )
    serve(app, sock, args.log_level.lower(), args.shutdown_timeout)
    return 0


def add_disagg_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("prefill/decode disaggregation (vLLM's kv_transfer_params)")
    group.add_argument(
        "--role",
        default="both",
        choices=["both", "prefill", "decode"],
        help="prefill: keep each prompt's KV for a decode instance to pull (over NIXL); "
        "decode: pull it instead of computing the prompt; both: no disaggregation",
    )
    group.add_argument(
        "--pd-host",
        default=None,
        help="prefill: the host decode instances reach this server at (default: --host)",
    )
    group.add_argument(
        "--pd-lease-seconds",
        type=float,
        default=30.0,
        help="prefill: how long a prompt's pages wait for a decode instance to pull them",
    )
    group.add_argument(
        "--pd-on-transfer-failure",
        choices=["recompute", "error"],
        default="recompute",
        help="decode: when a prompt's KV cannot be pulled (prefill instance gone, lease over, "
        "transfer error), compute the prompt here, or end that request with an error (a 503 "
        "kv_transfer_failed, or an error event in its stream); other requests go on "
        "(vLLM's kv_load_failure_policy)",
    )
    group.add_argument(
        "--pd-inject-transfer-errors",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="decode, for fault tests: fail this fraction of pulls",
    )
    group.add_argument(
        "--pd-inject-serve-stall",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="prefill, for fault tests: serve no pull for this long after each prefill",
    )


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


def _read_turns():
    print("sluice chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            return
        if not line.strip():
            return
        yield line


def _print_stream(outputs):
    for out in outputs:
        print(out.new_text, end="", flush=True)
        yield out.new_text
    print()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description=__doc__)
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one prompt, streaming")
    gen.add_argument("prompt")
    add_engine_args(gen, compile_default=False)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive multi-turn chat, streaming")
    chat.add_argument("--system", default=None, help="system message")
    chat.add_argument("--once", default=None, help="answer this one message and exit")
    add_engine_args(chat, compile_default=False)
    add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--api-key",
        default=os.environ.get("SLUICE_API_KEY"),
        help="require `Authorization: Bearer KEY` on the API (default: $SLUICE_API_KEY, else none)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="answer 503 to a request whose sequences (prompts x n) would bring the number "
        "waiting for the engine past this (default: no bound)",
    )
    serve.add_argument(
        "--max-sequences-per-request",
        type=int,
        default=DEFAULT_MAX_SEQUENCES_PER_REQUEST,
        help="answer 400 to a request of more sequences (prompts x n) than this "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="answer 413 to a request body larger than this (default: 16 bytes per token of "
        "the context window, at least 1 MiB)",
    )
    serve.add_argument(
        "--auth-all-endpoints",
        action="store_true",
        help="require the API key on /metrics, /version, /docs, /redoc and /openapi.json too "
        "(/health stays open for probes)",
    )
    serve.add_argument(
        "--allow-special-tokens-in-content",
        action="store_true",
        help="let special-token text in chat messages (like <|im_start|>) become control tokens; "
        "by default it is encoded as text, so a user cannot forge another role's turn",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGTERM; then each stream ends with "
        "an error event and [DONE], each waiting request with a 503",
    )
    add_disagg_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    from sluice.bench.cli import add_bench_parser  # here: these import this module
    from sluice.compress.cli import add_compress_parser
    from sluice.eval.cli import add_eval_parser
    from sluice.sparse.cli import add_calibrate_parser

    add_bench_parser(sub)
    add_eval_parser(sub)
    add_compress_parser(sub)
    add_calibrate_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
