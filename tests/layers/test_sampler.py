"""The sampler draws exactly from the distribution its settings define, per row and per seed."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from sluice.layers.sampler import Sampler, SamplerOutput, SamplingBatch, _apply_penalties
from sluice.sampling_params import SamplingParams

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
DRAWS = 50_000
SIGNIFICANCE = 1e-3

# Distinct probabilities, most likely first, so every cut below has one right answer.
PROBS = torch.tensor([0.30, 0.22, 0.16, 0.12, 0.08, 0.05, 0.03, 0.02, 0.015, 0.005])
LOGITS = PROBS.log()


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def seeded_default_rng() -> Iterator[None]:
    """Unseeded rows draw from the default RNG: fix it, and give it back to other tests as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def sample(
    logits: Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None] | None = None,
    prompt_ids: list[list[int]] | None = None,
    output_ids: list[list[int]] | None = None,
) -> SamplerOutput:
    rows = len(params)
    batch = SamplingBatch.build(
        params,
        generators or [None] * rows,
        prompt_ids or [[] for _ in range(rows)],
        output_ids or [[] for _ in range(rows)],
        logits.device,
    )
    return Sampler()(logits, batch)


def repeated_rows(
    logits: Tensor, params: SamplingParams, rows: int, device: torch.device
) -> tuple[Tensor, list[SamplingParams]]:
    return logits.to(device).expand(rows, -1).contiguous(), [params] * rows


def chi_square_p_value(tokens: Tensor, probs: Tensor) -> float:
    """Pearson's goodness of fit of `tokens` to `probs`; tokens outside the support fail
    outright. The chi-square survival function is the regularised upper incomplete gamma."""
    observed = torch.bincount(tokens.cpu(), minlength=len(probs)).double()
    support = probs > 0
    assert observed[~support].sum() == 0, f"drew outside the support: {observed}"
    expected = probs[support].double() / probs.sum() * tokens.numel()
    statistic = ((observed[support] - expected) ** 2 / expected).sum()
    degrees = torch.tensor((support.sum().item() - 1) / 2, dtype=torch.float64)
    return torch.special.gammaincc(degrees, statistic / 2).item()


def renormalised(probs: Tensor, keep: list[int]) -> Tensor:
    kept = torch.zeros_like(probs, dtype=torch.float64)
    kept[keep] = probs[keep].double()
    return kept / kept.sum()


def test_greedy_is_argmax(device: torch.device) -> None:
    logits = torch.randn(8, 300, device=device)
    out = sample(logits, [SamplingParams()] * 8)
    assert torch.equal(out.token_ids, logits.argmax(dim=-1))
    assert out.logprobs is None and out.top_logprob_ids is None and out.top_logprobs is None


def test_mixed_batch_keeps_greedy_rows_exact(device: torch.device) -> None:
    logits = torch.randn(400, 50, device=device)
    # Too close for softmax to tell apart: greedy must compare logits, not probabilities.
    logits[0] = torch.cat([torch.tensor([0.0, 1e-8]), torch.full((48,), -10.0)])
    greedy, sampled = SamplingParams(), SamplingParams(temperature=1.5, top_k=20, min_p=0.01)
    params = [greedy if row % 2 == 0 else sampled for row in range(400)]
    generators = [torch.Generator(device).manual_seed(row) for row in range(400)]
    tokens = sample(logits, params, generators).token_ids
    assert torch.equal(tokens[::2], logits[::2].argmax(dim=-1))
    # The sampled rows really did sample, or this test would prove nothing.
    assert not torch.equal(tokens[1::2], logits[1::2].argmax(dim=-1))


def test_logits_are_left_as_given(device: torch.device) -> None:
    logits = torch.randn(4, 30, device=device)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.7, top_k=5, top_p=0.8, min_p=0.05, repetition_penalty=1.3,
        presence_penalty=0.5, frequency_penalty=0.5, logprobs=3,
    )  # fmt: skip
    sample(logits, [params] * 4, prompt_ids=[[1, 2]] * 4, output_ids=[[3, 3]] * 4)
    assert torch.equal(logits, before)


