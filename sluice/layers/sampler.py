"""Next-token sampling for a batch of requests, each with its own settings and seed.

The order is vLLM's and HF's: logit biases and grammar masks, penalties, then temperature, top-k, top-p and min-p, then an
exact draw from what is left. Temperature-0 rows take the argmax of the penalised logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from sluice.sampling_params import SamplingParams
from sluice.structured.grammar import apply_bitmask

_PAD_ID = -1  # pads the ragged id lists; counted into a spare vocab column that is then dropped


@dataclass
class SamplingBatch:
    """Per-row sampling settings as tensors, built once per step."""

    temperature: Tensor  # [B] float32, 0 = greedy
    top_k: Tensor  # [B] int64, 0 = off
    top_p: Tensor  # [B] float32
    min_p: Tensor  # [B] float32
    repetition_penalty: Tensor  # [B] float32
    presence_penalty: Tensor  # [B] float32
    frequency_penalty: Tensor  # [B] float32
    generators: list[torch.Generator | None]  # per row; None: draw from the default RNG
    # [B, L] int64 padded with -1, None without penalties. Rows that do not need an id list
    # get an empty one, so a long prompt is only uploaded when its row has a repetition penalty.
    prompt_ids: Tensor | None
    output_ids: Tensor | None
    seeded_rows: list[int]  # sampled rows with their own generator
    unseeded_rows: Tensor  # [n] int64: sampled rows that share one draw from the default RNG
    max_num_logprobs: int | None  # max over rows of params.logprobs; None: no row wants them
    all_greedy: bool
    any_greedy: bool
    any_penalties: bool
    any_top_k_top_p: bool  # among sampled rows
    # Largest top_k among sampled rows that cut; None when one of them uses top-p without
    # top-k, so that its whole vocabulary must be ranked.
    max_top_k: int | None
    any_min_p: bool  # among sampled rows
    # (rows, token ids, biases) of every row's logit_bias; None when no row has one.
    logit_bias: tuple[Tensor, Tensor, Tensor] | None = None
    # [B, ceil(V / 32)] int32 bits of the tokens each row may take; None: no row is constrained.
    allowed: Tensor | None = None

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        device: torch.device,
        allowed: Tensor | None = None,
    ) -> SamplingBatch:
        # One upload for all float settings instead of one per field.
        floats = torch.tensor(
            [
                [p.temperature for p in params],
                [p.top_p for p in params],
                [p.min_p for p in params],
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            ],
            dtype=torch.float32,
        ).to(device)
        temperature, top_p, min_p, repetition, presence, frequency = floats.unbind(0)
        sampled = [p for p in params if not p.greedy]
        cutting = [p for p in sampled if p.top_k > 0 or p.top_p < 1.0]
        top_ks = [p.top_k for p in cutting]
        any_penalties = any(p.uses_penalties for p in params)
        wanted_logprobs = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=temperature,
            top_k=torch.tensor([p.top_k for p in params], dtype=torch.int64, device=device),
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition,
            presence_penalty=presence,
            frequency_penalty=frequency,
            generators=list(generators),
            prompt_ids=_penalised_prompt_ids(params, prompt_ids, device) if any_penalties else None,
            output_ids=_penalised_output_ids(params, output_ids, device) if any_penalties else None,
            seeded_rows=_sampled_rows(params, generators, seeded=True),
            unseeded_rows=torch.tensor(
                _sampled_rows(params, generators, seeded=False), dtype=torch.int64, device=device
            ),
            max_num_logprobs=max(wanted_logprobs) if wanted_logprobs else None,
            all_greedy=not sampled,
            any_greedy=len(sampled) < len(params),
            any_penalties=any_penalties,
            any_top_k_top_p=bool(cutting),
            max_top_k=None if 0 in top_ks else max(top_ks, default=None),
            any_min_p=any(p.min_p > 0.0 for p in sampled),
            logit_bias=_logit_bias(params, device),
            allowed=allowed,
        )


class SamplerOutput(NamedTuple):
    token_ids: Tensor  # [B] int64
    logprobs: Tensor | None  # [B] float32: the chosen token under log_softmax(raw logits)
    top_logprob_ids: Tensor | None  # [B, K] int64, K = max_num_logprobs, most likely first
    top_logprobs: Tensor | None  # [B, K] float32


class Sampler(torch.nn.Module):
    """Picks one token per row of float32 logits [B, V]; never modifies the logits it is given."""

    def forward(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        # Logprobs describe the model, so they come from the logits before any setting touches them.
        raw_logprobs = None if batch.max_num_logprobs is None else logits.log_softmax(dim=-1)
        if batch.logit_bias is not None or batch.allowed is not None:
            logits = _constrain(logits.clone(), batch)
        if batch.any_penalties:
            logits = _apply_penalties(logits, batch)
        token_ids = logits.argmax(dim=-1) if batch.all_greedy else _sample(logits, batch)
        return _output(token_ids, raw_logprobs, batch.max_num_logprobs)


def _sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
    greedy = batch.temperature == 0.0
    # Greedy rows divide by 1 only to share the batched ops; their draw is replaced below.
    scaled = logits / torch.where(greedy, 1.0, batch.temperature).unsqueeze(1)
    if batch.any_top_k_top_p:
        scaled = _apply_top_k_top_p(scaled, batch)
    probs = scaled.softmax(dim=-1)
    if batch.any_min_p:
        probs = _apply_min_p(probs, batch.min_p)
    # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is token i with probability
    # p_i / sum(p), an exact draw that needs no renormalisation after the cuts above.
    sampled = probs.div_(_exponential_noise(probs, batch)).argmax(dim=-1)
    if batch.any_greedy:
        return torch.where(greedy, logits.argmax(dim=-1), sampled)
    return sampled


def _constrain(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Adds each row's logit biases and masks to -inf what its grammar does not allow, in place."""
    if batch.logit_bias is not None:
        rows, token_ids, biases = batch.logit_bias
        logits.index_put_((rows, token_ids), biases, accumulate=True)
    if batch.allowed is not None:
        apply_bitmask(logits, batch.allowed)
    return logits


