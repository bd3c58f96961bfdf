"""`sluice bench sparsity`: decode speed against perplexity for activation-sparse decoding.

Calibrates a profile per CETT target (or reuses those in `--profiles`), then for dense decoding
and each target, threshold-only and with predictors: the perplexity of a held-out text with
every token's MLPs run as sparse decodes run them, and single-stream decode tokens per second,
measured in interleaved rounds (dense, then each sparse setting, again and again) so the load of
a shared machine falls on all alike. One JSON line per setting; `--plot` draws speed against
perplexity.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from sluice.api import LLM
from sluice.bench.inprocess import record_header
from sluice.bench.report import emit
from sluice.cli import engine_kwargs
from sluice.config import EngineConfig
from sluice.engine.engine import Engine
from sluice.eval.perplexity import perplexity
from sluice.loaders.model_path import resolve_model
from sluice.models.registry import LoadedModel, load_model
from sluice.sampling_params import SamplingParams
from sluice.sparse.calibrate import calibrate_targets, shipped_text
from sluice.sparse.decoding import SparseDecoding
from sluice.sparse.profile import SparsityProfile

DENSE = ("dense", 0.0)
CACHED = "+cache"  # a rule's name with this suffix runs with the weight cache


def _rule(name: str) -> str:
    return name.removesuffix(CACHED)


def _decoding(loaded: LoadedModel, profile: SparsityProfile, name: str) -> SparseDecoding:
    return SparseDecoding(loaded.model, profile, _rule(name), weight_cache=name.endswith(CACHED))


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    base = EngineConfig.create(**{**engine_kwargs(args), "sparsity": None})
    device = base.torch_device()
    loaded = load_model(
        resolve_model(base.model), device, base.torch_dtype(device), base.quantization
    )
    ids = loaded.tokenizer.encode(shipped_text())
    calibration = ids[: args.calibration_tokens]
    evaluation = ids[args.calibration_tokens : args.calibration_tokens + args.eval_tokens]
    profiles = _profiles(loaded, calibration, args)
    settings = [DENSE] + [(rule, cett) for cett in args.cett for rule in args.rules]
    quality: dict[tuple, tuple[float, list[dict]]] = {}
    for rule, cett in settings:  # the weight cache moves weights, it changes no result
        same = (_rule(rule), cett)
        if same not in quality:
            quality[same] = _quality(loaded, evaluation, profiles, same)
        quality[(rule, cett)] = quality[same]
    speeds = _interleaved_speeds(loaded, base, profiles, settings, args)
    dense_ppl, dense_speed = quality[DENSE][0], _mean(speeds[DENSE])
    records = []
    for setting in settings:
        ppl, layers = quality[setting]
        rule, cett = setting
        record = {
            **record_header("sparsity", "sluice", args),
            "rule": rule,
            "cett": cett,
            "perplexity": ppl,
            "perplexity_increase": ppl / dense_ppl - 1,
            "mean_sparsity": _mean([layer["sparsity"] for layer in layers]) if layers else 0.0,
            "decode_tok_s": _mean(speeds[setting]),
            "speedup": _mean(speeds[setting]) / dense_speed,
            "speedup_per_round": [s / d for s, d in zip(speeds[setting], speeds[DENSE])],
            "eval_tokens": len(evaluation),
            "calibration_tokens": len(calibration),
            "layers": layers,
        }
        emit(record, args.output_file)
        records.append(record)
    if args.plot:
        from sluice.bench.plot import plot_sparsity

        plot_sparsity(records, args.plot)
    return 0


def _profiles(loaded: LoadedModel, ids: list[int], args) -> dict[float, SparsityProfile]:
    """The profile of each target in `--profiles`; the missing ones calibrated (one pass of
    the text for all) and saved there."""
    missing = [cett for cett in args.cett if not _profile_path(args, cett).exists()]
    if missing:
        print(f"calibrating CETT {missing}", file=sys.stderr)
        made = calibrate_targets(
            loaded,
            ids,
            missing,
            args.predictor_rank,
            progress=True,
            search_tokens=args.search_tokens,
        )
        for profile in made:
            path = _profile_path(args, profile.target_cett)
            path.parent.mkdir(parents=True, exist_ok=True)
            profile.save(path)
    return {cett: SparsityProfile.load(_profile_path(args, cett)) for cett in args.cett}


def _profile_path(args, cett: float) -> Path:
    return Path(args.profiles) / f"sparsity-cett{cett:g}.json"


def _quality(loaded, evaluation, profiles, setting) -> tuple[float, list[dict]]:
    rule, cett = setting
    if setting == DENSE:
        return perplexity(loaded, evaluation), []
    print(f"perplexity, {rule} at CETT {cett:g}", file=sys.stderr)
    sparse = _decoding(loaded, profiles[cett], rule)
    return perplexity(loaded, evaluation, sparse=sparse), sparse.layer_stats()


def _interleaved_speeds(loaded, base, profiles, settings, args) -> dict[tuple, list[float]]:
    llms = {}
    for rule, cett in settings:
        options = {}
        if (rule, cett) != DENSE:
            options = {"sparsity": str(_profile_path(args, cett)), "sparsity_rule": _rule(rule)}
        config = EngineConfig.create(**{**engine_kwargs(args), **options})
        engine = Engine(config, loaded=loaded)
        if rule.endswith(CACHED):
            engine.executor.sparse = _decoding(loaded, profiles[cett], rule)
        llms[(rule, cett)] = LLM.from_engine(engine)
    prompt = loaded.tokenizer.encode("Write a short story about a lighthouse keeper.")
    speeds: dict[tuple, list[float]] = {s: [] for s in settings}
    for round_ in range(args.rounds):
        for setting, llm in llms.items():
            speeds[setting].append(_decode_tok_s(llm, prompt, args.decode_tokens))
        print(
            f"round {round_ + 1}: "
            + ", ".join(f"{r} {c:g}: {speeds[(r, c)][-1]:.1f}" for r, c in settings),
            file=sys.stderr,
        )
    return speeds


def _decode_tok_s(llm: LLM, prompt: list[int], tokens: int) -> float:
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    times = []
    start = time.perf_counter()
    for out in llm.stream(prompt, params):
        times += [time.perf_counter() - start] * len(out.new_token_ids)
    return (len(times) - 1) / (times[-1] - times[0])


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