def seeded_tokens(
    logits: Tensor, params: list[SamplingParams], seeds: list[int | None], steps: int
) -> list[list[int]]:
    """Tokens of `steps` calls, with generators made once as the engine keeps them per request."""
    device = logits.device
    generators = [None if s is None else torch.Generator(device).manual_seed(s) for s in seeds]
    return [sample(logits, params, generators).token_ids.tolist() for _ in range(steps)]


def test_same_seed_same_tokens_across_calls(device: torch.device) -> None:
    logits = torch.randn(3, 1000, device=device) * 0.1  # nearly flat: repeats would be chance
    params = [SamplingParams(temperature=1.0)] * 3
    first = seeded_tokens(logits, params, [1, 2, 3], steps=8)
    assert seeded_tokens(logits, params, [1, 2, 3], steps=8) == first
    assert seeded_tokens(logits, params, [4, 5, 6], steps=8) != first
    assert len({tuple(step) for step in first}) == 8, "a generator must advance between calls"


def test_seeded_row_ignores_its_neighbours_and_position(device: torch.device) -> None:
    vocab = 1000
    row = torch.randn(1, vocab, device=device) * 0.1
    mine = SamplingParams(temperature=0.9, top_k=500, top_p=0.95)
    alone = seeded_tokens(row, [mine], [42], steps=6)

    others = [
        SamplingParams(),
        SamplingParams(temperature=1.2),
        SamplingParams(temperature=0.5, min_p=0.2, repetition_penalty=1.5),
        SamplingParams(temperature=2.0, seed=7),
    ]
    neighbours = torch.randn(len(others), vocab, device=device)
    crowd = torch.cat([neighbours[:3], row, neighbours[3:]])
    crowd_params = [*others[:3], mine, *others[3:]]
    crowded = seeded_tokens(crowd, crowd_params, [None, None, 3, 42, 7], steps=6)
    assert [step[3] for step in crowded] == [step[0] for step in alone]


def test_greedy_and_seeded_rows_use_no_other_randomness(device: torch.device) -> None:
    logits = torch.randn(2, 100, device=device)
    params = [SamplingParams(seed=1), SamplingParams(temperature=1.0, seed=2)]
    greedy_generator = torch.Generator(device).manual_seed(1)
    greedy_state = greedy_generator.get_state()
    default_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state() if device.type == "cuda" else None

    sample(logits, params, [greedy_generator, torch.Generator(device).manual_seed(2)])

    assert torch.equal(greedy_generator.get_state(), greedy_state)
    assert torch.equal(torch.get_rng_state(), default_state)
    if cuda_state is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda_state)


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        (SamplingParams(temperature=1.0, top_k=3), [0, 1, 2]),
        (SamplingParams(temperature=1.0, top_p=0.6), [0, 1, 2]),  # 0.30 + 0.22 < 0.6
        (SamplingParams(temperature=1.0, top_p=0.01), [0]),  # the top token always stays
        (SamplingParams(temperature=1.0, top_p=1e-9), [0]),  # 1 - p rounds to 1
        (SamplingParams(temperature=1.0, min_p=0.25), [0, 1, 2, 3, 4]),  # prob >= 0.075
        (SamplingParams(temperature=1.0, top_k=4, top_p=0.5), [0, 1]),  # nucleus of top 4
        (SamplingParams(temperature=1.0, top_p=0.7, min_p=0.6), [0, 1]),
    ],
)
@pytest.mark.parametrize(
    "neighbour",
    [
        None,
        SamplingParams(temperature=1.0, top_p=0.99),  # the whole vocabulary gets ranked
        SamplingParams(temperature=1.0, top_k=8),  # the top 8 get ranked
    ],
)
def test_cuts_never_emit_outside_the_allowed_set(
    device: torch.device,
    params: SamplingParams,
    allowed: list[int],
    neighbour: SamplingParams | None,
) -> None:
    draws = 5_000  # the chi-square tests below check the support over 50k more
    logits = LOGITS.to(device).expand(2 * draws, -1).contiguous()
    tokens = sample(logits, [params, neighbour or params] * draws).token_ids
    assert set(tokens[0::2].unique().tolist()) == set(allowed)


