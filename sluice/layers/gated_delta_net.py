"""Gated DeltaNet: the linear-attention token mixer of Qwen3-Next.

Each value head keeps a [key_dim, value_dim] state S, read by queries like a fast-weight memory.
Per token, with l2-normalized q and k (q also scaled by key_dim**-0.5), decay exp(g) and write
strength beta:

    S_t = exp(g_t) * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T q_t

i.e. the decayed state's prediction for k_t is moved a fraction beta_t towards v_t (the delta
rule). Decodes (and the tokens of verify runs, see `layers/state.py`) run that step batched over
requests; a prefill chunk runs the equivalent chunked form (`chunked_gated_delta_rule`), which
turns each chunk of tokens into a few matmuls.
In front sits a short causal conv1d over q, k and v; behind, a norm gated by silu(z).

Per state slot the layer keeps, in the state cache, the conv state (the last `kernel - 1` conv
inputs) and the recurrent state S (in float32: it accumulates over the whole sequence). There is
no flash-linear-attention kernel path here: both forms are plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sluice.config import GatedDeltaNetConfig
from sluice.layers.conv1d import causal_conv1d, causal_conv1d_step
from sluice.layers.forward_context import ForwardContext
from sluice.layers.linear import Linear
from sluice.layers.norm import GatedRMSNorm
from sluice.layers.state import StateSpec, TokenStep

CHUNK_SIZE = 64
L2_NORM_EPS = 1e-6


class GatedDeltaNet(nn.Module):
    def __init__(
        self, config: GatedDeltaNetConfig, hidden_size: int, eps: float, state_index: int
    ) -> None:
        """`state_index`: the layer's index among the model's recurrent layers (its state's in
        the state cache)."""
        super().__init__()
        self.state_index = state_index
        self.num_key_heads, self.num_value_heads = config.num_key_heads, config.num_value_heads
        self.key_head_dim, self.value_head_dim = config.key_head_dim, config.value_head_dim
        self.key_dim = self.num_key_heads * self.key_head_dim
        self.value_dim = self.num_value_heads * self.value_head_dim
        self.heads_per_key = self.num_value_heads // self.num_key_heads
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.conv_kernel = config.conv_kernel
        self.in_proj_qkvz = Linear(hidden_size, 2 * self.key_dim + 2 * self.value_dim)
        self.in_proj_ba = Linear(hidden_size, 2 * self.num_value_heads)
        # Holds the depthwise weight in the checkpoint's [channels, 1, kernel] shape; it is
        # applied by causal_conv1d with a rolling state, never by nn.Conv1d.forward.
        self.conv1d = nn.Conv1d(
            self.conv_dim, self.conv_dim, self.conv_kernel, groups=self.conv_dim, bias=False
        )
        self.conv1d.weight.requires_grad_(False)
        self.dt_bias = nn.Parameter(torch.ones(self.num_value_heads), requires_grad=False)
        self.A_log = nn.Parameter(torch.zeros(self.num_value_heads), requires_grad=False)
        self.norm = GatedRMSNorm(self.value_head_dim, eps)
        self.out_proj = Linear(self.value_dim, hidden_size)

    def state_spec(self, dtype: torch.dtype) -> StateSpec:
        """conv_state [conv_dim, kernel - 1], recurrent_state [heads, key_dim, value_dim]."""
        return {
            "conv_state": ((self.conv_dim, self.conv_kernel - 1), dtype),
            "recurrent_state": (
                (self.num_value_heads, self.key_head_dim, self.value_head_dim),
                torch.float32,
            ),
        }

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: [T, hidden], the flat tokens of the step in the order `ctx.state` was built for."""
        state, tensors = ctx.state, ctx.state_cache.layer(self.state_index)
        conv_state, recurrent_state = tensors["conv_state"], tensors["recurrent_state"]
        qkv, z, b, a = self._project(x)
        beta = torch.sigmoid(b.float())
        log_decay = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())
        out = x.new_empty(x.shape[0], self.num_value_heads, self.value_head_dim)
        for step in state.token_steps:
            rows = step.token_index
            out[rows] = self._decode(
                qkv[rows], log_decay[rows], beta[rows], conv_state, recurrent_state, step
            )
        for run in state.prefills:
            rows = slice(run.start, run.end)
            out[rows] = self._prefill(
                qkv[rows], log_decay[rows], beta[rows], conv_state, recurrent_state, run.slot
            )
        out = self.norm(out, z)
        return self.out_proj(out.flatten(1))

    def _project(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> conv input [T, conv_dim] (all q, then all k, then all v), z [T, value_heads,
        value_head_dim], b and a [T, value_heads].

        The checkpoint groups the projections' rows by key head: [q, k, v..., z...] and [b..., a...]
        for each key head with its `heads_per_key` value heads.
        """
        tokens, per_key = x.shape[0], self.heads_per_key
        qkvz = self.in_proj_qkvz(x).view(tokens, self.num_key_heads, -1)
        values_per_key = per_key * self.value_head_dim
        q, k, v, z = qkvz.split(
            [self.key_head_dim, self.key_head_dim, values_per_key, values_per_key], dim=-1
        )
        b, a = self.in_proj_ba(x).view(tokens, self.num_key_heads, 2 * per_key).chunk(2, dim=-1)
        qkv = torch.cat((q.flatten(1), k.flatten(1), v.flatten(1)), dim=-1)
        z = z.reshape(tokens, self.num_value_heads, self.value_head_dim)
        return qkv, z, b.reshape(tokens, -1), a.reshape(tokens, -1)

    def _decode(
        self,
        qkv: torch.Tensor,
        log_decay: torch.Tensor,
        beta: torch.Tensor,
        conv_state: torch.Tensor,
        recurrent_state: torch.Tensor,
        step: TokenStep,
    ) -> torch.Tensor:
        """One token for each of B requests (a decode, or a token of a verify run), from the
        state in its read slot to its write slot."""
        reads, writes = step.read_slots, step.write_slots
        mixed, new_conv = causal_conv1d_step(qkv, self._conv_weight(), None, conv_state[reads])
        conv_state.index_copy_(0, writes, new_conv.to(conv_state.dtype))
        q, k, v = self._heads(mixed)
        out, new_recurrent = gated_delta_step(q, k, v, log_decay, beta, recurrent_state[reads])
        recurrent_state.index_copy_(0, writes, new_recurrent)
        return out.to(qkv.dtype)

    def _prefill(
        self,
        qkv: torch.Tensor,
        log_decay: torch.Tensor,
        beta: torch.Tensor,
        conv_state: torch.Tensor,
        recurrent_state: torch.Tensor,
        slot: int,
    ) -> torch.Tensor:
        """One request's chunk of tokens, continuing from the state in its slot."""
        mixed, conv_state[slot] = causal_conv1d(qkv, self._conv_weight(), None, conv_state[slot])
        q, k, v = self._heads(mixed)
        out, recurrent_state[slot] = chunked_gated_delta_rule(
            q, k, v, log_decay, beta, recurrent_state[slot]
        )
        return out.to(qkv.dtype)

    def _conv_weight(self) -> torch.Tensor:
        return self.conv1d.weight.squeeze(1)

    def _heads(self, mixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Conv output [..., conv_dim] -> float32 q, k [..., value_heads, key_head_dim] (normalized,
        each key head repeated for its value heads) and v [..., value_heads, value_head_dim]."""
        q, k, v = mixed.float().split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        key_shape = (*q.shape[:-1], self.num_key_heads, self.key_head_dim)
        q = _l2_normalize(q.view(key_shape)) * self.key_head_dim**-0.5
        k = _l2_normalize(k.view(key_shape))
        q, k = (t.repeat_interleave(self.heads_per_key, dim=-2) for t in (q, k))
        return q, k, v.view(*v.shape[:-1], self.num_value_heads, self.value_head_dim)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + L2_NORM_EPS)


def gated_delta_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token of B requests. q, k: [B, H, Dk]; v: [B, H, Dv]; log_decay, beta: [B, H];
    state: [B, H, Dk, Dv]. Returns the output [B, H, Dv] and the new state."""
    state = state * log_decay.exp()[..., None, None]
    predicted = (k.unsqueeze(-2) @ state).squeeze(-2)  # S^T k: what the memory holds for k
    correction = beta.unsqueeze(-1) * (v - predicted)
    state = state + k.unsqueeze(-1) * correction.unsqueeze(-2)
    return (q.unsqueeze(-2) @ state).squeeze(-2), state


def chunked_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L tokens of one request, the same result as L `gated_delta_step`s. q, k: [L, H, Dk];
    v: [L, H, Dv]; log_decay, beta: [L, H]; state: [H, Dk, Dv] float32.
    Returns the output [L, H, Dv] and the final state.

    Within a chunk starting from state S0, with G_t the decay summed from the chunk start to t,
    unrolling the recurrence gives
        S_t = exp(G_t) S0 + sum_{j<=t} exp(G_t - G_j) k_j u_j^T
    where u_j, the correction written at token j, depends on the earlier u_i of the chunk:
        u_j + beta_j sum_{i<j} exp(G_j - G_i) (k_j . k_i) u_i = beta_j (v_j - exp(G_j) S0^T k_j).
    That unit lower-triangular system is solved once for all chunks (with S0 factored out, as
    u = U - W S0); only the cheap state hand-over from chunk to chunk is sequential.
    """
    length = q.shape[0]
    q, k, v, log_decay, beta = (_chunked(t, chunk_size) for t in (q, k, v, log_decay, beta))
    decay_sum = log_decay.cumsum(-1)  # [H, N, C]: G_t
    decay_to = decay_sum.exp().unsqueeze(-1)  # exp(G_t): from the chunk start to t
    decay_from = (decay_sum[..., -1:] - decay_sum).exp().unsqueeze(-1)  # from t to the chunk end
    pairwise = _pairwise_decay(decay_sum)  # exp(G_t - G_j) for j <= t, 0 above the diagonal
    k_beta = k * beta.unsqueeze(-1)
    system = (k_beta @ k.transpose(-1, -2)) * pairwise.tril(-1)  # the unit diagonal is implied
    corrections = torch.linalg.solve_triangular(
        system,
        torch.cat((v * beta.unsqueeze(-1), k_beta * decay_to), dim=-1),
        upper=False,
        unitriangular=True,
    )
    u_free, u_per_state = corrections.split([v.shape[-1], k.shape[-1]], dim=-1)  # U, W
    scores = (q @ k.transpose(-1, -2)) * pairwise  # causal, decayed q.k within the chunk
    q_decayed, k_decayed = q * decay_to, k * decay_from
    out = torch.empty_like(v)
    for n in range(q.shape[1]):
        u = u_free[:, n] - u_per_state[:, n] @ state
        out[:, n] = q_decayed[:, n] @ state + scores[:, n] @ u
        state = (
            state * decay_sum[:, n, -1, None, None].exp() + k_decayed[:, n].transpose(-1, -2) @ u
        )
    return out.flatten(1, 2)[:, :length].transpose(0, 1), state


def _chunked(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """[L, H, ...] -> [H, N, chunk_size, ...], zero-padded at the end. Padding is inert: a token
    with zero decay and zero beta leaves the state as it is."""
    pad = -x.shape[0] % chunk_size
    x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad))
    x = x.view(-1, chunk_size, *x.shape[1:])  # [N, C, H, ...]
    return x.movedim(2, 0)


def _pairwise_decay(decay_sum: torch.Tensor) -> torch.Tensor:
    """[..., C] -> [..., C, C] holding exp(G_t - G_j) at [t, j] for j <= t, 0 above the diagonal.

    Masked before the exp: above the diagonal the difference is positive and could overflow.
    """
    size = decay_sum.shape[-1]
    future = torch.ones(size, size, dtype=torch.bool, device=decay_sum.device).triu(1)
    diff = decay_sum.unsqueeze(-1) - decay_sum.unsqueeze(-2)
    return diff.masked_fill(future, float("-inf")).exp()
