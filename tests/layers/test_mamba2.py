"""The Mamba2 mixer: the chunked scan is the recurrence, and state slots carry requests across steps."""

from __future__ import annotations

import pytest
import torch
from model_harness import recurrent_step, state_cache_of

from sluice.bench.tiny_checkpoint import tiny_config
from sluice.config import Mamba2Config
from sluice.layers.mamba2 import Mamba2Mixer, ssd_chunked

HEADS, HEAD_DIM, GROUPS, STATE_SIZE, CHUNK = 4, 32, 2, 16, 8
HIDDEN = 64
TIME_STEP_LIMITS = (0.2, 1.0)  # narrow enough that some time steps are clamped at each end


def naive_recurrence(x, dt, A, B, C, state):
    """Token by token: state = exp(dt A) state + dt x B^T; y = state C."""
    B = B.repeat_interleave(HEADS // GROUPS, dim=1)
    C = C.repeat_interleave(HEADS // GROUPS, dim=1)
    ys = []
    for t in range(x.shape[0]):
        decay = torch.exp(dt[t] * A)[:, None, None]
        state = decay * state + (dt[t, :, None] * x[t])[..., None] * B[t][:, None, :]
        ys.append((state * C[t][:, None, :]).sum(-1))
    return torch.stack(ys), state


@pytest.mark.parametrize("length", [1, 5, 8, 13, 24, 37])
def test_chunked_scan_matches_recurrence(length):
    g = torch.Generator().manual_seed(length)
    x = torch.randn(length, HEADS, HEAD_DIM, generator=g)
    dt = torch.rand(length, HEADS, generator=g) * 0.5
    A = -torch.rand(HEADS, generator=g) * 2
    B = torch.randn(length, GROUPS, STATE_SIZE, generator=g)
    C = torch.randn(length, GROUPS, STATE_SIZE, generator=g)
    initial = torch.randn(HEADS, HEAD_DIM, STATE_SIZE, generator=g)

    y, final = ssd_chunked(x, dt, A, B, C, initial, CHUNK)
    expected_y, expected_final = naive_recurrence(x, dt, A, B, C, initial)
    torch.testing.assert_close(y, expected_y, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(final, expected_final, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def mixers():
    """transformers' BambaMixer with random weights, and ours loaded from it."""
    from transformers.models.bamba.modeling_bamba import BambaMixer

    config = tiny_config("bamba")
    config.time_step_limit = TIME_STEP_LIMITS
    torch.manual_seed(0)
    reference = BambaMixer(config, layer_idx=0).eval()
    with torch.no_grad():
        for p in reference.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
        reference.A_log.uniform_(-3, 0)  # slow decays: the state matters over many tokens
        reference.dt_bias.uniform_(-1, 0)
    ours = Mamba2Mixer(
        HIDDEN,
        Mamba2Config(
            num_heads=HEADS,
            head_dim=HEAD_DIM,
            state_size=STATE_SIZE,
            num_groups=GROUPS,
            conv_kernel=config.mamba_d_conv,
            chunk_size=CHUNK,
            conv_bias=True,
            proj_bias=False,
            time_step_min=TIME_STEP_LIMITS[0],
            time_step_max=TIME_STEP_LIMITS[1],
        ),
        config.rms_norm_eps,
        state_index=0,
    )
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def run_step(mixer, cache, chunks: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """One engine step: each slot's chunk of tokens, concatenated in slot order given."""
    slots = list(chunks)
    lens = [len(chunks[s]) for s in slots]
    with torch.inference_mode():
        out = recurrent_step(mixer, cache, torch.cat([chunks[s] for s in slots]), lens, slots)
    return dict(zip(slots, out.split(lens)))


def test_prefill_matches_transformers(mixers):
    reference, ours = mixers
    cache = state_cache_of(ours, 4)
    x = torch.randn(1, 29, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)[0]
    torch.testing.assert_close(run_step(ours, cache, {2: x[0]})[2], expected, atol=1e-5, rtol=1e-5)


def test_decode_and_chunks_continue_from_their_slots(mixers):
    """Two requests in slots 3 and 1 run through mixed steps (prefill chunks, batched decodes);
    each must match a single pass over its whole sequence in a fresh slot."""
    _, ours = mixers
    cache = state_cache_of(ours, 5)
    g = torch.Generator().manual_seed(1)
    seqs = {3: torch.randn(21, HIDDEN, generator=g), 1: torch.randn(19, HIDDEN, generator=g)}
    fresh_slot = {3: 0, 1: 4}
    schedule = [{3: 6, 1: 9}, *[{3: 1, 1: 1}] * 5, {3: 9, 1: 1}, {1: 3}, {3: 1, 1: 1}]
    done = dict.fromkeys(seqs, 0)
    outputs = {slot: [] for slot in seqs}
    for step in schedule:
        chunks = {s: seqs[s][done[s] : done[s] + n] for s, n in step.items()}
        for slot, out in run_step(ours, cache, chunks).items():
            outputs[slot].append(out)
            done[slot] += len(chunks[slot])
    assert done == {s: len(seq) for s, seq in seqs.items()}
    for slot, seq in seqs.items():
        whole = run_step(ours, cache, {fresh_slot[slot]: seq})[fresh_slot[slot]]
        torch.testing.assert_close(torch.cat(outputs[slot]), whole, atol=1e-5, rtol=1e-5)