def test_top_k_keeps_ties_with_the_kth_token(device: torch.device) -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0]], device=device).expand(2000, -1).contiguous()
    tokens = sample(logits, [SamplingParams(temperature=1.0, top_k=2)] * 2000).token_ids
    assert set(tokens.unique().tolist()) == {0, 1, 2}


@pytest.mark.parametrize(
    "neighbour",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0.7, top_k=3, top_p=0.5, min_p=0.1),  # ranks the top 3
        SamplingParams(temperature=0.7, top_p=0.5),  # ranks the whole vocabulary
    ],
)
def test_temperature_matches_softmax_next_to_any_rows(
    device: torch.device, neighbour: SamplingParams
) -> None:
    """Rows without cuts stay exact in a batch that ranks tokens for other rows' cuts."""
    temperature = 0.7
    plain = SamplingParams(temperature=temperature)
    logits = LOGITS.to(device).expand(2 * DRAWS, -1).contiguous()
    tokens = sample(logits, [plain, neighbour] * DRAWS).token_ids
    expected = (LOGITS.double() / temperature).softmax(dim=-1)
    assert chi_square_p_value(tokens[0::2], expected) > SIGNIFICANCE


@pytest.mark.parametrize(
    ("params", "keep"),
    [
        (SamplingParams(temperature=1.0, top_k=4), [0, 1, 2, 3]),
        # renormalised top 4: 0.375, 0.275, 0.2, 0.15; mass above the 4th: 0.85
        (SamplingParams(temperature=1.0, top_k=4, top_p=0.7), [0, 1, 2]),
        (SamplingParams(temperature=1.0, top_p=0.85), [0, 1, 2, 3, 4]),  # above the 5th: 0.80
        (SamplingParams(temperature=1.0, min_p=0.12), [0, 1, 2, 3, 4, 5]),  # prob >= 0.036
    ],
)
def test_cuts_sample_the_renormalised_distribution(
    device: torch.device, params: SamplingParams, keep: list[int]
) -> None:
    logits, rows = repeated_rows(LOGITS, params, DRAWS, device)
    tokens = sample(logits, rows).token_ids
    assert chi_square_p_value(tokens, renormalised(PROBS, keep)) > SIGNIFICANCE


def test_seeded_rows_sample_the_distribution(device: torch.device) -> None:
    draws = 10_000
    logits, rows = repeated_rows(LOGITS, SamplingParams(temperature=1.0), draws, device)
    generators = [torch.Generator(device).manual_seed(seed) for seed in range(draws)]
    tokens = sample(logits, rows, generators).token_ids
    assert chi_square_p_value(tokens, PROBS) > SIGNIFICANCE


def reference_penalties(
    logits: list[float], params: SamplingParams, prompt: list[int], output: list[int]
) -> list[float]:
    """HF's repetition penalty over prompt and output, then OpenAI's presence and frequency."""
    result = list(logits)
    for token in set(prompt) | set(output):
        value = result[token]
        if value > 0:
            result[token] = value / params.repetition_penalty
        else:
            result[token] = value * params.repetition_penalty
    for token in set(output):
        count = output.count(token)
        result[token] -= params.presence_penalty + params.frequency_penalty * count
    return result


def test_penalties_match_a_reference(device: torch.device) -> None:
    vocab = 12
    logits = torch.randn(5, vocab, device=device) * 3
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(temperature=1.0, presence_penalty=0.8, frequency_penalty=-0.3),
        SamplingParams(),  # no penalty: its ids must change nothing
        SamplingParams(repetition_penalty=0.7, presence_penalty=-1.0, frequency_penalty=2.0),
        SamplingParams(temperature=0.5, frequency_penalty=1.0),
    ]
    prompts = [[1, 2, 2, 3], [4, 5], [0, 1, 2, 3, 4], [7], []]
    outputs = [[3, 9], [5, 5, 6], [8, 8], [7, 7, 7, 11, 0], [10, 10, 1]]
    batch = SamplingBatch.build(params, [None] * 5, prompts, outputs, device)

    penalised = _apply_penalties(logits, batch).cpu()

    for row, p in enumerate(params):
        expected = reference_penalties(logits[row].tolist(), p, prompts[row], outputs[row])
        assert penalised[row].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-6)