def _logit_bias(
    params: list[SamplingParams], device: torch.device
) -> tuple[Tensor, Tensor, Tensor] | None:
    entries = [(row, t, b) for row, p in enumerate(params) for t, b in p.logit_bias.items()]
    if not entries:
        return None
    rows, token_ids, biases = zip(*entries, strict=True)
    return (
        torch.tensor(rows, dtype=torch.int64, device=device),
        torch.tensor(token_ids, dtype=torch.int64, device=device),
        torch.tensor(biases, dtype=torch.float32, device=device),
    )


def _apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    assert batch.prompt_ids is not None and batch.output_ids is not None
    vocab_size = logits.shape[-1]
    output_counts = _token_counts(batch.output_ids, vocab_size)
    seen = (_token_counts(batch.prompt_ids, vocab_size) + output_counts) > 0
    penalty = batch.repetition_penalty.unsqueeze(1)
    # HF's rule: dividing a positive logit and multiplying a negative one both lower it for
    # a penalty above 1, where dividing a negative one would raise it.
    repeated = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = torch.where(seen, repeated, logits)
    logits -= batch.frequency_penalty.unsqueeze(1) * output_counts
    logits -= batch.presence_penalty.unsqueeze(1) * (output_counts > 0)
    return logits


def _token_counts(ids: Tensor, vocab_size: int) -> Tensor:
    """[B, V] float32 occurrences of each token id in each row of padded `ids`."""
    ids = ids.masked_fill(ids == _PAD_ID, vocab_size)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _apply_top_k_top_p(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Masks to -inf what lies outside each row's top k, then outside the top-p nucleus of
    what top-k kept (renormalised). top_k 0 and top_p 1 leave a row as it is."""
    return logits.masked_fill(logits < _top_k_top_p_threshold(logits, batch), float("-inf"))


def _top_k_top_p_threshold(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """[B, 1] smallest logit each row keeps. Both cuts keep a row's most likely tokens, so one
    threshold describes them; tokens tied with it stay, as in HF's and vLLM's top-k."""
    ranked = _ranked_ascending(logits, batch.max_top_k)
    num_ranked = ranked.shape[-1]
    k = torch.where(batch.top_k > 0, batch.top_k.clamp(max=num_ranked), num_ranked)
    kth_largest = ranked.gather(1, (num_ranked - k).unsqueeze(1))
    ranked = ranked.masked_fill(ranked < kth_largest, float("-inf"))
    # A token goes when it and all less likely ones hold at most 1 - p: the more likely ones
    # alone reach p. Summing from the small end, top_p = 1 drops only top-k's drops (mass 0).
    tail_mass = ranked.softmax(dim=-1).cumsum(dim=-1)
    num_dropped = (tail_mass <= 1.0 - batch.top_p.unsqueeze(1)).sum(dim=-1, keepdim=True)
    # The top token stays whatever rounding did to the sum.
    threshold = ranked.gather(1, num_dropped.clamp(max=num_ranked - 1))
    # A row without cuts may have had only part of its vocabulary ranked: keep all of it.
    cuts = ((batch.top_k > 0) | (batch.top_p < 1.0)).unsqueeze(1)
    return torch.where(cuts, threshold, float("-inf"))


def _ranked_ascending(logits: Tensor, max_top_k: int | None) -> Tensor:
    """Each row's logits in ascending order: only the largest max_top_k when every row's cut
    lies within them, which spares sorting the whole vocabulary."""
    if max_top_k is None or max_top_k >= logits.shape[-1]:
        return logits.sort(dim=-1).values
    return logits.topk(max_top_k, dim=-1).values.flip(-1)


def _apply_min_p(probs: Tensor, min_p: Tensor) -> Tensor:
    """Zeroes tokens less likely than min_p times the row's most likely token."""
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    return probs.masked_fill_(probs < threshold, 0.0)


def _exponential_noise(probs: Tensor, batch: SamplingBatch) -> Tensor:
    """Exp(1) noise shaped like `probs`. A seeded row draws only from its own generator, so its
    token depends on nothing else in the batch; unseeded rows share one default-RNG draw and
    greedy rows draw nothing."""
    if not batch.seeded_rows and not batch.any_greedy:
        noise = torch.empty_like(probs).exponential_()
    else:
        noise = torch.ones_like(probs)
        if batch.unseeded_rows.numel() > 0:
            shape = (batch.unseeded_rows.numel(), probs.shape[-1])
            noise[batch.unseeded_rows] = probs.new_empty(shape).exponential_()
        for row in batch.seeded_rows:
            noise[row].exponential_(generator=batch.generators[row])
    # exponential_ can return 0, and 0 / 0 = NaN on a cut token would win the argmax.
    return noise.clamp_min_(torch.finfo(noise.dtype).tiny)


def _output(token_ids: Tensor, raw_logprobs: Tensor | None, k: int | None) -> SamplerOutput:
    if raw_logprobs is None or k is None:
        return SamplerOutput(token_ids, None, None, None)
    chosen = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_logprobs, top_ids = raw_logprobs.topk(k, dim=-1)
    return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)


def _penalised_prompt_ids(
    params: list[SamplingParams], prompt_ids: list[list[int]], device: torch.device
) -> Tensor:
    """Only the repetition penalty looks at the prompt."""
    rows = zip(params, prompt_ids, strict=True)
    return _pad_ids([ids if p.repetition_penalty != 1.0 else [] for p, ids in rows], device)


def _penalised_output_ids(
    params: list[SamplingParams], output_ids: list[list[int]], device: torch.device
) -> Tensor:
    rows = zip(params, output_ids, strict=True)
    return _pad_ids([ids if p.uses_penalties else [] for p, ids in rows], device)


def _sampled_rows(
    params: list[SamplingParams], generators: list[torch.Generator | None], seeded: bool
) -> list[int]:
    return [
        row
        for row, (p, generator) in enumerate(zip(params, generators, strict=True))
        if not p.greedy and (generator is not None) == seeded
    ]


def _pad_ids(rows: list[list[int]], device: torch.device) -> Tensor:
    width = max((len(row) for row in rows), default=0)
    padded = [[*row, *[_PAD_ID] * (width - len(row))] for row in rows]
    return torch.tensor(padded, dtype=torch.int64, device=device).reshape(len(rows), width)
