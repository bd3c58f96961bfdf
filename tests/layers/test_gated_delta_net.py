"""Gated DeltaNet: the chunked form is the recurrence, and state slots carry requests across steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_harness import recurrent_step, state_cache_of

from sluice.config import GatedDeltaNetConfig
from sluice.layers.gated_delta_net import GatedDeltaNet, chunked_gated_delta_rule, gated_delta_step

HEADS, KEY_DIM, VALUE_DIM = 4, 16, 8
HIDDEN = 32
CONFIG = GatedDeltaNetConfig(
    num_key_heads=2, num_value_heads=4, key_head_dim=16, value_head_dim=8, conv_kernel=4
)


def naive_recurrence(q, k, v, log_decay, beta, state):
    """Token by token, in float64: S = exp(g) (I - beta k k^T) S + beta k v^T; o = S^T q."""
    q, k, v, log_decay, beta, state = (t.double() for t in (q, k, v, log_decay, beta, state))
    eye = torch.eye(KEY_DIM, dtype=torch.float64)
    outs = []
    for t in range(q.shape[0]):
        kt, bt = k[t].unsqueeze(-1), beta[t][:, None, None]
        forget = eye - bt * kt @ kt.transpose(-1, -2)
        state = log_decay[t].exp()[:, None, None] * forget @ state + bt * kt @ v[t].unsqueeze(-2)
        outs.append((state.transpose(-1, -2) @ q[t].unsqueeze(-1)).squeeze(-1))
    return torch.stack(outs).float(), state.float()


def random_inputs(tokens: int, seed: int = 0):
    """q, k, v, log_decay, beta for `tokens` tokens (of one request, or one each of a batch)."""
    g = torch.Generator().manual_seed(seed)
    shape = (tokens, HEADS)
    q = F.normalize(torch.randn(*shape, KEY_DIM, generator=g), dim=-1) * KEY_DIM**-0.5
    k = F.normalize(torch.randn(*shape, KEY_DIM, generator=g), dim=-1)
    v = torch.randn(*shape, VALUE_DIM, generator=g)
    # Decays from strong to nearly none, so both the chunk-local and the carried state matter.
    log_decay = -F.softplus(torch.randn(*shape, generator=g) * 2 - 2)
    beta = torch.rand(*shape, generator=g)
    return q, k, v, log_decay, beta


@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 130])
def test_chunked_rule_matches_recurrence(length):
    inputs = random_inputs(length, seed=length)
    initial = torch.randn(HEADS, KEY_DIM, VALUE_DIM, generator=torch.Generator().manual_seed(1))

    out, final = chunked_gated_delta_rule(*inputs, initial)
    expected_out, expected_final = naive_recurrence(*inputs, initial)
    torch.testing.assert_close(out, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(final, expected_final, atol=1e-5, rtol=1e-5)


def test_decode_step_matches_recurrence_for_each_request():
    q, k, v, log_decay, beta = random_inputs(3)
    initial = torch.randn(3, HEADS, KEY_DIM, VALUE_DIM, generator=torch.Generator().manual_seed(2))

    out, final = gated_delta_step(q, k, v, log_decay, beta, initial)
    for b in range(3):
        one = (t[b : b + 1] for t in (q, k, v, log_decay, beta))
        expected_out, expected_final = naive_recurrence(*one, initial[b])
        torch.testing.assert_close(out[b], expected_out[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(final[b], expected_final, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def layer():
    torch.manual_seed(0)
    layer = GatedDeltaNet(CONFIG, HIDDEN, eps=1e-6, state_index=0)
    layer.in_proj_qkvz.weight.normal_(0, 0.3)
    layer.in_proj_ba.weight.normal_(0, 0.3)
    layer.out_proj.weight.normal_(0, 0.3)
    layer.conv1d.weight.normal_(0, 0.5)
    layer.A_log.uniform_(-3, 0)  # slow decays: the state matters over many tokens
    layer.dt_bias.uniform_(-1, 0)
    layer.norm.weight.uniform_(0.5, 1.5)
    return layer.eval()


def run_schedule(layer, sequences, slots, schedule):
    """Steps of {sequence: chunk length}, in request order; returns each sequence's outputs and
    the state cache, with its state in its slot. Unused slots hold noise, so reading a wrong slot
    shows."""
    cache = state_cache_of(layer, 8)
    for tensor in cache.layer(0).values():
        tensor.normal_()
        tensor[slots] = 0  # fresh requests start from zeroed slots, as the runner does
    done = [0] * len(sequences)
    outs = [[] for _ in sequences]
    with torch.inference_mode():
        for step in schedule:
            x = torch.cat([sequences[s][done[s] : done[s] + n] for s, n in step.items()])
            y = recurrent_step(layer, cache, x, list(step.values()), [slots[s] for s in step])
            for s, n in step.items():
                outs[s].append(y[:n])
                y, done[s] = y[n:], done[s] + n
    return [torch.cat(o) for o in outs], cache


def test_chunks_and_batched_decodes_continue_one_prefill(layer):
    g = torch.Generator().manual_seed(3)
    sequences = [torch.randn(90, HIDDEN, generator=g), torch.randn(80, HIDDEN, generator=g)]
    whole = [{0: 90}, {1: 80}]
    # Chunks of odd sizes, one shorter than the conv window, then decodes of both in one batch.
    pieces = [{0: 37, 1: 2}, {0: 27, 1: 70}, {0: 1, 1: 3}, *[{0: 1, 1: 1}] * 5, {0: 20}]
    expected, expected_cache = run_schedule(layer, sequences, [1, 5], whole)
    got, cache = run_schedule(layer, sequences, [6, 3], pieces)
    for s in range(2):
        torch.testing.assert_close(got[s], expected[s], atol=1e-5, rtol=1e-5)
    for name in ("recurrent_state", "conv_state"):
        torch.testing.assert_close(
            cache.layer(0)[name][[6, 3]], expected_cache.layer(0)[name][[1, 5]]
        )