def test_penalties_steer_greedy_rows(device: torch.device) -> None:
    logits = torch.tensor([[3.0, 2.0, 1.0]], device=device)
    params = [SamplingParams(repetition_penalty=2.0)]
    assert sample(logits, params, prompt_ids=[[0]]).token_ids.tolist() == [1]


def test_logprobs_come_from_the_raw_logits(device: torch.device) -> None:
    logits = torch.randn(4, 40, device=device)
    params = [
        SamplingParams(temperature=0.8, logprobs=2, repetition_penalty=1.2),
        SamplingParams(logprobs=5),
        SamplingParams(temperature=1.0),  # wants none, but shares the batch's tensors
        SamplingParams(temperature=1.0, top_k=3, logprobs=0),
    ]
    out = sample(logits, params, output_ids=[[1, 2], [], [], []])
    raw = logits.log_softmax(dim=-1)

    assert out.logprobs is not None and out.top_logprobs is not None
    assert out.top_logprob_ids is not None
    assert out.logprobs.shape == (4,) and out.top_logprobs.shape == (4, 5)
    assert out.top_logprob_ids.dtype == torch.int64
    assert torch.equal(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert torch.equal(out.top_logprobs, raw.gather(1, out.top_logprob_ids))
    assert torch.equal(out.top_logprobs, raw.sort(dim=-1, descending=True).values[:, :5])
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])


def test_logprobs_zero_gives_only_the_chosen_token(device: torch.device) -> None:
    logits = torch.randn(2, 40, device=device)
    out = sample(logits, [SamplingParams(logprobs=0)] * 2)
    assert out.top_logprobs is not None and out.top_logprobs.shape == (2, 0)
    assert out.logprobs is not None
    assert torch.equal(out.logprobs, logits.log_softmax(dim=-1).amax(dim=-1))


def test_build_takes_fast_paths_only_when_safe() -> None:
    cpu = torch.device("cpu")
    greedy_with_cuts = SamplingParams(top_k=5, top_p=0.5, min_p=0.5)
    batch = SamplingBatch.build([greedy_with_cuts] * 2, [None] * 2, [[1]] * 2, [[2]] * 2, cpu)
    assert batch.all_greedy and not batch.any_top_k_top_p and not batch.any_min_p
    assert batch.max_top_k is None
    assert not batch.any_penalties and batch.prompt_ids is None and batch.output_ids is None
    assert batch.max_num_logprobs is None

    params = [SamplingParams(temperature=1.0, logprobs=1), SamplingParams(frequency_penalty=1.0)]
    batch = SamplingBatch.build(params, [None] * 2, [[1, 2, 3], [4]], [[5], [6, 7]], cpu)
    assert batch.any_greedy and not batch.all_greedy and batch.max_num_logprobs == 1
    assert batch.any_penalties and batch.prompt_ids is not None and batch.output_ids is not None
    # Nobody has a repetition penalty, so no prompt is uploaded; only row 1 penalises its output.
    assert batch.prompt_ids.shape == (2, 0)
    assert batch.output_ids.tolist() == [[-1, -1], [6, 7]]


def test_build_ranks_the_whole_vocabulary_only_for_top_p_without_top_k() -> None:
    cpu = torch.device("cpu")

    def max_top_k(*params: SamplingParams) -> int | None:
        rows = len(params)
        empty: list[list[int]] = [[] for _ in range(rows)]
        return SamplingBatch.build(list(params), [None] * rows, empty, empty, cpu).max_top_k

    top_k_20 = SamplingParams(temperature=1.0, top_k=20, top_p=0.9)
    top_p_only = SamplingParams(temperature=1.0, top_p=0.9)
    assert max_top_k(top_k_20, SamplingParams(temperature=1.0, top_k=5)) == 20
    assert max_top_k(top_k_20, SamplingParams(temperature=1.0)) == 20
    assert max_top_k(top_k_20, top_p_only) is None
    assert max_top_k(top_k_20, SamplingParams(top_p=0.9)) == 20  # a greedy row cuts nothing
