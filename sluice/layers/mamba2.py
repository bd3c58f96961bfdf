"""The Mamba2 mixer (selective state space, SSD form) of Mamba2 hybrids such as Bamba.

Per head h, with a scalar decay per token, the layer runs the linear recurrence

    state_t = exp(dt_t * A_h) * state_{t-1} + dt_t * x_t B_t^T      state: [head_dim, state_size]
    y_t     = state_t C_t + D_h * x_t

where x comes from the input projection through a short causal conv, B and C are shared by the
heads of a group, and dt is a per-head time step. Decodes take one recurrent step each, batched;
a prefill chunk uses the chunked (SSD) form: attention-like matmuls inside chunks of
`chunk_size` tokens, the recurrence only across chunk boundaries. Both start from the request's
slot and write the state after their last token back to it. The tokens of a verify run
(speculative decoding) step one by one like decodes, each state to its own slot (see
`layers/state.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sluice.config import Mamba2Config
from sluice.layers.conv1d import causal_conv1d, causal_conv1d_step
from sluice.layers.forward_context import ForwardContext
from sluice.layers.linear import Linear
from sluice.layers.state import StateSpec, TokenStep


class GatedGroupRMSNorm(nn.Module):
    """Mamba2's output norm: x * silu(gate), RMS-normalized within each of `num_groups` groups.

    It gates before normalizing, unlike Gated DeltaNet's `norm.GatedRMSNorm`.
    """

    def __init__(self, dim: int, num_groups: int, eps: float) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        gated = x.float() * F.silu(gate.float())
        groups = gated.unflatten(-1, (self.num_groups, -1))
        groups = groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * groups.flatten(-2).to(dtype)


class DepthwiseConv1d(nn.Module):
    """The causal conv's parameters, weight kept in the checkpoint's [channels, 1, kernel] shape."""

    def __init__(self, channels: int, kernel: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, 1, kernel), requires_grad=False)
        bias_param = nn.Parameter(torch.empty(channels), requires_grad=False) if bias else None
        self.register_parameter("bias", bias_param)


class Mamba2Mixer(nn.Module):
    """One Mamba2 layer; its `conv_state` and `ssm_state` ([num_slots, ...]) are in the state
    cache, at `state_index` (its index among the model's recurrent layers)."""

    def __init__(
        self, hidden_size: int, config: Mamba2Config, eps: float, state_index: int
    ) -> None:
        super().__init__()
        self.state_index = state_index
        if config.proj_bias:
            raise ValueError("Mamba2 projections with biases are not supported")
        self.config = config
        self.inner_size = config.num_heads * config.head_dim
        self.group_size = config.num_groups * config.state_size  # B's (and C's) width
        self.conv_dim = self.inner_size + 2 * self.group_size
        # One projection yields the gate, the conv input (x, B, C) and the time step per head.
        self.in_proj = Linear(hidden_size, self.inner_size + self.conv_dim + config.num_heads)
        self.conv1d = DepthwiseConv1d(self.conv_dim, config.conv_kernel, config.conv_bias)
        self.dt_bias = nn.Parameter(torch.empty(config.num_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.empty(config.num_heads), requires_grad=False)
        self.D = nn.Parameter(torch.empty(config.num_heads), requires_grad=False)
        self.norm = GatedGroupRMSNorm(self.inner_size, config.num_groups, eps)
        self.out_proj = Linear(self.inner_size, hidden_size)

    def state_spec(self, dtype: torch.dtype) -> StateSpec:
        """conv_state [conv_dim, kernel - 1], ssm_state [heads, head_dim, state_size]."""
        c = self.config
        return {
            "conv_state": ((self.conv_dim, c.conv_kernel - 1), dtype),
            # fp32 whatever the activations: the state accumulates over the whole sequence.
            "ssm_state": ((c.num_heads, c.head_dim, c.state_size), torch.float32),
        }

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [T, hidden], the flat tokens of the step in `ctx.state`'s request order."""
        state, tensors = ctx.state, ctx.state_cache.layer(self.state_index)
        gate, conv_in, dt = self.in_proj(x).split(
            [self.inner_size, self.conv_dim, self.config.num_heads], dim=-1
        )
        y = gate.new_empty(x.shape[0], self.inner_size)
        for step in state.token_steps:
            rows = step.token_index
            y[rows] = self._decode(conv_in[rows], dt[rows], tensors, step)
        for run in state.prefills:
            rows = slice(run.start, run.end)
            y[rows] = self._prefill(conv_in[rows], dt[rows], tensors, run.slot)
        return self.out_proj(self.norm(y, gate))

    def _decode(
        self,
        conv_in: torch.Tensor,
        dt: torch.Tensor,
        state: dict[str, torch.Tensor],
        step: TokenStep,
    ) -> torch.Tensor:
        """One token for each of b requests (a decode, or a token of a verify run), from the
        state in its read slot to its write slot: [b, conv_dim] -> [b, inner]."""
        conv_state, ssm_state = state["conv_state"], state["ssm_state"]
        reads, writes = step.read_slots, step.write_slots
        conv_out, conv_state[writes] = causal_conv1d_step(
            conv_in, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state[reads]
        )
        x, B, C = self._split_conv_out(conv_out)
        y, ssm_state[writes] = ssd_step(
            x, self._time_step(dt), self._decay_rate(), B, C, ssm_state[reads]
        )
        return self._with_skip(y, x)

    def _prefill(
        self, conv_in: torch.Tensor, dt: torch.Tensor, state: dict[str, torch.Tensor], slot: int
    ) -> torch.Tensor:
        """One request's chunk of L tokens: [L, conv_dim] -> [L, inner]."""
        conv_state, ssm_state = state["conv_state"], state["ssm_state"]
        conv_out, conv_state[slot] = causal_conv1d(
            conv_in, self.conv1d.weight[:, 0], self.conv1d.bias, conv_state[slot]
        )
        x, B, C = self._split_conv_out(conv_out)
        y, ssm_state[slot] = ssd_chunked(
            x,
            self._time_step(dt),
            self._decay_rate(),
            B,
            C,
            ssm_state[slot],
            self.config.chunk_size,
        )
        return self._with_skip(y, x)

    def _split_conv_out(
        self, conv_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[..., conv_dim] -> x [..., heads, head_dim], B and C [..., groups, state_size]."""
        c = self.config
        x, B, C = conv_out.split([self.inner_size, self.group_size, self.group_size], dim=-1)
        return (
            x.unflatten(-1, (c.num_heads, c.head_dim)),
            B.unflatten(-1, (c.num_groups, c.state_size)),
            C.unflatten(-1, (c.num_groups, c.state_size)),
        )

    def _time_step(self, dt: torch.Tensor) -> torch.Tensor:
        step = F.softplus(dt.float() + self.dt_bias.float())
        return step.clamp(self.config.time_step_min, self.config.time_step_max)

    def _decay_rate(self) -> torch.Tensor:
        return -torch.exp(self.A_log.float())  # A < 0, so exp(dt * A) decays the state

    def _with_skip(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The SSM output plus the D-scaled input, heads flattened: [..., inner]."""
        return (y + x.float() * self.D.float()[:, None]).flatten(-2).to(x.dtype)


def ssd_step(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One recurrent step for each of b requests (without the D skip).

    x: [b, heads, head_dim]; dt: [b, heads] (fp32); A: [heads]; B, C: [b, groups, state_size];
    state: [b, heads, head_dim, state_size] (fp32). Returns y [b, heads, head_dim] (fp32) and
    the new state.
    """
    B, C = _per_head(B, x.shape[1]), _per_head(C, x.shape[1])
    decay = torch.exp(dt * A)[..., None, None]
    update = (dt[..., None] * x.float())[..., None] * B[:, :, None, :]
    state = state * decay + update
    return torch.einsum("bhpn,bhn->bhp", state, C), state


def ssd_chunked(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One request's L tokens in the chunked form (without the D skip), from `state`.

    x: [L, heads, head_dim]; dt: [L, heads] (fp32); A: [heads]; B, C: [L, groups, state_size];
    state: [heads, head_dim, state_size] (fp32). Returns y [L, heads, head_dim] (fp32) and the
    state after the last token.
    """
    length, heads = x.shape[:2]
    # Padded tokens get dt = 0: no input and no decay, so the final state is the one at `length`.
    pad = -length % chunk_size
    x_dt = _chunks(x.float() * dt[..., None], pad, chunk_size)  # [c, l, h, p]
    B = _chunks(_per_head(B, heads), pad, chunk_size)  # [c, l, h, n]
    C = _chunks(_per_head(C, heads), pad, chunk_size)
    log_decay = _chunks(dt * A, pad, chunk_size).permute(2, 0, 1)  # [h, c, l]
    cum_decay = log_decay.cumsum(-1)

    # Within each chunk: causal, decay-weighted "attention" of C on B over the chunk's inputs.
    scores = torch.einsum("clhn,cshn->hcls", C, B) * torch.exp(_segment_sum(log_decay))
    y = torch.einsum("hcls,cshp->clhp", scores, x_dt)

    # What each chunk adds to the state by its end, then the state entering each chunk: the
    # recurrence over chunk boundaries, as one matmul over the (few) chunks.
    to_end = torch.exp(cum_decay[..., -1:] - cum_decay)  # [h, c, l]
    chunk_states = torch.einsum("clhn,hcl,clhp->chpn", B, to_end, x_dt)
    states = torch.cat((state[None], chunk_states))  # [1 + c, h, p, n]
    chunk_log_decay = F.pad(cum_decay[..., -1], (1, 0))  # [h, 1 + c]
    entering = torch.einsum("hcz,zhpn->chpn", torch.exp(_segment_sum(chunk_log_decay)), states)

    # Each token also reads the state its chunk started from, decayed up to the token.
    y = y + torch.einsum("clhn,chpn,hcl->clhp", C, entering[:-1], torch.exp(cum_decay))
    return y.flatten(0, 1)[:length], entering[-1]


def _per_head(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[..., groups, n] -> [..., heads, n] in fp32: consecutive heads share their group's B/C."""
    return t.float().repeat_interleave(heads // t.shape[-2], dim=-2)


def _chunks(t: torch.Tensor, pad: int, chunk_size: int) -> torch.Tensor:
    """[L, ...] -> [num_chunks, chunk_size, ...], zero-padded at the end."""
    padded = F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad))
    return padded.unflatten(0, (-1, chunk_size))


def _segment_sum(a: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., T, T]: out[i, j] = a[j + 1] + ... + a[i] for j <= i, -inf above.

    exp(out) is the decay from step j to step i. Summing masked copies, rather than subtracting
    cumulative sums, keeps small sums exact where the cumulative sums grow large.
    """
    size = a.shape[-1]
    lower = torch.ones(size, size, dtype=torch.bool, device=a.device).tril()
    terms = a[..., :, None].expand(*a.shape, size).masked_fill(~lower.tril(-1), 0)
    return terms.cumsum(-2).masked_fill(~lower, -torch.inf)
